"""A local stand-in for Lambda's Runtime API, which cannot run here, for testing the streaming runtime.

The real RIE accepts a streamed response but hands it to its caller whole, so it cannot show when each
part arrived. This stand-in serves the same endpoints on 127.0.0.1 (`GET .../invocation/next`,
`POST .../invocation/{id}/response` and `/error`, `POST .../init/error`), reads a streamed response chunk by
chunk and timestamps each chunk (`time.monotonic()`, comparable across processes on one machine), keeps its
request headers and its trailers, and can stop accepting a stream after some chunks (it closes the
connection, as a Runtime API whose caller went away stops taking the stream).

Only what the Runtime API documents is modelled: one invocation at a time, handed to the next
`GET .../next`; `202 Accepted` once a response or error is complete.
"""

from __future__ import annotations

import http.server
import json
import os
import queue
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = "/2018-06-01/runtime"
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:phi2-stream:live"


@dataclass
class Chunk:
    at: float
    data: bytes


@dataclass
class Invocation:
    """One invocation handed to the runtime, and everything the runtime sent back for it."""

    request_id: str
    event: bytes
    timeout_s: float
    stop_after_chunks: int | None = None
    handed_out_at: float | None = None
    kind: str | None = None
    """"response" (buffered or streamed) or "error"."""
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[Chunk] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False
    """The response ended with its terminating chunk (False: the stand-in stopped reading, or it broke)."""
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def streamed(self) -> bool:
        return self.headers.get("lambda-runtime-function-response-mode") == "streaming"

    @property
    def data(self) -> bytes:
        return b"".join(chunk.data for chunk in self.chunks) if self.streamed else self.body


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A runtime process stopped between invocations drops its idle keep-alive connection: expected.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RuntimeApiStandIn:
    """The stand-in server: `address` goes into the runtime's AWS_LAMBDA_RUNTIME_API."""

    sampled = False
    """Whether the trace header it hands out asks for the invocation to be traced (X-Ray's Sampled=1)."""

    def __init__(self) -> None:
        self.pending: queue.Queue[Invocation] = queue.Queue()
        self.invocations: dict[str, Invocation] = {}
        self.init_errors: list[tuple[dict[str, str], bytes]] = []
        self.next_requests: list[float] = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_GET(self) -> None:
                if self.path != f"{RUNTIME}/invocation/next":
                    self._reply(404)
                    return
                stand_in.next_requests.append(time.monotonic())
                invocation = stand_in.pending.get()
                invocation.handed_out_at = time.monotonic()
                deadline_ms = int((time.time() + invocation.timeout_s) * 1000)
                self._reply(
                    200,
                    invocation.event,
                    {
                        "Content-Type": "application/json",
                        "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                        "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                        "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
                        "Lambda-Runtime-Trace-Id": f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};"
                        f"Parent={uuid.uuid4().hex[:16]};Sampled={1 if stand_in.sampled else 0}",
                    },
                )

            def do_POST(self) -> None:
                if self.path == f"{RUNTIME}/init/error":
                    stand_in.init_errors.append((dict(self.headers), self._read_body()))
                    self._reply(202, b'{"status":"OK"}')
                    return
                parts = self.path.split("/")  # "", "2018-06-01", "runtime", "invocation", id, kind
                if len(parts) != 6 or parts[5] not in ("response", "error"):
                    self._reply(404)
                    return
                invocation = stand_in.invocations.get(parts[4])
                if invocation is None:
                    self._reply(400, b'{"errorType":"InvalidRequestID"}')
                    return
                invocation.kind = parts[5]
                invocation.headers = {name.lower(): value for name, value in self.headers.items()}
                try:
                    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                        if not self._read_chunks(invocation):
                            self.close_connection = True
                            return  # stopped reading: close without answering
                    else:
                        invocation.body = self._read_body()
                    invocation.complete = True
                    self._reply(202, b'{"status":"OK"}')
                finally:
                    invocation.done.set()

            def _read_body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _read_chunks(self, invocation: Invocation) -> bool:
                """Read the chunked body, timestamping each chunk; False if told to stop reading."""
                while True:
                    stop = invocation.stop_after_chunks
                    if stop is not None and len(invocation.chunks) >= stop:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return False
                    size_line = self.rfile.readline()
                    if not size_line:
                        return False  # the runtime closed the connection mid-stream
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        break
                    data = self.rfile.read(size)
                    invocation.chunks.append(Chunk(time.monotonic(), data))
                    self.rfile.read(2)  # CRLF after the chunk's data
                while True:  # trailers, up to the empty line
                    line = self.rfile.readline().rstrip(b"\r\n")
                    if not line:
                        return True
                    name, _, value = line.decode("latin-1").partition(":")
                    invocation.trailers[name.strip().lower()] = value.strip()

        self._server = _Server(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def submit(self, event: Any, *, timeout_s: float = 120.0, stop_after_chunks: int | None = None) -> Invocation:
        """Queue an invocation (a JSON-able event, or raw bytes) for the runtime's next `GET .../next`."""
        payload = event if isinstance(event, bytes) else json.dumps(event).encode()
        invocation = Invocation(str(uuid.uuid4()), payload, timeout_s, stop_after_chunks)
        self.invocations[invocation.request_id] = invocation
        self.pending.put(invocation)
        return invocation

    def invoke(self, event: Any, *, timeout_s: float = 120.0, wait_s: float = 300.0, **options: Any) -> Invocation:
        """Submit an invocation and wait until the runtime has answered it (or the stand-in stopped reading)."""
        invocation = self.submit(event, timeout_s=timeout_s, **options)
        if not invocation.done.wait(wait_s):
            raise TimeoutError(f"no answer to invocation {invocation.request_id} within {wait_s} s")
        return invocation

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def split_prelude(data: bytes) -> tuple[dict[str, Any], bytes]:
    """An HTTP integration response: the JSON prelude, and the body after the 8-NUL delimiter."""
    head, delimiter, body = data.partition(b"\0" * 8)
    assert delimiter, "no 8-NUL delimiter after the prelude"
    return json.loads(head), body


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """Parse a Server-Sent Events body strictly: every event ends with a blank line, fields are known ones.

    Returns one dict per event with `event` (if named), `data` (lines joined) and `comments`.
    """
    text = body.decode("utf-8")
    assert text.endswith("\n\n"), "the stream does not end at an event boundary"
    events = []
    for block in text[:-2].split("\n\n"):
        event: dict[str, Any] = {"comments": []}
        data_lines = []
        for line in block.split("\n"):
            if line.startswith(":"):
                event["comments"].append(line[1:].strip())
                continue
            name, sep, value = line.partition(":")
            assert sep, f"not an SSE field line: {line!r}"
            assert name in ("data", "event", "id", "retry"), f"unknown SSE field {name!r}"
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data_lines.append(value)
            else:
                event[name] = value
        if data_lines:
            event["data"] = "\n".join(data_lines)
        events.append(event)
    return events


class RuntimeProcess:
    """A runtime process pointed at a stand-in, as Lambda starts one: `python -m phi2.runtime.stream_runtime` (or a
    test script around it) with AWS_LAMBDA_RUNTIME_API set, from the function's directory."""

    def __init__(self, stand_in: RuntimeApiStandIn, args: list[str], **env: str) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="stream-runtime-", suffix=".log", delete=False)  # noqa: SIM115
        environment = {
            **os.environ,
            "AWS_LAMBDA_RUNTIME_API": stand_in.address,
            "AWS_LAMBDA_FUNCTION_NAME": "phi2-stream",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "10240",
            "POWERTOOLS_TRACE_DISABLED": "true",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "function"), str(ROOT / "tests")]),
            **env,
        }
        self.process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT / "function",
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def died_by(self) -> str | None:
        """The signal that killed the process, if one did."""
        code = self.process.poll()
        return signal.Signals(-code).name if code is not None and code < 0 else None

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log lines (Powertools' and the runtime's own)."""
        found = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                found.append(record)
        return found

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
