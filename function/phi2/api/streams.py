"""Where a streaming route writes its answer: the invocation's response stream, when it has one.

The streaming surface (`phi2.runtime.stream_runtime`) serves each invocation with a `ResponseStream` bound here for
the duration of the transport's dispatch; the buffered surface (awslambdaric) binds none. A route that
streams checks `current()`, writes the status and headers (`start`) and then the body (`write`) itself, and
returns `streamed()`; the runtime then ignores the resolver's proxy response. Routes that do not stream are
answered on the streaming surface with their normal proxy response, converted by the runtime.
"""

from __future__ import annotations

import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from aws_lambda_powertools.event_handler import Response

EVENT_STREAM = "text/event-stream"
REQUEST_ID_HEADER = "x-request-id"
"""Where a streamed answer carries the request id (the buffered answers carry it in their body or header)."""
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

    def open_once(self, status: int, headers: Mapping[str, str], first: bytes) -> bool:
        """Start with `first` as the body's first bytes unless the stream was started already (by a keep-alive
        that announced the same opening); whether the reader still reads."""
        if not self.started:
            return self.start(status, headers) and self.write(first)
        return self.open

    def announce(self, status: int, headers: Mapping[str, str], first: bytes) -> None:
        """Say that this answer will be a stream opening with `status`, `headers` and `first` (`open_once`'s
        arguments): a keep-alive that has to open the stream before the route does opens it so. Without an
        announcement a keep-alive opens a whole JSON answer. No-op for streams without a keep-alive."""
        return None


KEEPALIVE_COMMENT = "keep-alive"
JSON_KEEPALIVE = b" "
"""What a whole JSON answer gets while it is computed: whitespace, which JSON allows before a value."""


class KeptAlive(ResponseStream):
    """A response stream that never stays silent for `interval_s` while the function works.

    API Gateway ends a stream that sent nothing for 5 minutes (a Regional endpoint; 30 s edge-optimised). While
    `running()`, a thread sends bytes every reader ignores whenever nothing was written for `interval_s`: an
    SSE comment on an event stream, whitespace before a whole JSON answer. Nothing is sent before that first
    silence, so an answer ready sooner (any error found before compute: validation, the planner's refusal) is
    a normal response with its own status. When the silence comes before the route opened the stream, the
    keep-alive opens it: as the route announced (`announce`: an event stream), or else as a whole JSON answer
    whose status is then fixed at 200 (`opened_for_json`); the transport writes that answer's body after the
    whitespace. One writer at a time: every operation on the stream holds one lock.
    """

    def __init__(self, stream: ResponseStream, interval_s: float, json_headers: Mapping[str, str]) -> None:
        self.stream = stream
        self.interval_s = interval_s
        self.json_headers = dict(json_headers)
        self.opened_for_json = False
        """The keep-alive opened the stream for a whole JSON answer: its status was fixed at 200."""
        self.sent = 0
        """Keep-alive writes so far."""
        self._lock = threading.RLock()
        self._announced: tuple[int, dict[str, str], bytes] | None = None
        self._last = time.monotonic()

    @property
    def started(self) -> bool:
        return self.stream.started

    @property
    def open(self) -> bool:
        return self.stream.open

    def start(self, status: int, headers: Mapping[str, str], cookies: Sequence[str] = ()) -> bool:
        with self._lock:
            self._last = time.monotonic()
            return self.stream.start(status, headers, cookies)

    def write(self, data: bytes) -> bool:
        with self._lock:
            if data:
                self._last = time.monotonic()
            return self.stream.write(data)

    def fail(self, error_type: str, message: str) -> None:
        with self._lock:
            self.stream.fail(error_type, message)

    def open_once(self, status: int, headers: Mapping[str, str], first: bytes) -> bool:
        with self._lock:
            return super().open_once(status, headers, first)

    def announce(self, status: int, headers: Mapping[str, str], first: bytes) -> None:
        with self._lock:
            self._announced = (status, dict(headers), first)

    def keep_alive(self) -> bool:
        """Send the keep-alive bytes now if nothing was written for `interval_s`; whether it sent any."""
        with self._lock:
            if time.monotonic() - self._last < self.interval_s or (self.started and not self.open):
                return False
            if not self.started:
                if self._announced is not None:
                    self.open_once(*self._announced)
                else:
                    self.opened_for_json = True
                    self.start(200, self.json_headers)
            if self.opened_for_json:
                self.write(JSON_KEEPALIVE)
            else:
                self.write(sse_comment(KEEPALIVE_COMMENT))
            self.sent += 1
            return True

    def _until_due(self) -> float:
        with self._lock:
            return max(0.0, self._last + self.interval_s - time.monotonic())

    @contextmanager
    def running(self) -> Iterator[KeptAlive]:
        """Keep the stream alive from a background thread until the block ends."""
        stop = threading.Event()

        def loop() -> None:
            # Sleeps on an Event, so the thread wakes for the GIL only when a keep-alive is due.
            while not stop.wait(self._until_due() + 0.001):
                self.keep_alive()

        thread = threading.Thread(target=loop, name="stream-keep-alive", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


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
