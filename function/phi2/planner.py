"""What a request may cost: decided before any compute, and re-decided between prompt chunks.

The prompt's forward pass cannot be interrupted once a chunk is running, so the planner
- knows this model's speeds on this execution environment: a cost model of one forward pass,
  `fixed + rows x (per_row + per_row_ctx x context)` (rows = batch x chunk tokens; the last term is
  attention, which grows with the context), calibrated when the model is prepared (`calibration.json`),
  checked with a short pass at warm-up (which rescales it to this CPU) and refined from every chunk and
  decode step of real requests;
- admits a request only if its whole prompt pass fits before the deadline (else PromptTooLongForDeadline,
  naming the largest prompt that fits for that batch size), before anything is computed. Admission
  assumes the current speed, but never worse than twice the best speed measured here: a burst of noise
  must not make the function refuse everything (a refused request measures nothing, so it could never
  recover), and a prompt whose pass takes at most half the time left is always admitted;
- cuts the prompt into chunks, and between chunks gives up as soon as the refined estimate of the rest no
  longer fits: a wrong estimate overruns by at most one chunk. A chunk takes about `chunk_seconds` when
  time is short; with time to spare chunks grow, up to a quarter of the spare time (so one chunk could
  run five times slower than estimated and still end in time), because every chunk reads every weight
  once more: for an int8 Phi-2 on two vCPUs, 1-second chunks made a 512-token prompt take ~1.9x the
  time of one pass.

No AWS types and no torch here: the generator feeds it measurements and asks it questions.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import PromptTooLongForDeadline

CALIBRATION_FILE = "calibration.json"
CALIBRATION_VERSION = 1
# Measured speeds move estimates by this weight (an exponential moving average): a noisy request does
# not swing the next admission, a persistently slower CPU is learnt within a few requests.
LEARNING_RATE = 0.3
# Admission assumes the current speed, but never more than this many times slower than the best seen.
WORST_VS_BEST = 2.0
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 2048
# Chunks may take up to this share of the time an admitted prompt pass leaves to spare.
SPARE_SHARE_PER_CHUNK = 0.25
# One measurement per forward pass is all a rescale needs; more do not pay at cold start.
SCALE_LIMITS = (0.05, 20.0)


@dataclass(frozen=True)
class PassSample:
    """One timed forward pass: `batch` rows of `tokens` new tokens after `start` tokens of context."""

    batch: int
    start: int
    tokens: int
    seconds: float


@dataclass
class CostModel:
    """Seconds of one forward pass, as a function of its shape."""

    fixed_s: float
    """Per forward pass, whatever its size: reading every weight once (a decode step is nearly all this)."""
    per_row_s: float
    """Per token row: the matrix multiplications."""
    per_row_ctx_s: float
    """Per token row and context position: attention."""

    def seconds(self, batch: int, start: int, tokens: int) -> float:
        rows = batch * tokens
        return self.fixed_s + rows * (self.per_row_s + self.per_row_ctx_s * (start + tokens / 2))

    @classmethod
    def fit(cls, samples: Iterable[PassSample], attention_ratio: float) -> CostModel:
        """Least squares over timed passes: seconds = fixed + per_row x rows x (1 + ratio x context).

        `attention_ratio` is attention's cost per context position relative to a row's matmul cost, from
        the architecture (4 x layers x hidden FLOPs per position against 2 x linear parameters). A single
        pass cannot separate the fixed part: it is all charged per row, which overestimates, never under.
        """
        samples = list(samples)
        if not samples:
            raise ValueError("no timed passes to fit")
        xs = [s.batch * s.tokens * (1 + attention_ratio * (s.start + s.tokens / 2)) for s in samples]
        ys = [s.seconds for s in samples]
        n = len(samples)
        mean_x, mean_y = sum(xs) / n, sum(ys) / n
        spread = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0
        fixed = mean_y - slope * mean_x
        if slope <= 0 or fixed < 0:  # noise, or one shape only: no intercept
            fixed, slope = 0.0, sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
        per_row = max(slope, 1e-9)
        return cls(fixed_s=fixed, per_row_s=per_row, per_row_ctx_s=per_row * attention_ratio)


@dataclass
class Calibration:
    """The speeds measured when the model was prepared (stored beside it), on the preparing machine."""

    samples: list[PassSample]
    threads: int
    cpu: dict[str, object] = field(default_factory=dict)
    version: int = CALIBRATION_VERSION

    def save(self, directory: Path) -> None:
        data = asdict(self)
        (directory / CALIBRATION_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Calibration | None:
        """The calibration beside a prepared model, or None (absent, from another version, unreadable)."""
        path = directory / CALIBRATION_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("version") != CALIBRATION_VERSION:
                return None
            return cls(
                samples=[PassSample(**s) for s in data["samples"]],
                threads=int(data["threads"]),
                cpu=dict(data.get("cpu", {})),
            )
        except (OSError, ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class Plan:
    """How an admitted request's prompt pass runs."""

    batch: int
    width: int
    chunk_tokens: int
    estimated_s: float

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.width / self.chunk_tokens))


