"""Logits processors for transformers' `generate`: the parts of a request it has no option for.

- OpenAI's presence and frequency penalties (additive, over the generated tokens only, as OpenAI and
  vLLM define them; transformers only has the multiplicative `repetition_penalty`);
- log-probabilities of the raw distribution, recorded before any sampling control changes it;
- a sampler with one seeded generator per row, so a row's text depends on its own seed alone and not on
  what else is in the batch: `n` samples are reproducible one by one, and a batch samples what each
  prompt would alone. It hands `generate` a one-hot choice, which greedy selection then takes;
- a token bitmask (constrained decoding's allowed tokens, constrained/matcher.py) applied with plain array ops
  (numpy's, and torch's as the fallback): the runtime image has no compiler for the libraries' `torch.compile`d
  helpers.

Temperature, top-k, top-p, min-p, typical-p, the repetition penalty and logit bias use transformers' own processors.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import LogitsProcessor


class PresenceFrequencyPenalty(LogitsProcessor):
    """logit[t] -= presence * (count[t] > 0) + frequency * count[t], counting generated tokens only."""

    def __init__(self, presence: float, frequency: float, prompt_width: int, vocab_size: int) -> None:
        self.presence, self.frequency = presence, frequency
        self.prompt_width = prompt_width
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_width :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros(scores.shape, dtype=scores.dtype)
        counts.scatter_add_(1, generated, torch.ones(generated.shape, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-softmax of the raw scores of the latest step; changes nothing."""

    def __init__(self) -> None:
        self.latest: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.latest = torch.log_softmax(scores.float(), dim=-1)
        return scores


class SeededSampler(LogitsProcessor):
    """Samples each row from softmax(scores) with its own generator; returns the choice as a one-hot mask."""

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.stack(
            [torch.multinomial(probs[row], 1, generator=gen)[0] for row, gen in enumerate(self.generators)]
        )
        choice = torch.full_like(scores, float("-inf"))
        choice.scatter_(1, chosen[:, None], 0.0)
        return choice


_BITS = torch.arange(32, dtype=torch.int32)


def apply_token_bitmask(scores: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """`scores` (rows x vocabulary) with -inf wherever `bitmask` (rows x words of int32; bit b of word w is token
    32w + b) has a 0, and past its last word.

    With numpy (single-threaded): the same few element-wise torch ops wake torch's intra-op thread pool, and on
    a busy 2-vCPU host that wake-up cost 15-45 ms a step against 0.15-0.3 ms here (docs/constrained-decoding.md).
    Logits that numpy cannot hold (not float32 on the CPU) take the torch ops."""
    rows, vocab = scores.shape
    if scores.dtype == torch.float32 and scores.device.type == "cpu" and vocab <= bitmask.shape[1] * 32:
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
        return torch.from_numpy(np.where(allowed.view(np.bool_), scores.numpy(), np.float32(-np.inf)))
    allowed = ((bitmask.unsqueeze(-1) >> _BITS) & 1).view(rows, -1).bool()
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    return scores.masked_fill(~allowed[:, :vocab], float("-inf"))


class LogitBias(LogitsProcessor):
    """Adds a fixed bias to chosen tokens' logits at every step (OpenAI's `logit_bias`)."""

    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self.ids = torch.tensor([token for token, _ in bias], dtype=torch.long)
        self.values = torch.tensor([value for _, value in bias], dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores
