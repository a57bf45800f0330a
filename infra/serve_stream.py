#!/usr/bin/env python3
"""Watch the streaming surface stream, locally: API Gateway's streaming integration and Lambda's Runtime API,
played by one small server, with the streaming runtime (`phi2.runtime.stream_runtime`) attached to it.

`sam local start-api` buffers streamed responses, and the Lambda RIE hands a streamed response to its caller
whole, so neither shows tokens as they come. This server does, for one function, what the deployed stack
does: each HTTP request becomes an API Gateway REST proxy event (the first path segment `v1` is the stage,
as in the StreamBaseUrl output), which the runtime takes from the Runtime API (`GET .../invocation/next`);
the runtime's streamed response (a JSON prelude, 8 NUL bytes, the body) is forwarded to the HTTP client
as it arrives: the prelude's status and headers, then each chunk of the body. A client that disconnects
closes the runtime's stream, which stops the generation, as on Lambda.

    .venv/bin/python infra/serve_stream.py --model-dir .cache/models/smollm2-auto      # port 9002
    curl -N http://127.0.0.1:9002/v1/generate_stream -H 'Content-Type: application/json' \
        -d '{"prompt": "The capital of France is"}'

Local tooling only: one invocation at a time (like one Lambda execution environment), no API key check.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import queue
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = "/2018-06-01/runtime"
STAGE = "v1"
DELIMITER = b"\0" * 8
FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:phi2-stream-local:live"


@dataclass
class Invocation:
    request_id: str
    event: bytes
    parts: queue.Queue[bytes | None] = field(default_factory=queue.Queue)
    """The runtime's response body as it arrives; None ends it."""
    failed: str | None = None
    client_gone: threading.Event = field(default_factory=threading.Event)


