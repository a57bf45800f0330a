"""The generator interface: what the handler may ask of a model, with no AWS or HTTP types.

`get_generator()` is the seam: it loads the model once per execution environment and caches it (or
the reason it could not be loaded). Unit tests replace it with a fake; nothing here imports torch.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal

from .errors import ModelLoadError, ModelNotReady
from .settings import get_settings

FinishReason = Literal["length", "eos_token", "stop_sequence", "time_limit"]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and stopping parameters of one request, already validated."""

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    return_full_text: bool = True


@dataclass(frozen=True)
class Completion:
    """One prompt's outcome."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class GenerationResult:
    """A batch's completions (one per prompt, in order) and its timings."""

    completions: list[Completion]
    seed: int
    time_to_first_token_s: float
    total_s: float
    tokens_per_second: float


@dataclass
class ModelInfo:
    """What `/health` and the logs say about the loaded model."""

    model_id: str
    dtype: str
    context_length: int
    load_seconds: float
    manifest: dict[str, object] = field(default_factory=dict)


class Generator(ABC):
    """A loaded model that turns prompts into completions before a deadline."""

    info: ModelInfo

    @abstractmethod
    def generate(self, prompts: list[str], params: GenerationParams, deadline: float) -> GenerationResult:
        """Generate for every prompt as one batch; stop by `deadline` (a `time.monotonic()` value).

        Raises ContextLengthExceeded when a prompt plus `max_new_tokens` does not fit the context.
        """


def deadline_from(budget_s: float, remaining_s: float, margin_s: float, now: float | None = None) -> float:
    """The monotonic time by which generation must end.

    The smaller of the configured budget and what the Lambda invocation has left minus a margin for
    building the response; never in the past.
    """
    now = time.monotonic() if now is None else now
    return now + max(0.0, min(budget_s, remaining_s - margin_s))


_lock = threading.Lock()
_generator: Generator | None = None
_load_error: str | None = None


def get_generator() -> Generator:
    """The model of this execution environment, loaded on first use and kept warm.

    A failed load is remembered: later requests fail fast with ModelNotReady instead of retrying a
    multi-gigabyte load that will fail the same way.
    """
    global _generator, _load_error
    if _generator is not None:
        return _generator
    with _lock:
        if _generator is None and _load_error is None:
            from .hf_generator import TransformersGenerator  # torch is imported only when a model is

            settings = get_settings()
            try:
                _generator = TransformersGenerator.load(
                    settings.model_dir,
                    dtype=settings.dtype,
                    num_threads=settings.num_threads,
                    warmup=settings.warmup,
                    verify_checksums=settings.verify_checksums,
                )
            except ModelLoadError as exc:
                _load_error = str(exc)
    if _generator is None:
        # The reason (which names files) goes to the logs at load time, not to callers.
        raise ModelNotReady("the model failed to load in this execution environment; see the function's logs")
    return _generator


def load_status() -> tuple[Generator | None, str | None]:
    """The loaded generator or the load error, without triggering a load."""
    return _generator, _load_error
