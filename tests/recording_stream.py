"""A response stream that records what a route sends it (status, headers, each write with its time), and can
stop accepting writes, as a Runtime API whose caller went away does: for in-process tests of streaming routes."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from phi2.api import streams


class RecordingStream(streams.ResponseStream):
    """A response stream that keeps what it is sent, with times; it can stop accepting after some writes."""

    def __init__(self, accept_writes: int | None = None) -> None:
        self.accept_writes = accept_writes
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.started_at: float | None = None
        self.writes: list[tuple[float, bytes]] = []
        self.error: tuple[str, str] | None = None
        self._open = False

    @property
    def started(self) -> bool:
        return self.status is not None

    @property
    def open(self) -> bool:
        return self._open

    def start(self, status: int, headers: Mapping[str, str], cookies: Sequence[str] = ()) -> bool:
        assert self.status is None, "started twice"
        self.status, self.headers, self.started_at, self._open = status, dict(headers), time.monotonic(), True
        return True

    def write(self, data: bytes) -> bool:
        assert self.started, "written before start"
        if not self._open:
            return False
        if self.accept_writes is not None and len(self.writes) >= self.accept_writes:
            self._open = False
            return False
        self.writes.append((time.monotonic(), data))
        return True

    def fail(self, error_type: str, message: str) -> None:
        self.error = (error_type, message)

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.writes)
