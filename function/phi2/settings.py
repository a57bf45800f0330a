"""Runtime configuration: one immutable object, read once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    return default


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class Settings:
    """Everything the function reads from its environment."""

    model_dir: Path
    """Directory written by `infra/prepare_model.py` (weights, tokenizer, manifest.json)."""
    dtype: str
    """`auto` serves the dtype the model was prepared in; `bfloat16`/`float32`/`float16` cast at load."""
    api_timeout_s: float
    """The timeout of the API Gateway integration in front of this function (`API_TIMEOUT_MS`, which the
    template sets next to the integration's `timeoutInMillis`): a request's deadline counts from when API
    Gateway received it. Default: API Gateway's 29 s."""
    deadline_margin_s: float
    """Kept free before every deadline for building and sending the response."""
    max_body_bytes: int
    """Requests with a larger body get 413 before any parsing."""
    num_threads: int | None
    """Torch intra-op threads; None sizes them to the vCPUs the process may use."""
    preload: bool
    """Start loading the model at import (init phase). On by default inside a Lambda runtime, off in unit tests."""
    load_in_background: bool
    """Load in a background thread so that init returns at once (on-demand environments, whose init phase is
    limited to 10 s), or fully during init (provisioned concurrency, whose init may take much longer).
    `MODEL_LOADING=background|init`; by default from AWS_LAMBDA_INITIALIZATION_TYPE."""
    prompt_chunk_seconds: float
    """Target duration of one chunk of the prompt pass: the deadline is checked between chunks."""
    warmup: bool
    """Run one short generation at load so the first request does not pay kernel initialisation."""
    verify_checksums: bool
    """Hash every model file against the manifest at load. Sizes are always checked; hashing costs
    about a second per gigabyte of cold start, so it is opt-in (preparation always hashes)."""
    log_text: bool
    """Log prompts and generated text. Off by default: they may be personal data."""
    service_name: str
    """Powertools service name: a key in every log line and a metrics dimension."""
    metrics_namespace: str
    """CloudWatch namespace of the EMF metrics."""
    stream_base_url: str
    """The base URL of the streaming API surface (`STREAM_BASE_URL`), named in the answer to `stream: true`
    sent to this buffered surface; empty when not configured."""
    health_wait_s: float
    """The longest `GET /health` waits for a model that is still loading (`HEALTH_WAIT_SECONDS`), within its
    own deadline: Lambda freezes an environment between requests, so a load advances only while some request
    runs, and a health check that did not wait would never see it finish. `?wait=0` answers at once."""
    stream_keepalive_s: float
    """On the streaming surface, how long an answer may stay silent while the function works before it sends
    bytes every reader ignores (`STREAM_KEEPALIVE_SECONDS`): an SSE comment, or whitespace before a JSON body.
    API Gateway ends a stream idle for 5 minutes (Regional endpoints; 30 s edge-optimised)."""
    prompt_cache: bool
    """Keep each request's prompt pass in the warm environment for the same caller's next request
    (`PROMPT_CACHE`, on by default; see engine/prefix_cache.py)."""
    prompt_cache_max_mb: int | None
    """A cap on the prompt cache's memory (`PROMPT_CACHE_MAX_MB`); by default it takes what the function's
    memory leaves after the model and the live request."""
    prompt_cache_ttl_s: float
    """An entry unused this long is never reused (`PROMPT_CACHE_TTL_SECONDS`, 600)."""
    prompt_cache_unauthenticated: bool
    """Let requests that carry no caller identity (no API key, no IAM principal) share one cache
    (`PROMPT_CACHE_UNAUTHENTICATED`, off: they share nothing)."""
    prompt_lookup_tokens: int | None
    """Prompt lookup decoding: drafted tokens verified per pass (`PROMPT_LOOKUP_TOKENS`; 0 turns it off; unset:
    the engine's default)."""


def _default_preload() -> bool:
    # Inside the Lambda runtime (real, or the RIE) this variable is always set.
    return bool(os.environ.get("AWS_LAMBDA_RUNTIME_API"))


def _load_in_background() -> bool:
    mode = os.environ.get("MODEL_LOADING", "auto").strip().lower()
    if mode in ("background", "init"):
        return mode == "background"
    # Provisioned concurrency initialises ahead of traffic with a long init limit: load fully, warm included.
    return os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand") != "provisioned-concurrency"


@cache
def get_settings() -> Settings:
    """The settings of this execution environment (read once, then cached)."""
    return Settings(
        model_dir=Path(os.environ.get("MODEL_DIR", "/opt/model")),
        dtype=os.environ.get("MODEL_DTYPE", "auto").strip().lower() or "auto",
        api_timeout_s=_float("API_TIMEOUT_MS", 29_000.0) / 1000,
        deadline_margin_s=_float("DEADLINE_MARGIN_SECONDS", 1.5),
        max_body_bytes=_int("MAX_BODY_BYTES", 128 * 1024) or 128 * 1024,
        num_threads=_int("TORCH_NUM_THREADS", None),
        preload=_bool("PRELOAD_MODEL", _default_preload()),
        load_in_background=_load_in_background(),
        prompt_chunk_seconds=_float("PROMPT_CHUNK_SECONDS", 1.0),
        warmup=_bool("WARMUP", True),
        verify_checksums=_bool("VERIFY_CHECKSUMS", False),
        log_text=_bool("LOG_TEXT", False),
        service_name=os.environ.get("POWERTOOLS_SERVICE_NAME", "phi2-text-generation"),
        metrics_namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Phi2TextGeneration"),
        stream_base_url=os.environ.get("STREAM_BASE_URL", "").strip(),
        prompt_cache=_bool("PROMPT_CACHE", True),
        prompt_cache_max_mb=_int("PROMPT_CACHE_MAX_MB", None),
        prompt_cache_ttl_s=_float("PROMPT_CACHE_TTL_SECONDS", 600.0),
        prompt_cache_unauthenticated=_bool("PROMPT_CACHE_UNAUTHENTICATED", False),
        prompt_lookup_tokens=_int("PROMPT_LOOKUP_TOKENS", None),
        health_wait_s=_float("HEALTH_WAIT_SECONDS", 20.0),
        stream_keepalive_s=_float("STREAM_KEEPALIVE_SECONDS", 30.0),
    )
