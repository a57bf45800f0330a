"""What a request may cost: decided before any compute, and re-decided between prompt chunks.

The prompt's forward pass cannot be interrupted once a chunk is running, so the planner
- knows this model's speeds on this execution environment: a cost model of one forward pass,
  `matmul(rows) + rows x per_row_ctx x context` (rows = batch x chunk tokens; `matmul` piecewise linear
  through measured passes; the last term is attention, which grows with the context), calibrated when
  the model is prepared (`calibration.json`, the fastest of two timings of each shape), moved to this CPU
  at warm-up by a timed decode step and a short prompt pass, and refined from every chunk and decode step
  of real requests;
- admits a request only if its whole prompt pass fits before the deadline (else PromptTooLongForDeadline,
  naming the largest prompt that fits for that batch size), before anything is computed. Admission
  assumes the current speed, but never worse than twice the best speed measured here: a burst of noise
  must not make the function refuse everything (a refused request measures nothing, so it could never
  recover). Admission considers every chunk size it may use, so a prompt is not refused for the cost
  of chunks smaller than its time allows;
- cuts the prompt into chunks, and between chunks gives up as soon as the rest no longer fits at the speed
  this request has shown so far: a wrong estimate overruns by at most one chunk. A chunk takes about
  `chunk_seconds` when time is short; with time to spare chunks grow, as long as each starts with at least
  CHUNK_SLOWDOWN times its estimate left (so it could run that much slower and still end in time), because
  every chunk reads every weight once more: for an int8 Phi-2 on two vCPUs, 1-second chunks made a
  512-token prompt take ~1.9x the time of one pass.

No AWS types and no torch here: the generator feeds it measurements and asks it questions.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi2.errors import PromptTooLongForDeadline

CALIBRATION_FILE = "calibration.json"
# 2: the fastest of two timings per shape (1 was one timing, which a busy machine could skew).
CALIBRATION_VERSION = 2
# Measured speeds move estimates by this weight (an exponential moving average): a noisy request does
# not swing the next admission, a persistently slower CPU is learnt within a few requests.
LEARNING_RATE = 0.3
# Admission assumes the current speed, but never more than this many times slower than the best seen.
WORST_VS_BEST = 2.0
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 2048
# Every chunk larger than `chunk_seconds` must start with at least this many times its estimate left. The
# first chunk's cover is for a wrong speed; after it, this request's own timings correct the estimate of the
# rest (check_rest), so later chunks need cover only for a burst. (A quarter of the spare time, i.e. 5x
# cover for the last chunk, refused a SmolLM2 prompt whose one pass took 45 % of the time left as soon as
# the estimate was 15 % pessimistic.)
CHUNK_SLOWDOWN = 2.0
# Admission tries the prompt in 1 to this many equal chunks (and in `chunk_seconds` chunks).
MAX_PLAN_CHUNKS = 16
# A measured speed moves the model by at most this factor either way: a pass timed during a freeze or a
# burst must not make it absurd.
SCALE_LIMITS = (0.05, 20.0)
# Constrained decoding adds a grammar mask per row to every decode step (constrained/matcher.py): its cost until
# one is measured here. llguidance's median is ~6 us on Phi-2's vocabulary, and applying the mask ~0.1 ms; this
# errs high (a step estimated long ends generation a step early, never late).
MASK_ROW_S = 0.001


@dataclass(frozen=True)
class PassSample:
    """One timed forward pass: `batch` rows of `tokens` new tokens after `start` tokens of context."""

    batch: int
    start: int
    tokens: int
    seconds: float


@dataclass(frozen=True)
class CostModel:
    """Seconds of one forward pass, as a function of its shape: `matmul(rows) + rows x per_row_ctx x context`.

    `matmul` is piecewise linear through measured points (rows = batch x new tokens), not one line: the
    quantized formats switch kernels at a row threshold (formats/int8.py, int4.py), and a GEMM gets cheaper per
    row as it grows, so a line fitted through 1 to 256 rows misjudges both ends. Beyond the last point it grows
    by `tail_per_row_s`.
    """

    rows: tuple[int, ...]
    """Increasing row counts at which `matmul` was measured."""
    matmul_s: tuple[float, ...]
    """Seconds at those rows, attention excluded (non-decreasing); below the first, the first."""
    tail_per_row_s: float
    """Seconds per row beyond the last point."""
    per_row_ctx_s: float
    """Per token row and context position: attention."""

    @classmethod
    def linear(cls, fixed_s: float, per_row_s: float, per_row_ctx_s: float) -> CostModel:
        """`fixed + rows x per_row`: a pass that reads every weight once, plus the matmuls."""
        return cls(rows=(0,), matmul_s=(fixed_s,), tail_per_row_s=per_row_s, per_row_ctx_s=per_row_ctx_s)

    def matmul(self, rows: float) -> float:
        points = self.rows
        if rows >= points[-1]:
            return self.matmul_s[-1] + (rows - points[-1]) * self.tail_per_row_s
        if rows <= points[0]:
            return self.matmul_s[0]
        i = bisect.bisect_right(points, rows)
        (r0, r1), (s0, s1) = points[i - 1 : i + 1], self.matmul_s[i - 1 : i + 1]
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)

    def seconds(self, batch: int, start: int, tokens: int) -> float:
        rows = batch * tokens
        return self.matmul(rows) + rows * self.per_row_ctx_s * (start + tokens / 2)

    @classmethod
    def fit(cls, samples: Iterable[PassSample], attention_ratio: float) -> CostModel:
        """Through timed passes: the fastest pass of each row count, made non-decreasing.

        `attention_ratio` is attention's cost per context position relative to a row's matmul cost, from
        the architecture (4 x layers x hidden FLOPs per position against 2 x linear parameters), applied to
        what one more row costs at the largest timed pass. A single pass cannot separate a fixed part: it is
        all charged per row, which overestimates, never under.
        """
        samples = list(samples)
        if not samples:
            raise ValueError("no timed passes to fit")

        def points(per_row_ctx: float) -> tuple[list[int], list[float]]:
            fastest: dict[int, float] = {}
            for s in samples:
                rows = s.batch * s.tokens
                matmul = max(s.seconds - rows * per_row_ctx * (s.start + s.tokens / 2), 0.0)
                fastest[rows] = min(fastest.get(rows, matmul), matmul)
            rows = sorted(fastest)
            return rows, list(itertools.accumulate((fastest[r] for r in rows), max))

        def slope(rows: list[int], seconds: list[float]) -> float:
            """What one more row costs at the largest timed pass."""
            if len(rows) == 1:
                return seconds[0] / rows[0]
            return max((seconds[-1] - seconds[-2]) / (rows[-1] - rows[-2]), 0.0)

        per_row_ctx = 0.0
        for _ in range(4):  # attention's share of the timed passes is small: this converges at once
            per_row_ctx = attention_ratio * slope(*points(per_row_ctx))
        rows, seconds = points(per_row_ctx)
        # Beyond the largest pass, never below that pass's own cost per row: past a few hundred rows a GEMM's
        # cost per row stops falling, and the last segment may span a kernel switch (a format's row threshold)
        per_row = max(slope(rows, seconds), seconds[-1] / rows[-1])
        if len(rows) == 1:
            rows, seconds = [0], [0.0]
        return cls(rows=tuple(rows), matmul_s=tuple(seconds), tail_per_row_s=per_row, per_row_ctx_s=per_row_ctx)

    def adapted(self, decode_step_s: float | None, sample: PassSample) -> CostModel:
        """This model moved to another CPU from two passes timed there: a decode step (nearly all reading the
        weights, which memory bandwidth sets) and a short prompt pass (whose rows the ISA sets). Both ends
        move independently; the calibrated shape in between is kept. Without a decode step, or when the two
        disagree (noise), everything scales by the prompt pass alone."""
        one = self.matmul(1)
        predicted = self.seconds(sample.batch, sample.start, sample.tokens) - one
        observed = sample.seconds - (decode_step_s or 0.0)
        if not decode_step_s or one <= 0 or predicted <= 0 or observed <= 0:
            k = _clamp(sample.seconds / max(self.seconds(sample.batch, sample.start, sample.tokens), 1e-9))
            k_fixed = k_rows = k
        else:
            k_fixed, k_rows = _clamp(decode_step_s / one), _clamp(observed / predicted)
        return CostModel(
            rows=self.rows,
            matmul_s=tuple(k_fixed * one + k_rows * (s - one) for s in self.matmul_s),
            tail_per_row_s=self.tail_per_row_s * k_rows,
            per_row_ctx_s=self.per_row_ctx_s * k_rows,
        )


def _clamp(ratio: float) -> float:
    return min(max(ratio, SCALE_LIMITS[0]), SCALE_LIMITS[1])


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
    start: int = 0
    """Prompt tokens (per row) whose keys and values are already cached: the pass reads `start`..`width`."""

    @property
    def chunks(self) -> int:
        return max(1, math.ceil((self.width - self.start) / self.chunk_tokens))


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
        self._decode_step_s: float | None = cost.matmul(1) if cost else None
        self._lock = threading.Lock()
        self._mask_row_s = MASK_ROW_S
        self._verify_scale = 1.0
        """Prompt lookup's verification passes (the last token and drafted ones) vs the cost model's estimate for
        their shape: learned apart from `_scale`, which they must not move (see learn_verification)."""

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
            "grammar_mask_seconds_per_row": round(self._mask_row_s, 6),
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

    def mask_step_s(self, rows: int) -> float:
        """Seconds that constrained decoding adds to a decoding step of `rows` rows (their grammar masks)."""
        return rows * self._mask_row_s

    def learn_mask(self, seconds_per_row: float) -> None:
        """Refine the grammar mask's cost per row and step with a request's own measurement."""
        with self._lock:
            self._mask_row_s += LEARNING_RATE * (seconds_per_row - self._mask_row_s)

    def step_s(self, batch: int, tokens: int = 1, context: int = 0) -> float:
        """Seconds of one decoding step that feeds `tokens` tokens per row: 1, or (prompt lookup) the last token
        and the drafted ones it verifies in the same pass, after `context` positions."""
        if tokens <= 1:
            return self.decode_step_s(batch)
        verify = self._cost.seconds(batch, context, tokens) * self._verify_scale if self._cost is not None else 0.0
        return max(self.decode_step_s(batch), verify)

    def learn_verification(self, sample: PassSample) -> None:
        """Refine the estimate of a decoding step that verifies drafted tokens (prompt lookup) with a timed one.
        Kept apart from the prompt-pass speed: a few-row pass runs a different kernel than a prompt chunk (the
        quantized formats switch at a row threshold) and costs more than the calibrated line says, so learning
        them as prompt passes made a long decode inflate the next request's admission estimate."""
        with self._lock:
            if self._cost is None:
                return
            predicted = self._cost.seconds(sample.batch, sample.start, sample.tokens)
            if predicted > 0:
                self._verify_scale += LEARNING_RATE * (_clamp(sample.seconds / predicted) - self._verify_scale)

    # -- decisions -------------------------------------------------------------------------------------

    def chunk_tokens(self, batch: int, seconds: float | None = None) -> int:
        """Prompt tokens per chunk for this batch size: about `seconds` (at least `chunk_seconds`) of work at
        the current speed, attention counted at mid-context, whole rows."""
        if self._cost is None:
            return MAX_CHUNK_ROWS // batch or 1
        cost, middle = self._cost, self.context_length / 2
        seconds = max(seconds or 0.0, self.chunk_seconds) / self._scale
        low, high = MIN_CHUNK_ROWS, MAX_CHUNK_ROWS
        while low < high:  # the largest row count that fits, or the least
            mid = (low + high + 1) // 2
            if cost.matmul(mid) + mid * cost.per_row_ctx_s * middle <= seconds:
                low = mid
            else:
                high = mid - 1
        return max(1, low // batch)

    def chunk_costs(
        self, batch: int, width: int, start: int = 0, chunk: int | None = None, *, admission: bool = False
    ) -> list[float]:
        """Estimated seconds of each chunk that reads prompt tokens `start`..`width` of `batch` rows."""
        chunk = chunk or self.chunk_tokens(batch)
        return [
            self.estimate_pass(batch, position, min(chunk, width - position), admission=admission)
            for position in range(start, width, chunk)
        ]

    def prompt_seconds(
        self, batch: int, width: int, start: int = 0, chunk: int | None = None, *, admission: bool = False
    ) -> float:
        """Estimated seconds to read prompt tokens `start`..`width` of `batch` rows, chunk by chunk."""
        return sum(self.chunk_costs(batch, width, start, chunk, admission=admission))

    def plan(self, batch: int, width: int, available_s: float, start: int = 0) -> Plan | None:
        """The fastest admissible way to read this prompt (from token `start`: the ones before it are cached) in
        `available_s`, or None if there is none.

        It tries the prompt cut into 1 to MAX_PLAN_CHUNKS equal chunks, each of which must start with
        CHUNK_SLOWDOWN times its estimate left, and `chunk_seconds` chunks, which are always allowed (the margin
        covers one of them), and keeps the plan with the fewest chunks that fits: every chunk reads every weight
        once more, so a prompt is cut only as far as its deadline needs (a cost model that estimated two chunks a
        little cheaper than one, from noisy timings, once cut a far-deadline prompt into chunks that took 2.5x
        one pass). Admission estimates at the admission speed (see estimate_pass).
        """
        rest = width - start
        base = min(self.chunk_tokens(batch), rest) or 1
        largest = max(MAX_CHUNK_ROWS // batch, base)
        candidates = {base} | {c for n in range(1, MAX_PLAN_CHUNKS + 1) if base < (c := -(-rest // n)) <= largest}
        for chunk in sorted(candidates, reverse=True):  # fewest chunks first
            costs = self.chunk_costs(batch, width, start, chunk=chunk, admission=True)
            estimated = sum(costs)
            if estimated > available_s:
                continue
            if chunk > base:
                started = itertools.accumulate(costs[:-1], initial=0.0)  # the estimated time before each
                if any(CHUNK_SLOWDOWN * c > available_s - t for c, t in zip(costs, started, strict=True)):
                    continue
            return Plan(batch=batch, width=width, chunk_tokens=chunk, estimated_s=estimated, start=start)
        return None

    def largest_prompt(self, batch: int, available_s: float) -> int:
        """The longest prompt (tokens per row) that admission would accept with `available_s` left."""
        if self._cost is None:
            return self.context_length
        low, high = 0, self.context_length
        while low < high:
            mid = (low + high + 1) // 2
            if self.plan(batch, mid, available_s) is not None:
                low = mid
            else:
                high = mid - 1
        return low

    def admit(self, batch: int, width: int, available_s: float, start: int = 0) -> Plan:
        """The plan of a request whose prompt pass (tokens `start`..`width`: the ones before are cached) fits
        `available_s`; PromptTooLongForDeadline otherwise."""
        plan = self.plan(batch, width, available_s, start)
        if plan is None:
            raise PromptTooLongForDeadline(
                prompt_tokens=width,
                batch=batch,
                estimated_s=self.prompt_seconds(batch, width, start, admission=True),
                available_s=available_s,
                largest_prompt_tokens=self.largest_prompt(batch, available_s),
            )
        return plan

    def check_rest(self, plan: Plan, done: int, available_s: float, spent_s: float = 0.0) -> None:
        """Between chunks: give up (PromptTooLongForDeadline) if the rest of the prompt no longer fits, at the
        current speed or, if this request's chunks so far (`spent_s` for `done` tokens) ran slower than it
        says, at theirs: the moving average learns a slow CPU over requests, this request cannot wait."""
        rest = self.prompt_seconds(plan.batch, plan.width, start=done, chunk=plan.chunk_tokens)
        expected = self.prompt_seconds(plan.batch, done, start=plan.start, chunk=plan.chunk_tokens)
        if expected > 0 and spent_s > expected:
            rest *= spent_s / expected
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
            observed = _clamp(sample.seconds / predicted)
            self._scale += LEARNING_RATE * (observed - self._scale)
            self._best_scale = min(self._best_scale, observed)

    def rescale(self, sample: PassSample, decode_step_s: float | None = None) -> None:
        """Adopt this CPU's speeds from the warm-up check: a short prompt pass and, when timed, a decode step
        (see CostModel.adapted); the calibrated shape is kept."""
        with self._lock:
            if self._cost is None:
                self._cost = CostModel.fit([sample], self.attention_ratio)
            else:
                self._cost = self._cost.adapted(decode_step_s, sample)
            self._scale = self._best_scale = 1.0
            if decode_step_s:
                self._decode_step_s = decode_step_s

    def set_decode_step(self, seconds: float) -> None:
        with self._lock:
            self._decode_step_s = seconds