class Planner:
    """Speeds of one loaded model on this execution environment, and the decisions they allow."""

    def __init__(
        self, context_length: int, attention_ratio: float, chunk_seconds: float = 1.0, cost: CostModel | None = None
    ) -> None:
        self.context_length = context_length
        self.attention_ratio = attention_ratio
        self.chunk_seconds = chunk_seconds
        self._cost = cost
        self._scale = 1.0
        self._best_scale = 1.0
        self._decode_step_s: float | None = cost.fixed_s if cost else None
        self._lock = threading.Lock()

    # -- what is known -------------------------------------------------------------------------------

    @property
    def calibrated(self) -> bool:
        return self._cost is not None

    def describe(self) -> dict[str, object]:
        """The current speeds, for /health and the logs."""
        if self._cost is None:
            return {"calibrated": False}
        return {
            "calibrated": True,
            "prompt_tokens_per_second": round(1 / self._row_seconds(1, 0, 256), 1),
            "decode_step_seconds": round(self.decode_step_s(1), 4),
            "chunk_seconds": self.chunk_seconds,
            "scale": round(self._scale, 3),
        }

    def _row_seconds(self, batch: int, start: int, tokens: int) -> float:
        assert self._cost is not None
        return self.estimate_pass(batch, start, tokens) / (batch * tokens)

    def estimate_pass(self, batch: int, start: int, tokens: int, *, admission: bool = False) -> float:
        """Seconds of one forward pass of this shape, on this CPU as measured so far (for `admission`: at the
        current speed, capped at WORST_VS_BEST times the best)."""
        if self._cost is None:
            return 0.0
        scale = min(self._scale, WORST_VS_BEST * self._best_scale) if admission else self._scale
        return self._cost.seconds(batch, start, tokens) * scale

    def decode_step_s(self, batch: int) -> float:
        """Seconds of one decoding step (one new token per row)."""
        if self._decode_step_s is None:
            return 0.0
        return max(self._decode_step_s, self.estimate_pass(batch, 0, 1))

    # -- decisions -------------------------------------------------------------------------------------

    def chunk_tokens(self, batch: int, seconds: float | None = None) -> int:
        """Prompt tokens per chunk for this batch size: about `seconds` (at least `chunk_seconds`) of work,
        whole rows."""
        if self._cost is None:
            return MAX_CHUNK_ROWS // batch or 1
        cost = self._cost
        seconds = max(seconds or 0.0, self.chunk_seconds)
        per_row = (cost.per_row_s + cost.per_row_ctx_s * self.context_length / 2) * self._scale
        rows = (seconds - cost.fixed_s * self._scale) / per_row if per_row > 0 else MAX_CHUNK_ROWS
        rows = int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, rows)))
        return max(1, rows // batch)

    def prompt_seconds(
        self, batch: int, width: int, start: int = 0, chunk: int | None = None, *, admission: bool = False
    ) -> float:
        """Estimated seconds to read prompt tokens `start`..`width` of `batch` rows, chunk by chunk."""
        chunk = chunk or self.chunk_tokens(batch)
        total, position = 0.0, start
        while position < width:
            tokens = min(chunk, width - position)
            total += self.estimate_pass(batch, position, tokens, admission=admission)
            position += tokens
        return total

    def largest_prompt(self, batch: int, available_s: float) -> int:
        """The longest prompt (tokens per row) that admission would accept with `available_s` left."""
        if self._cost is None:
            return self.context_length
        low, high = 0, self.context_length
        while low < high:
            mid = (low + high + 1) // 2
            if self.prompt_seconds(batch, mid, admission=True) <= available_s:
                low = mid
            else:
                high = mid - 1
        return low

    def admit(self, batch: int, width: int, available_s: float) -> Plan:
        """The plan of a request whose prompt pass fits `available_s`; PromptTooLongForDeadline otherwise."""
        chunk = self.chunk_tokens(batch)
        estimated = self.prompt_seconds(batch, width, chunk=chunk, admission=True)
        if estimated > available_s:
            raise PromptTooLongForDeadline(
                prompt_tokens=width,
                batch=batch,
                estimated_s=estimated,
                available_s=available_s,
                largest_prompt_tokens=self.largest_prompt(batch, available_s),
            )
        spare = available_s - estimated
        bigger = self.chunk_tokens(batch, SPARE_SHARE_PER_CHUNK * spare)
        if bigger > chunk:
            chunk = bigger
            estimated = self.prompt_seconds(batch, width, chunk=chunk, admission=True)
        return Plan(batch=batch, width=width, chunk_tokens=chunk, estimated_s=estimated)

    def check_rest(self, plan: Plan, done: int, available_s: float) -> None:
        """Between chunks: give up (PromptTooLongForDeadline) if the rest of the prompt no longer fits."""
        rest = self.prompt_seconds(plan.batch, plan.width, start=done, chunk=plan.chunk_tokens)
        if rest > available_s:
            raise PromptTooLongForDeadline(
                prompt_tokens=plan.width,
                batch=plan.batch,
                estimated_s=rest,
                available_s=available_s,
                largest_prompt_tokens=self.largest_prompt(plan.batch, available_s),
            )

    # -- learning --------------------------------------------------------------------------------------

    def learn(self, sample: PassSample) -> None:
        """Refine the speeds with a timed forward pass (a prompt chunk or a decode step)."""
        with self._lock:
            if sample.tokens <= 1:  # a decode step
                if self._cost is None:
                    self._decode_step_s = sample.seconds
                    return
                previous = self._decode_step_s or sample.seconds
                self._decode_step_s = previous + LEARNING_RATE * (sample.seconds - previous)
                return
            if self._cost is None:
                self._cost = CostModel.fit([sample], self.attention_ratio)
                self._scale = self._best_scale = 1.0
                return
            predicted = self._cost.seconds(sample.batch, sample.start, sample.tokens)
            if predicted <= 0:
                return
            observed = min(max(sample.seconds / predicted, SCALE_LIMITS[0]), SCALE_LIMITS[1])
            self._scale += LEARNING_RATE * (observed - self._scale)
            self._best_scale = min(self._best_scale, observed)

    def rescale(self, sample: PassSample) -> None:
        """Adopt this CPU's speed from one timed pass (the warm-up check), keeping the calibrated shape."""
        with self._lock:
            if self._cost is None:
                self._cost = CostModel.fit([sample], self.attention_ratio)
                self._scale = self._best_scale = 1.0
                return
            predicted = self._cost.seconds(sample.batch, sample.start, sample.tokens)
            if predicted > 0:
                self._scale = min(max(sample.seconds / predicted, SCALE_LIMITS[0]), SCALE_LIMITS[1])
                self._best_scale = self._scale

    def set_decode_step(self, seconds: float) -> None:
        with self._lock:
            self._decode_step_s = seconds
