"""OpenAI's error shape and status codes for the `/v1` routes, so that clients raise their typed exceptions.

The handler maps every error in one place; for a path this module claims (`is_openai_path`) it renders the
error with `render` instead of the native shape: `{"error": {"message", "type", "param", "code"}}`, 400 for
any invalid request (a context overflow keeps the code `context_length_exceeded`, which LangChain's and
LiteLLM's context fallbacks look for), 404 for an unknown model or route. The request id travels in the
`x-request-id` header, where the SDK reads it.
"""

from __future__ import annotations

import re
from typing import Any

from phi2 import errors
from phi2.api.openai.protocol import OpenAIError, OpenAIErrorResponse

# First path segments (after an optional /v1) that belong to OpenAI's API: an unknown route under them gets
# OpenAI's 404, so an SDK pointed here for an endpoint this server lacks raises NotFoundError. `tokenize` and
# `detokenize` are vLLM's extensions of the same server, answered in the same shape.
OPENAI_RESOURCES = frozenset(
    {
        "assistants",
        "audio",
        "batches",
        "chat",
        "completions",
        "containers",
        "conversations",
        "edits",
        "embeddings",
        "engines",
        "evals",
        "files",
        "fine_tuning",
        "images",
        "models",
        "moderations",
        "realtime",
        "responses",
        "threads",
        "tokenize",
        "detokenize",
        "uploads",
        "vector_stores",
        "videos",
    }
)
SERVED = (
    "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{model}, POST /v1/tokenize, "
    "POST /v1/detokenize"
)
REQUEST_ID_HEADER = "x-request-id"
# pydantic error types -> OpenAI's error codes.
_VALIDATION_CODES = {
    "missing": "missing_required_parameter",
    "extra_forbidden": "unknown_parameter",
    "unsupported_value": "unsupported_value",
}
# Our fields are snake_case; anything else in an error's location is pydantic naming a branch of a union
# (`constrained-str`, `list[ContentPart]`, `literal['none','auto']`), which the caller never wrote.
_FIELD_PART = re.compile(r"[a-z_][a-z0-9_]*|\d+")
_TYPE_NAMES = {"str", "int", "float", "bool"}


class InvalidValue(errors.ApiError):
    """A field's value is well-formed but not allowed here (e.g. top_logprobs without logprobs)."""

    status_code = 400
    code = "invalid_value"

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedValue(InvalidValue):
    """A documented field set to a value this server cannot honour (it is refused, never ignored)."""

    code = "unsupported_value"


class ModelNotFound(errors.ApiError):
    status_code = 404
    code = "model_not_found"
    param = "model"


def is_openai_path(path: str | None) -> bool:
    """Whether an error on this request path is answered in OpenAI's shape (`/generate` keeps its own, with or
    without a leading `/v1`)."""
    if not isinstance(path, str):
        return False
    path = path.removeprefix("/v1") if path.startswith("/v1/") else path
    return path.lstrip("/").split("/", 1)[0] in OPENAI_RESOURCES


def _param(loc: str) -> str:
    """`messages.0.content.list[ContentPart].1.type` -> `messages[0].content[1].type`: OpenAI's way of naming a
    field inside a list, without pydantic's union branches."""
    out = ""
    for part in loc.split("."):
        if not _FIELD_PART.fullmatch(part) or part in _TYPE_NAMES:
            continue
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _within(field: str, other: str) -> bool:
    return field == other or field.startswith((other + ".", other + "["))


def _relevant(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The problems worth reporting: for a union (`stop`: a string or a list), pydantic reports every branch
    that failed; a branch whose only complaint is the input's type ("should be a valid list") is dropped
    when another branch says what is wrong with the input as sent."""
    fields = [_param(str(d.get("field", ""))) for d in details]
    kept = []
    for i, detail in enumerate(details):
        mismatch = str(detail.get("type", "")).endswith("_type")
        deeper = any(j != i and _within(f, fields[i]) for j, f in enumerate(fields))
        if not (mismatch and deeper):
            kept.append({**detail, "field": fields[i]})
    return kept or [{**details[0], "field": fields[0]}]


def _prompt_param(path: str) -> str:
    return "messages" if "chat" in path else "prompt"


def _detail(exc: errors.ApiError, method: str, path: str) -> OpenAIError:
    kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
    param = getattr(exc, "param", None)
    code: str | None = exc.code
    message = exc.message
    if isinstance(exc, errors.ContextLengthExceeded):
        facts = exc.details[0]
        prompt, completion, context = facts["prompt_tokens"], facts["max_new_tokens"], facts["context_length"]
        where = _prompt_param(path)
        # OpenAI's own wording: LiteLLM recognises a context overflow by it.
        message = (
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the {where}, {completion} in the completion). "
            f"Please reduce the length of the {where} or completion."
        )
        param = where
    elif isinstance(exc, errors.PromptTooLongForDeadline):
        param = _prompt_param(path)
    elif isinstance(exc, errors.ValidationFailed) and exc.details:
        details = _relevant(exc.details)
        first = details[0]
        param = first["field"] or None
        code = _VALIDATION_CODES.get(str(first.get("type")), "invalid_value")
        if first.get("type") == "extra_forbidden" and len(details) == 1:
            message = f"Unrecognized request argument supplied: {param}"
        else:
            problems = "; ".join(f"{d['field'] or 'body'}: {d.get('message', '')}" for d in details)
            message = f"Invalid request: {problems}"
    elif isinstance(exc, errors.NotFound):
        message = f"Invalid URL ({method} {path}): this server serves {SERVED}"
        code = "unknown_url"
    elif exc.status_code >= 500 and exc.code == "internal_error":
        message = "internal error; quote the x-request-id header when reporting it"
    return OpenAIError(message=message, type=kind, param=param, code=code)


def render(exc: errors.ApiError, method: str, path: str) -> dict[str, Any]:
    """The body of `exc` in OpenAI's shape, for a request `method path`."""
    return OpenAIErrorResponse(error=_detail(exc, method, path)).model_dump()


def status_code(exc: errors.ApiError) -> int:
    """OpenAI's status for `exc`: every invalid request is a 400 (ours are 422 on /generate)."""
    return 400 if exc.status_code == 422 else exc.status_code
