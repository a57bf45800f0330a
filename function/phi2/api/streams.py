"""Where a streaming route writes its answer: the invocation's response stream, when it has one.

The streaming surface (`phi2.runtime.stream_runtime`) serves each invocation with a `ResponseStream` bound here for
the duration of the transport's dispatch; the buffered surface (awslambdaric) binds none. A route that
streams checks `current()`, writes the status and headers (`start`) and then the body (`write`) itself, and
returns `streamed()`; the runtime then ignores the resolver's proxy response. Routes that do not stream are
answered on the streaming surface with their normal proxy response, converted by the runtime.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from aws_lambda_powertools.event_handler import Response

EVENT_STREAM = "text/event-stream"
SSE_HEADERS = {"Content-Type": f"{EVENT_STREAM}; charset=utf-8", "Cache-Control": "no-cache"}
"""Headers of every Server-Sent Events answer (no-cache: a proxy must not hold or replay a stream)."""


class ResponseStream(ABC):
    """The body of one invocation's HTTP answer, sent while it is being produced."""

    @property
    @abstractmethod
    def started(self) -> bool:
        """Whether `start` has sent the status and headers."""

    @property
    @abstractmethod
    def open(self) -> bool:
        """False once the reader stopped accepting bytes (the client went away) or the stream failed."""

    @abstractmethod
    def start(self, status: int, headers: Mapping[str, str], cookies: Sequence[str] = ()) -> bool:
        """Send the status, headers and cookies; once, before any `write`. False if nobody reads any more."""

    @abstractmethod
    def write(self, data: bytes) -> bool:
        """Send body bytes now. False once the reader stopped accepting them: stop producing."""

    @abstractmethod
    def fail(self, error_type: str, message: str) -> None:
        """Mark the stream as ended by an error (sent when it ends, after everything written so far)."""


_current: ContextVar[ResponseStream | None] = ContextVar("phi2_response_stream", default=None)


def current() -> ResponseStream | None:
    """The current invocation's response stream; None on the buffered surface."""
    return _current.get()


@contextmanager
def serving(stream: ResponseStream) -> Iterator[ResponseStream]:
    """Make `stream` the current invocation's response stream while the transport dispatches it."""
    token = _current.set(stream)
    try:
        yield stream
    finally:
        _current.reset(token)


def streamed() -> Response:
    """What a route that streamed its answer returns: the resolver needs a response, the runtime drops it."""
    return Response(status_code=200, content_type=EVENT_STREAM, body="")


def sse_data(payload: Any) -> bytes:
    """One Server-Sent Event whose `data` is `payload` as one line of JSON (or the string itself)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def sse_event(name: str, payload: Any) -> bytes:
    """A named Server-Sent Event (`event: <name>`), e.g. the error that ends a stream."""
    return f"event: {name}\n".encode() + sse_data(payload)


def sse_comment(text: str) -> bytes:
    """A comment line: readers ignore it, proxies and idle timers see bytes."""
    return f": {text}\n\n".encode()
