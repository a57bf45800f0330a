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


class ModelNotReady(ApiError):
    """The model could not be loaded in this execution environment."""

    status_code = 503
    code = "model_not_ready"


class ModelLoadError(Exception):
    """Loading or verifying the prepared model failed. The message names the problem, never a stack."""


INTERNAL_ERROR_MESSAGE = "internal error; quote the request_id when reporting it"
