"""Prompt lookup decoding, drafted only where it pays.

transformers' prompt lookup (`prompt_lookup_num_tokens`) drafts the tokens that followed the last n-gram's
first earlier occurrence in the sequence and verifies them in one pass; greedy verification keeps exactly
the tokens plain greedy decoding would have chosen, so the output does not change, only the number of passes.
A pass that verifies k drafted tokens reads k + 1 rows. Where a pass costs about the same for 1 or 6 rows
(fp32 GEMMs bound by memory bandwidth) a rejected draft is nearly free; with the int8 format's small-row
kernel every row costs about a fifth of a decode step on two vCPUs, so the library's drafting (an n-gram of
2, falling back to a single token: in ordinary text nearly every token has occurred before) made answers that
copy nothing slower by a third and more.

`Drafts` is the library's candidate generator with two changes: it drafts only after a match of at least
MIN_NGRAM tokens (a copy in progress, not a common word), and it adapts its length (up by 2 after a draft was
taken whole, down to what was accepted after one was cut), as transformers' own assistant schedule does. The
engine hands it to `generate` through the generation mixin's candidate-generator factory; where that factory
is missing (another transformers version), the library's own prompt lookup runs unchanged (`drafting`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

MIN_NGRAM = 3
MAX_NGRAM = 4


@dataclass
class DraftStats:
    """What prompt lookup did in one generation (for the benchmark and the tests)."""

    passes: int = 0
    """Verification passes that carried a draft."""
    drafted: int = 0
    accepted: int = 0


class Drafts(PromptLookupCandidateGenerator):
    """Drafts from earlier occurrences of the last MIN_NGRAM..MAX_NGRAM tokens; at most `max_tokens` at a time."""

    def __init__(self, max_tokens: int, eos_token_id: torch.Tensor | None, max_length: int) -> None:
        super().__init__(
            eos_token_id=eos_token_id,
            num_output_tokens=max_tokens,
            max_matching_ngram_size=MAX_NGRAM,
            max_length=max_length,
        )
        self.max_tokens = max_tokens
        self.tokens = max_tokens
        self.stats = DraftStats()
        self._drafted = 0

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        self._drafted = 0
        length = input_ids.shape[1]
        budget = min(self.tokens, self.max_length - length - 1)
        if budget <= 0 or input_ids.shape[0] != 1:
            return input_ids, None
        row = input_ids[0]
        for size in range(min(MAX_NGRAM, length - 1), MIN_NGRAM - 1, -1):
            # Windows that start before the tail itself, i.e. earlier occurrences of the last `size` tokens
            windows = row[:-1].unfold(0, size, 1)
            hits = (windows == row[-size:]).all(dim=1).nonzero()
            if not hits.numel():
                continue
            start = int(hits[0]) + size
            draft = row[start : start + budget]
            if self.eos_token_id is not None:
                ends = torch.isin(draft, self.eos_token_id).nonzero()
                if ends.numel():
                    draft = draft[: int(ends[0])]
            if draft.numel():
                self._drafted = draft.numel()
                self.stats.passes += 1
                self.stats.drafted += self._drafted
                return torch.cat([input_ids, draft[None]], dim=1), None
        return input_ids, None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        if not self._drafted:
            return
        accepted = min(int(num_matches), self._drafted)
        self.stats.accepted += accepted
        self.tokens = min(self.max_tokens, self.tokens + 2) if accepted == self._drafted else max(1, accepted)


@contextlib.contextmanager
def drafting(model, max_tokens: int) -> Iterator[list[Drafts]]:
    """While inside, `generate` with `prompt_lookup_num_tokens` drafts with `Drafts` (appended to the list it
    yields, one per generation); without the factory it overrides, the library's prompt lookup runs."""
    made: list[Drafts] = []
    if not callable(getattr(type(model), "_get_candidate_generator", None)):
        yield made
        return

    def factory(*, generation_config, **kwargs) -> Drafts:
        drafts = Drafts(max_tokens, getattr(generation_config, "_eos_token_tensor", None), generation_config.max_length)
        made.append(drafts)
        return drafts

    model._get_candidate_generator = factory  # this instance only, for this call
    try:
        yield made
    finally:
        del model._get_candidate_generator
