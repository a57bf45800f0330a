"""How the engine steers transformers' `generate` loop, one `generate` call at a time.

- `Steps`, a stopping criterion called after every new token: it turns each row's token into text
  (detokenizer.TextStream), records its log-probability, ends rows (end-of-text, a stop string,
  max_new_tokens), ends the batch before the next step would miss the deadline, and hands the step's
  events to the caller, which may cancel (a streaming client that left);
- `Passes`, forward hooks on the model: they time every pass for the planner and the timings, stop the
  prompt pass between chunks when the rest can no longer make the deadline (planner.check_rest), and
  collect the prompt's log-probabilities when asked. With a cached prefix (prefix_cache.py) the prompt pass
  starts after it, and a pass that would read cached positions again reads only the rest.

With prompt lookup (transformers' `prompt_lookup_num_tokens`) one pass may accept several tokens: `Steps`
then sees them in one call and handles each in order, exactly once, as if they had come one per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria

from phi2.engine import extensions
from phi2.engine.constrained.matcher import Constraint
from phi2.engine.detokenizer import TextStream
from phi2.engine.generator import FinishReason, GenerationParams, OnStep, StepEvent, TokenLogprob
from phi2.engine.planner import PassSample, Plan, Planner
from phi2.engine.sampling import LogprobRecorder


@dataclass
class Row:
    """One row's generation state."""

    stream: TextStream
    finish: FinishReason | None = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Passes:
    """Forward hooks on the model for one `generate` call: time every pass (for the planner and the
    timings), stop the prompt pass between chunks when the rest cannot make the deadline, and collect
    prompt log-probabilities when asked."""

    def __init__(self, planner: Planner, plan: Plan, deadline: float, input_ids, prompt_k: int | None):
        self.planner = planner
        self.plan = plan
        self.deadline = deadline
        self.input_ids = input_ids
        self.prompt_k = prompt_k
        self.done = plan.start  # prompt tokens (per row) already read: a cached prefix counts as read
        self.skip_cached = False
        """Set for prompt lookup: its first pass feeds the whole sequence again (transformers 5.24 starts assisted
        decoding as on an empty cache), so that pass is cut to the positions the cache does not hold."""
        self.prefill_s = 0.0
        self.chunks = 0
        self.samples: list[PassSample] = []
        self._began = 0.0
        self._shape = (0, 0, 0)
        width = input_ids.shape[1]
        self.prompt_logprobs = torch.zeros(input_ids.shape) if prompt_k is not None else None
        self.prompt_top: list[list[tuple[tuple[int, float], ...]]] = (
            [[() for _ in range(width)] for _ in range(input_ids.shape[0])] if prompt_k else []
        )

    @property
    def in_prompt(self) -> bool:
        return self.done < self.plan.width

    def before(self, module, args, kwargs):
        changed = None
        if self.skip_cached:
            self.skip_cached = False
            kwargs = _uncached(kwargs)
            changed = (args, kwargs)
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        tokens = ids.shape[1] if ids is not None else 1
        if self.in_prompt and self.done > self.plan.start:
            self.planner.check_rest(self.plan, self.done, self.deadline - time.monotonic(), self.prefill_s)
        start = self.done if self.in_prompt else self.plan.width
        self._shape = (ids.shape[0] if ids is not None else self.plan.batch, start, tokens)
        self._began = time.monotonic()
        extensions.run_before_pass(*self._shape, self.in_prompt)  # timed with the pass, as a slower CPU would be
        return changed

    def after(self, module, args, kwargs, output) -> None:
        seconds = time.monotonic() - self._began
        batch, start, tokens = self._shape
        sample = PassSample(batch=batch, start=start, tokens=tokens, seconds=seconds)
        self.samples.append(sample)
        if tokens > 1 and start + tokens > self.plan.width:
            # Prompt lookup verifying drafted tokens: a decoding step, not a prompt chunk (planner.learn_verification)
            self.planner.learn_verification(sample)
        else:
            self.planner.learn(sample)
        if self.in_prompt:
            if self.prompt_logprobs is not None:
                self._record_prompt(output.logits, start, tokens)
            # A prompt-lookup pass reads the last prompt token and verifies drafted ones in one go
            self.done = min(self.plan.width, self.done + tokens)
            self.prefill_s += seconds
            self.chunks += 1

    def _record_prompt(self, logits: torch.Tensor, start: int, tokens: int) -> None:
        """Log-probabilities of the next prompt token at each position of this chunk."""
        width = self.plan.width
        end = min(start + tokens, width - 1)  # the last prompt position predicts the first new token
        if end <= start:
            return
        logprobs = torch.log_softmax(logits[:, : end - start].float(), dim=-1)
        targets = self.input_ids[:, start + 1 : end + 1]
        self.prompt_logprobs[:, start + 1 : end + 1] = logprobs.gather(-1, targets[..., None])[..., 0]
        if self.prompt_k:
            values, indices = logprobs.topk(self.prompt_k, dim=-1)
            for row in range(logprobs.shape[0]):
                for offset in range(end - start):
                    self.prompt_top[row][start + 1 + offset] = tuple(
                        zip(indices[row, offset].tolist(), values[row, offset].tolist(), strict=True)
                    )


