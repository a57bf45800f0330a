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
    generation_budget_s: float
    """Wall-clock budget of one generation. API Gateway drops a request at 29 s, so keep it well under."""
    deadline_margin_s: float
    """Kept free before the Lambda timeout for serialising the response."""
    max_body_bytes: int
    """Requests with a larger body get 413 before any parsing."""
    num_threads: int | None
    """Torch intra-op threads; None sizes them to the vCPUs the process may use."""
    preload: bool
    """Load the model at import (init phase). On by default inside a Lambda runtime, off in unit tests."""
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


def _default_preload() -> bool:
    # Inside the Lambda runtime (real, or the RIE) this variable is always set.
    return bool(os.environ.get("AWS_LAMBDA_RUNTIME_API"))


@cache
def get_settings() -> Settings:
    """The settings of this execution environment (read once, then cached)."""
    return Settings(
        model_dir=Path(os.environ.get("MODEL_DIR", "/opt/model")),
        dtype=os.environ.get("MODEL_DTYPE", "auto").strip().lower() or "auto",
        generation_budget_s=_float("GENERATION_BUDGET_SECONDS", 25.0),
        deadline_margin_s=_float("DEADLINE_MARGIN_SECONDS", 1.5),
        max_body_bytes=_int("MAX_BODY_BYTES", 128 * 1024) or 128 * 1024,
        num_threads=_int("TORCH_NUM_THREADS", None),
        preload=_bool("PRELOAD_MODEL", _default_preload()),
        warmup=_bool("WARMUP", True),
        verify_checksums=_bool("VERIFY_CHECKSUMS", False),
        log_text=_bool("LOG_TEXT", False),
        service_name=os.environ.get("POWERTOOLS_SERVICE_NAME", "phi2-text-generation"),
        metrics_namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Phi2TextGeneration"),
    )
