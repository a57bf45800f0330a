"""The invocation being served: its Lambda context, the surface it came through, and its deadline.

One invocation at a time per execution environment (Lambda's model), so this is module state, set by the
transport (the handler, or the streaming runtime) before any route runs and read by the protocols.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

from phi2.settings import get_settings

EventKind = Literal["rest", "http", "direct"]
DeadlineSource = Literal["api_timeout", "invocation_timeout"]


@dataclass(frozen=True)
class Deadline:
    """When the answer must be complete (a `time.monotonic()` value) and which limit set it."""

    at: float
    source: DeadlineSource
    budget_s: float
    """The budget this deadline was cut from (the integration's timeout, or the invocation's remaining time)."""
    waited_s: float = 0.0
    """How long the request had already waited when the function started on it (a cold start, a queue)."""

    def remaining(self, now: float | None = None) -> float:
        return self.at - (time.monotonic() if now is None else now)


@dataclass
class _State:
    count: int = 0
    context: Any = None
    kind: EventKind = "direct"
    received_epoch_ms: float | None = None
    started_at: float = 0.0
    started_epoch: float = 0.0
    caller: str | None = None


_state = _State()


def begin(context: Any, kind: EventKind, event: Any = None) -> None:
    """Record a new invocation (the transport calls this first thing)."""
    _state.count += 1
    _state.context = context
    _state.kind = kind
    _state.started_at = time.monotonic()
    _state.started_epoch = time.time()
    _state.received_epoch_ms = _received_epoch_ms(event, kind)
    _state.caller = _caller(event, kind)


def count() -> int:
    return _state.count


def cold() -> bool:
    """True on the first invocation of this execution environment."""
    return _state.count == 1


def context() -> Any:
    return _state.context


def kind() -> EventKind:
    return _state.kind


def request_id() -> str | None:
    return getattr(_state.context, "aws_request_id", None)


def _caller(event: Any, kind: EventKind) -> str | None:
    """Who sent this request, as far as something in front of the function checked it: the API key (REST APIs
    with `RequireApiKey`: `identity.apiKeyId`, never the key itself) and the IAM principal (a REST API with
    AWS_IAM authorization: `identity.userArn`; a Function URL or HTTP API with IAM: `authorizer.iam.userArn`).
    A direct invocation does not say who invoked it (IAM already decided who may): every direct invocation is
    one caller. None: nothing identifies the caller."""
    if kind == "direct":
        return "direct"
    context = event.get("requestContext") if isinstance(event, dict) else None
    if not isinstance(context, dict):
        return None
    parts = []
    if kind == "rest":
        identity = context.get("identity")
        if isinstance(identity, dict):
            parts += [f"{name}={identity[name]}" for name in ("apiKeyId", "userArn") if _given(identity.get(name))]
    authorizer = context.get("authorizer")
    iam = authorizer.get("iam") if isinstance(authorizer, dict) else None
    if isinstance(iam, dict) and _given(iam.get("userArn")):
        parts.append(f"userArn={iam['userArn']}")
    return " ".join(parts) or None


def _given(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def caller() -> str | None:
    """The current invocation's caller (see _caller); None when nothing identifies it."""
    return _state.caller


def cache_scope(prompt_cache_key: str | None = None) -> tuple[str, str] | None:
    """Who may reuse this request's prompt pass, and whose it may reuse (engine/prefix_cache.py): its caller,
    narrowed by OpenAI's `prompt_cache_key` (a key never widens sharing: it only splits a caller's requests).
    Requests with no caller identity share nothing, unless the deployer allows it
    (`PROMPT_CACHE_UNAUTHENTICATED`); then they are one caller."""
    who = _state.caller
    if who is None:
        if not get_settings().prompt_cache_unauthenticated:
            return None
        who = "unauthenticated"
    return (who, prompt_cache_key or "")


def _received_epoch_ms(event: Any, kind: EventKind) -> float | None:
    """When API Gateway received the request: `requestTimeEpoch` (REST) or `timeEpoch` (HTTP API), in ms.

    Not under `sam local`, which stamps every request with the time it started itself (aws/aws-sam-cli#9279).
    """
    if kind == "direct" or not isinstance(event, dict) or os.environ.get("AWS_SAM_LOCAL") == "true":
        return None
    request_context = event.get("requestContext")
    if not isinstance(request_context, dict):
        return None
    value = request_context.get("requestTimeEpoch" if kind == "rest" else "timeEpoch")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def deadline() -> Deadline:
    """The deadline of the current invocation.

    Through API Gateway it counts from when API Gateway received the request plus the integration's timeout
    (`API_TIMEOUT_MS`, set by the template next to the integration), minus the margin: a cold start or a
    queue eats into the budget instead of breaking it. Never past the invocation's own remaining time minus
    the margin, which is all a direct invocation gets.
    """
    settings = get_settings()
    now = time.monotonic()
    context = _state.context
    remaining_s = context.get_remaining_time_in_millis() / 1000 if context is not None else math.inf
    invocation = Deadline(
        at=now + max(0.0, remaining_s - settings.deadline_margin_s),
        source="invocation_timeout",
        budget_s=remaining_s,
    )
    if _state.kind == "direct":
        return invocation
    waited_s = 0.0
    if _state.received_epoch_ms is not None:
        waited_s = max(0.0, _state.started_epoch - _state.received_epoch_ms / 1000) + (now - _state.started_at)
        if waited_s > settings.api_timeout_s:
            # API Gateway would have answered 504 already: this is a replayed event (a sample from events/,
            # `sam local invoke`, a console test), and no API Gateway waits for it: the invocation's own
            # remaining time applies, as for a direct invocation.
            return invocation
    api = Deadline(
        at=now - waited_s + settings.api_timeout_s - settings.deadline_margin_s,
        source="api_timeout",
        budget_s=settings.api_timeout_s,
        waited_s=waited_s,
    )
    return api if api.at <= invocation.at else invocation
