"""Logits processors for transformers' `generate`: the parts of a request it has no option for.

- OpenAI's presence and frequency penalties (additive, over the generated tokens only, as OpenAI and
  vLLM define them; transformers only has the multiplicative `repetition_penalty`);
- log-probabilities of the raw distribution, recorded before any sampling control changes it;
- a sampler with one seeded generator per row, so a row's text depends on its own seed alone and not on
  what else is in the batch: `n` samples are reproducible one by one, and a batch samples what each
  prompt would alone. It hands `generate` a one-hot choice, which greedy selection then takes.

Temperature, top-k, top-p, the repetition penalty and logit bias use transformers' own processors.
"""

from __future__ import annotations

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


class LogitBias(LogitsProcessor):
    """Adds a fixed bias to chosen tokens' logits at every step (OpenAI's `logit_bias`)."""

    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self.ids = torch.tensor([token for token, _ in bias], dtype=torch.long)
        self.values = torch.tensor([value for _, value in bias], dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores
