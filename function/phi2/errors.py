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
