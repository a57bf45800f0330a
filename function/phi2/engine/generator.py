"""The generator interface: what the protocols may ask of a model, with no AWS or HTTP types.

`get_generator()` is the seam: it loads the model once per execution environment and caches it (or
the reason it could not be loaded). Unit tests replace it with a fake; nothing here imports torch.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from phi2.engine.constrained.grammar import Grammar
from phi2.engine.model_files import prefetch
from phi2.errors import ModelLoadError, ModelLoading, ModelNotReady
from phi2.settings import get_settings

FinishReason = Literal["length", "eos_token", "stop_sequence", "time_limit", "cancelled"]
"""Why a completion ended. `cancelled`: the caller's `on_step` asked to stop (a streaming client left)."""

MAX_LOGPROBS = 20
"""The most alternatives per token a request may ask for (OpenAI's chat maximum)."""


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and stopping parameters of one request, already validated."""

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was already generated."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits at every step (OpenAI's `logit_bias`)."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    return_full_text: bool = True
    logprobs: int | None = None
    """None: no log-probabilities. k >= 0: the chosen token's log-probability and the k most likely
    alternatives at every generated position (from the model's raw distribution, before sampling controls)."""
    prompt_logprobs: bool = False
    """Also the log-probability of every prompt token after the first (with `logprobs` alternatives)."""
    min_p: float = 0.0
    """When sampling: drop tokens less likely than min_p times the most likely one (0: off)."""
    typical_p: float = 1.0
    """When sampling: typical sampling's probability mass (1: off)."""
    grammar: Grammar | None = None
    """Constrained decoding: every row's output follows this grammar (JSON Schema, Lark or regex)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token and its log-probability, with the most likely alternatives (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Completion:
    """One row's outcome."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    token_ids: tuple[int, ...] = ()
    """The generated ids counted in `generated_tokens` (up to and including the one that completed a stop
    string; never the end-of-text token)."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One per id of `token_ids` when `params.logprobs` is set."""
    prompt_token_ids: tuple[int, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """One per prompt token when `params.prompt_logprobs`; the first is None (nothing precedes it)."""
    seed: int | None = None
    """The seed of this row's sampler."""
    grammar_complete: bool | None = None
    """With `params.grammar`: whether the text is a whole sentence of the grammar (False: cut short, e.g. the JSON
    is incomplete); None without one."""
    cached_tokens: int = 0
    """Prompt tokens whose keys and values came from an earlier request of the same caller (prefix_cache.py):
    the prompt pass did not read them again."""


@dataclass(frozen=True)
class GenerationResult:
    """A batch's completions (one per row, in order) and its timings."""

    completions: list[Completion]
    seed: int
    time_to_first_token_s: float
    total_s: float
    tokens_per_second: float
    prompt_pass_s: float = 0.0
    """Time of the prompt's forward pass (all chunks), tokenization excluded."""
    prompt_chunks: int = 1


@dataclass(frozen=True)
class StepEvent:
    """What one decoding step produced for one row, for streaming.

    `text` is the new text that is now final: incrementally decoded (never a broken multi-byte character)
    and with any text that might begin a stop string held back until it is known not to be one. It may
    be empty. `finish_reason` is set on the row's last event.
    """

    row: int
    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: FinishReason | None = None


OnStep = Callable[[list[StepEvent]], bool]
"""Called once with no events when the request is admitted (before the prompt pass: a stream sends its first
bytes then), then after every decoding step with the rows' events; returning False stops generation
(`cancelled`)."""


@dataclass
class ModelInfo:
    """What `/health` and the logs say about the loaded model."""

    model_id: str
    dtype: str
    context_length: int
    load_seconds: float
    manifest: dict[str, object] = field(default_factory=dict)
    cpu: dict[str, object] = field(default_factory=dict)
    """The CPU's ISA as the libraries use it (capped capability included)."""
    kernels: dict[str, object] = field(default_factory=dict)
    """Which kernels the loaded model runs, by layer kind."""
    chat_template: bool = False
    """Whether the tokenizer ships a chat template."""
    vocab_size: int = 0
    """Rows of the model's output layer: valid token ids are below it."""


class Generator(ABC):
    """A loaded model that turns prompts into completions before a deadline."""

    info: ModelInfo

    @abstractmethod
    def generate(
        self,
        prompts: list[str],
        params: GenerationParams,
        deadline: float,
        *,
        seeds: Sequence[int] | None = None,
        on_step: OnStep | None = None,
        cache_scope: Hashable | None = None,
    ) -> GenerationResult:
        """Generate for every prompt as one batch; stop by `deadline` (a `time.monotonic()` value).

        `seeds` gives each row its own sampler seed (one per prompt; default: `params.seed` or a random one
        for every row), so a row samples the same text whatever else is in the batch.

        `cache_scope` says who may reuse this request's prompt pass, and whose earlier ones it may reuse (the
        caller, see phi2.runtime.invocation.cache_scope); None: nothing is reused or kept.

        Raises ContextLengthExceeded when a prompt plus `max_new_tokens` does not fit the context, and
        PromptTooLongForDeadline (before any compute, or between prompt chunks) when the prompt pass cannot
        finish by the deadline.
        """

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of `text` without special tokens."""

    @abstractmethod
    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text (a byte-level piece that is not valid UTF-8 alone decodes with U+FFFD)."""

    @abstractmethod
    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Each token's raw bytes (byte-level BPE pieces may be part of a multi-byte character)."""

    def check_grammar(self, grammar: Grammar) -> None:  # noqa: B027 - a generator without a compiler checks nothing more
        """Raise InvalidGrammar (naming `grammar.origin`) unless the grammar can constrain this model's output (the
        bounds Grammar itself checks are already met)."""

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The token ids of `text` (with the tokenizer's special tokens when asked)."""
        raise NotImplementedError

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of `token_ids` (special tokens included, as written)."""
        raise NotImplementedError

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        """The prompt for a chat, with the tokenizer's own template; None when it ships none."""
        return None

    def speeds(self) -> dict[str, object]:
        """The measured speeds the deadline decisions use (for /health)."""
        return {}


_lock = threading.Lock()
_ready = threading.Event()
_generator: Generator | None = None
_load_error: str | None = None
_loader: threading.Thread | None = None
_load_started: float | None = None


def _load() -> None:
    """Load the model once (whichever thread gets here first); remember the model or why it failed."""
    global _generator, _load_error, _load_started
    with _lock:
        if _generator is not None or _load_error is not None:
            return
        settings = get_settings()
        prefetch(settings.model_dir)  # the disk reads the weights while torch is imported
        from phi2.engine.hf_generator import TransformersGenerator  # torch is imported only when a model is loaded

        _load_started = _load_started or time.monotonic()
        try:
            _generator = TransformersGenerator.load(
                settings.model_dir,
                dtype=settings.dtype,
                num_threads=settings.num_threads,
                warmup=settings.warmup,
                verify_checksums=settings.verify_checksums,
                chunk_seconds=settings.prompt_chunk_seconds,
                prompt_cache=settings.prompt_cache,
                prompt_cache_mb=settings.prompt_cache_max_mb,
                prompt_cache_ttl_s=settings.prompt_cache_ttl_s,
                lookup_tokens=settings.prompt_lookup_tokens,
            )
        except ModelLoadError as exc:
            _load_error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a loader bug must not kill the loading thread silently
            _load_error = f"unexpected {type(exc).__name__} while loading: {exc}"
        finally:
            _ready.set()


def start_loading(background: bool, on_done: Callable[[], None] | None = None) -> None:
    """Start loading the model: in a background thread (init returns at once), or right here. `on_done`
    runs after the load, successful or not, in the loading thread."""
    global _loader, _load_started
    if _generator is not None or _loader is not None:
        return
    _load_started = time.monotonic()

    def load_and_report() -> None:
        _load()
        if on_done is not None:
            on_done()

    if background:
        _loader = threading.Thread(target=load_and_report, name="model-load", daemon=True)
        _loader.start()
    else:
        load_and_report()


def get_generator(wait_s: float | None = None) -> Generator:
    """The model of this execution environment, loaded on first use and kept warm.

    While a background load is under way, wait for it for at most `wait_s` seconds (None: as long as it
    takes), then raise ModelLoading (503 with Retry-After). A failed load is remembered: later requests
    fail fast with ModelNotReady instead of retrying a multi-gigabyte load that will fail the same way.
    """
    if _generator is not None:
        return _generator
    if _loader is not None and not _ready.is_set():
        if not _ready.wait(timeout=None if wait_s is None else max(0.0, wait_s)):
            loading_for = time.monotonic() - (_load_started or time.monotonic())
            raise ModelLoading(loading_for)
    else:
        _load()
    if _generator is None:
        # The reason (which names files) goes to the logs at load time, not to callers.
        raise ModelNotReady("the model failed to load in this execution environment; see the function's logs")
    return _generator


def load_status() -> tuple[Generator | None, str | None]:
    """The loaded generator or the load error, without triggering a load."""
    return _generator, _load_error


def loading() -> bool:
    """True while a background load is under way."""
    return _loader is not None and not _ready.is_set()