def _uncached(kwargs: dict) -> dict:
    """The pass's inputs without the positions its cache already holds (prompt lookup's first pass)."""
    cache, ids, positions = kwargs.get("cache"), kwargs.get("input_ids"), kwargs.get("position_ids")
    if cache is None or ids is None or positions is None or ids.shape[0] != 1:
        return kwargs
    overlap = cache.get_seq_length() - int(positions[0, 0])
    if overlap <= 0:
        return kwargs
    if overlap >= ids.shape[1]:
        raise RuntimeError(f"a pass of {ids.shape[1]} tokens has nothing the cache does not hold")
    return {**kwargs, "input_ids": ids[:, overlap:], "position_ids": positions[..., overlap:]}


class Steps(StoppingCriteria):
    """Called by `generate` after every new token: turns each row's token into text and a StepEvent, ends
    rows (end-of-text, stop string, max_new_tokens), ends the batch before the deadline would be missed,
    and hands the events to the caller (which may cancel).

    With prompt lookup a call may bring several accepted tokens: each is handled in order, once, with its own
    `on_step` call, and the ones after a row's end are ignored (transformers already cut them at end-of-text
    and max_new_tokens; a stop string is only known here). `step_tokens` is how many tokens a pass feeds (1,
    or the last token and the drafted ones it verifies): the deadline check estimates the next pass with it.
    """

    def __init__(
        self,
        planner: Planner,
        eos_ids: list[int],
        rows: list[Row],
        params: GenerationParams,
        deadline: float,
        start: float,
        recorder: LogprobRecorder | None,
        on_step: OnStep | None,
        *,
        width: int | None = None,
        step_tokens: int = 1,
        constraint: Constraint | None = None,
    ):
        self.planner = planner
        self.constraint = constraint
        """Constrained decoding: each row's grammar state advances here, with the token that row chose."""
        self.step_tokens = step_tokens
        self.seen: int | None = width
        """Tokens per row already handled (the prompt's width at first)."""
        self.tokens = 0
        """New tokens handled (per row), and how many the first call brought."""
        self.first_tokens = 0
        self.eos_ids = eos_ids
        self.rows = rows
        self.params = params
        self.deadline = deadline
        self.start = start
        self.recorder = recorder
        self.on_step = on_step
        self.first_token_at: float | None = None
        self.last_token_at = start
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        now = time.monotonic()
        self.steps += 1
        self.last_token_at = now
        first = self.first_token_at is None
        if first:
            self.first_token_at = now
        seen = self.seen if self.seen is not None else input_ids.shape[1] - 1
        self.seen = input_ids.shape[1]
        columns = input_ids[:, seen:].T.tolist()
        for position, column in enumerate(columns):
            self.tokens += 1
            if first:
                self.first_tokens += 1
            events = self._step(column)
            if position == len(columns) - 1:
                # Decode steps take about the same time each: end if the next one would end past the deadline.
                per_step = (
                    (now - self.first_token_at) / (self.steps - 1)
                    if self.steps > 1
                    else self.planner.step_s(len(self.rows), self.step_tokens, self.seen)
                    + (self.planner.mask_step_s(len(self.rows)) if self.constraint is not None else 0.0)
                )
                if now + per_step >= self.deadline:
                    self._end_all("time_limit", events)
            if self.on_step is not None and events and not self.on_step(events):
                self._end_all("cancelled", [])
            if all(row.finish is not None for row in self.rows):
                break
        return torch.tensor([row.finish is not None for row in self.rows], dtype=torch.bool)

    def _step(self, new: list[int]) -> list[StepEvent]:
        """One new token per row: its text, log-probability and whether it ends the row."""
        events: list[StepEvent] = []
        for index, (row, token) in enumerate(zip(self.rows, new, strict=True)):
            if row.finish is not None:
                continue
            if token in self.eos_ids:
                row.finish = "eos_token"
                events.append(StepEvent(index, None, row.stream.finish(), finish_reason="eos_token"))
                continue
            logprob = self._logprob(index, token)
            row.ids.append(token)
            if logprob is not None:
                row.logprobs.append(logprob)
            complete = self.constraint is not None and self.constraint.advance(index, token)
            text = row.stream.push(token)
            if row.stream.stopped:
                row.finish = "stop_sequence"
            elif complete:  # the grammar takes nothing more: its end of text is the only token left
                row.finish = "eos_token"
                text += row.stream.finish()
            elif len(row.ids) >= self.params.max_new_tokens:
                row.finish = "length"
                text += row.stream.finish()
            events.append(StepEvent(index, token, text, logprob, row.finish))
        if self.constraint is not None:
            for index, row in enumerate(self.rows):
                if row.finish is not None:
                    self.constraint.end(index)
        return events

    def _end_all(self, reason: FinishReason, events: list[StepEvent]) -> None:
        """End every unfinished row; its event of this step (if any) becomes its last one."""
        latest = {event.row: position for position, event in enumerate(events)}
        for index, row in enumerate(self.rows):
            if row.finish is None:
                row.finish = reason
                flushed = row.stream.finish()
                if reason == "cancelled":
                    continue
                if index in latest:
                    old = events[latest[index]]
                    events[latest[index]] = StepEvent(index, old.token_id, old.text + flushed, old.logprob, reason)
                else:
                    events.append(StepEvent(index, None, flushed, finish_reason=reason))

    def _logprob(self, row: int, token: int) -> TokenLogprob | None:
        if self.recorder is None or self.recorder.latest is None:
            return None
        logprobs = self.recorder.latest[row]
        k = self.params.logprobs or 0
        top: tuple[tuple[int, float], ...] = ()
        if k:
            values, indices = logprobs.topk(k)
            top = tuple(zip(indices.tolist(), values.tolist(), strict=True))
        return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=top)