def proxy_event(method: str, target: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """An API Gateway REST API proxy event (payload 1.0) for a request to the `v1` stage."""
    path, _, query = target.partition("?")
    resource = path[len(STAGE) + 1 :] if path.startswith(f"/{STAGE}/") else path
    params: dict[str, list[str]] = {}
    for pair in filter(None, query.split("&")):
        name, _, value = pair.partition("=")
        params.setdefault(name, []).append(value)
    now = time.time()
    return {
        "resource": resource,
        "path": resource,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {name: [value] for name, value in headers.items()},
        "queryStringParameters": {k: v[-1] for k, v in params.items()} or None,
        "multiValueQueryStringParameters": params or None,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": resource,
            "httpMethod": method,
            "path": path,
            "stage": STAGE,
            "requestId": str(uuid.uuid4()),
            "requestTimeEpoch": int(now * 1000),
            "identity": {"sourceIp": "127.0.0.1", "userAgent": headers.get("User-Agent", "")},
        },
        "body": body.decode("utf-8", errors="replace") if body else None,
        "isBase64Encoded": False,
    }


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class StreamServer:
    """The HTTP front and the Runtime API, on one port."""

    def __init__(self, port: int, function_timeout_s: float) -> None:
        self.pending: queue.Queue[Invocation] = queue.Queue()
        self.invocations: dict[str, Invocation] = {}
        self.lock = threading.Lock()  # one invocation at a time, as one execution environment serves them
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            # The Runtime API, for the runtime process
            def do_GET(self) -> None:
                if self.path == f"{RUNTIME}/invocation/next":
                    invocation = server.pending.get()
                    deadline_ms = int((time.time() + function_timeout_s) * 1000)
                    self._reply(
                        200,
                        invocation.event,
                        {
                            "Content-Type": "application/json",
                            "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                            "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                            "Lambda-Runtime-Invoked-Function-Arn": FUNCTION_ARN,
                        },
                    )
                    return
                self._client()

            def do_POST(self) -> None:
                if self.path.startswith(f"{RUNTIME}/"):
                    self._runtime_post()
                else:
                    self._client()

            def do_PUT(self) -> None:
                self._client()

            def do_DELETE(self) -> None:
                self._client()

            def _runtime_post(self) -> None:
                parts = self.path.split("/")
                invocation = server.invocations.get(parts[4]) if len(parts) == 6 else None
                if invocation is None:  # an init error, or an unknown request id
                    sys.stderr.write(f"serve_stream: the runtime posted {self.path}: {self._body()[:2000]!r}\n")
                    self._reply(202, b'{"status":"OK"}')
                    return
                if parts[5] == "error" or "chunked" not in self.headers.get("Transfer-Encoding", ""):
                    invocation.failed = self._body().decode(errors="replace")
                    invocation.parts.put(None)
                    self._reply(202, b'{"status":"OK"}')
                    return
                while True:  # the streamed body, chunk by chunk, forwarded as it arrives
                    if invocation.client_gone.is_set():
                        self.connection.shutdown(socket.SHUT_RDWR)  # the runtime's next write fails
                        invocation.parts.put(None)
                        self.close_connection = True
                        return
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    invocation.parts.put(self.rfile.read(size))
                    self.rfile.read(2)
                trailers = []
                while line := self.rfile.readline().rstrip(b"\r\n"):
                    trailers.append(line.decode("latin-1"))
                if trailers:
                    sys.stderr.write(f"serve_stream: the stream ended with an error: {trailers}\n")
                invocation.parts.put(None)
                self._reply(202, b'{"status":"OK"}')

            # The API, for HTTP clients
            def _client(self) -> None:
                body = self._body()
                headers = {name: value for name, value in self.headers.items()}
                event = proxy_event(self.command, self.path, headers, body)
                with server.lock:
                    invocation = Invocation(str(uuid.uuid4()), json.dumps(event).encode())
                    server.invocations[invocation.request_id] = invocation
                    server.pending.put(invocation)
                    try:
                        self._forward(invocation)
                    finally:
                        del server.invocations[invocation.request_id]

            def _forward(self, invocation: Invocation) -> None:
                head = b""
                while DELIMITER not in head:
                    part = invocation.parts.get()
                    if part is None:
                        self._reply(502, json.dumps({"message": "Internal server error"}).encode())
                        sys.stderr.write(f"serve_stream: the invocation failed: {invocation.failed}\n")
                        return
                    head += part
                prelude_text, _, rest = head.partition(DELIMITER)
                prelude = json.loads(prelude_text)
                self.send_response(int(prelude.get("statusCode", 200)))
                for name, value in (prelude.get("headers") or {}).items():
                    self.send_header(name, value)
                for name, values in (prelude.get("multiValueHeaders") or {}).items():
                    for value in values:
                        self.send_header(name, value)
                for cookie in prelude.get("cookies") or ():
                    self.send_header("Set-Cookie", cookie)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    part: bytes | None = rest
                    while part is not None:
                        if part:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                            self.wfile.flush()
                        part = invocation.parts.get()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:  # the client went away: stop the runtime's stream, drain what is left
                    invocation.client_gone.set()
                    while invocation.parts.get() is not None:
                        pass
                    self.close_connection = True

        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]

    def serve(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", ""), help="a prepared model (make model)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("STREAM_PORT", "9002")))
    parser.add_argument("--timeout-ms", type=int, default=300_000, help="the integration timeout (API_TIMEOUT_MS)")
    parser.add_argument("--function-timeout", type=float, default=900, help="the function's timeout, seconds")
    parser.add_argument(
        "--command",
        nargs=argparse.REMAINDER,
        help="the runtime to attach (default: infra/entrypoint.sh phi2.runtime.stream_runtime, as the image runs it)",
    )
    args = parser.parse_args()
    if not args.model_dir and not args.command:
        parser.error("give --model-dir (a prepared model, e.g. .cache/models/smollm2-auto)")
    server = StreamServer(args.port, args.function_timeout)
    command = args.command or [str(ROOT / "infra" / "entrypoint.sh"), "phi2.runtime.stream_runtime"]
    environment = {
        **os.environ,
        "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{server.port}",
        "AWS_LAMBDA_FUNCTION_NAME": "phi2-stream-local",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "10240",
        "PYTHON": sys.executable,
        "API_TIMEOUT_MS": str(args.timeout_ms),
        "POWERTOOLS_TRACE_DISABLED": "true",
        **({"MODEL_DIR": str(Path(args.model_dir).resolve())} if args.model_dir else {}),
    }
    runtime = subprocess.Popen(command, env=environment)
    base = f"http://127.0.0.1:{server.port}/{STAGE}"
    example = json.dumps({"prompt": "The capital of France is"})
    print(f"serve_stream: the streaming API on {base} (runtime pid {runtime.pid})", flush=True)
    print(f"  curl -N {base}/generate_stream -H 'Content-Type: application/json' -d '{example}'", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.httpd.shutdown())
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        while thread.is_alive() and runtime.poll() is None:
            thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if runtime.poll() is None:
            runtime.terminate()
            runtime.wait(10)
        server.close()
    return runtime.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
