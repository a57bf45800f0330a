"""Typed errors. Each carries its HTTP status and a stable code: the handler maps them in one place."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error the caller should see, with its HTTP status."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.headers: dict[str, str] = {}


class InvalidJson(ApiError):
    status_code = 400
    code = "invalid_json"


class BadRequest(ApiError):
    status_code = 400
    code = "bad_request"


class NotFound(ApiError):
    status_code = 404
    code = "not_found"


class MethodNotAllowed(ApiError):
    status_code = 405
    code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status_code = 415
    code = "unsupported_media_type"


class ValidationFailed(ApiError):
    status_code = 422
    code = "validation_error"


class InvalidGrammar(ApiError):
    """A JSON Schema or grammar that constrained decoding cannot follow: malformed, an unsupported keyword, over
    a limit, or (found while generating) too complex for the library's per-token limits. `param` names the request
    field it came from; `code` says which: invalid_json_schema, invalid_grammar or grammar_too_complex."""

    status_code = 422
    code = "invalid_grammar"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        if code:
            self.code = code
        super().__init__(message, details=[{"field": param or "body", "message": message, "type": self.code}])
        self.param = param


class ContextLengthExceeded(ApiError):
    """Prompt tokens plus requested new tokens do not fit the model's context window."""

    status_code = 422
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        super().__init__(
            f"prompt has {prompt_tokens} tokens and max_new_tokens is {max_new_tokens}: "
            f"{prompt_tokens + max_new_tokens} exceeds the model's context of {context_length} tokens",
            details=[
                {
                    "prompt_tokens": prompt_tokens,
                    "max_new_tokens": max_new_tokens,
                    "context_length": context_length,
                }
            ],
        )


class MemoryLimitExceeded(ApiError):
    """The request's KV cache and working memory would not fit in what is left of the function's memory: refused
    before anything is allocated (Lambda would otherwise kill the environment, and the caller would get a 502)."""

    status_code = 422
    code = "insufficient_memory"

    def __init__(
        self, *, needed_bytes: int, kv_cache_bytes: int, available_bytes: int, limit_bytes: int, largest_new_tokens: int
    ) -> None:
        mib = 2**20
        fits = (
            f"with this prompt, at most {largest_new_tokens} new tokens fit"
            if largest_new_tokens > 0
            else "a shorter prompt or fewer prompts would"
        )
        super().__init__(
            f"this request needs about {needed_bytes // mib} MiB of memory (its KV cache {kv_cache_bytes // mib} MiB), "
            f"but only {available_bytes // mib} MiB of the function's {limit_bytes // mib} MiB are free: {fits}, "
            "or deploy the function with a larger MemorySize",
            details=[
                {
                    "needed_bytes": needed_bytes,
                    "kv_cache_bytes": kv_cache_bytes,
                    "available_bytes": available_bytes,
                    "memory_limit_bytes": limit_bytes,
                    "largest_max_new_tokens": largest_new_tokens,
                }
            ],
        )
        self.largest_new_tokens = largest_new_tokens


class PromptTooLongForDeadline(ApiError):
    """The prompt's forward pass alone cannot finish before the request's deadline: refused unread."""

    status_code = 422
    code = "prompt_too_long_for_deadline"

    def __init__(
        self, *, prompt_tokens: int, batch: int, estimated_s: float, available_s: float, largest_prompt_tokens: int
    ) -> None:
        fits = (
            f"the largest prompt that fits now is {largest_prompt_tokens} tokens"
            + (f" per prompt for a batch of {batch}" if batch > 1 else "")
            if largest_prompt_tokens > 0
            else "no prompt fits the time left"
        )
        super().__init__(
            f"reading a prompt of {prompt_tokens} tokens"
            + (f" x {batch} prompts" if batch > 1 else "")
            + f" takes about {estimated_s:.1f} s, but only {max(0.0, available_s):.1f} s are left before the "
            f"deadline: {fits}",
            details=[
                {
                    "prompt_tokens": prompt_tokens,
                    "batch": batch,
                    "estimated_prompt_seconds": round(estimated_s, 2),
                    "available_seconds": round(max(0.0, available_s), 2),
                    "largest_prompt_tokens": largest_prompt_tokens,
                }
            ],
        )
        self.prompt_tokens = prompt_tokens
        self.batch = batch
        self.largest_prompt_tokens = largest_prompt_tokens


class ModelNotReady(ApiError):
    """The model could not be loaded in this execution environment."""

    status_code = 503
    code = "model_not_ready"


class ModelLoading(ApiError):
    """The model is still loading in this (new) execution environment and was not ready by the deadline."""

    status_code = 503
    code = "model_loading"

    def __init__(self, loading_for_s: float) -> None:
        super().__init__(
            f"the model has been loading for {loading_for_s:.0f} s in this new execution environment and was not "
            "ready in time for this request; retry shortly (see Retry-After)"
        )
        # A load takes about as long again as it already has at worst; ask for a retry within that, bounded.
        self.headers = {"Retry-After": str(int(min(30, max(2, loading_for_s))))}


class ModelLoadError(Exception):
    """Loading or verifying the prepared model failed. The message names the problem, never a stack."""


INTERNAL_ERROR_MESSAGE = "internal error; quote the request_id when reporting it"
