"""The streaming surface's Lambda runtime: `python -m phi2.runtime.stream_runtime` (the image's Command for it).

Why not awslambdaric: it posts a handler's whole return value once, and cannot stream (response streaming
for its Python client is an open AWS roadmap item). Lambda's Runtime API can. This loop is the only code
that stands in for a library, so it keeps awslambdaric for everything but the streamed POST: its runtime
client gets the next invocation and posts buffered results, errors and init errors; its context object,
event unmarshalling and error shapes are reused as they are. Each invocation goes through the same
transport dispatch as the buffered surface (`phi2.runtime.handler.lambda_handler`: validation, planner, generator,
error mapping), with a `RuntimeResponseStream` bound as the current response stream (`phi2.api.streams`).

The streamed response, checked against AWS's documentation and two reference runtimes:
- `POST /2018-06-01/runtime/invocation/{id}/response` with `Lambda-Runtime-Function-Response-Mode:
  streaming`, `Transfer-Encoding: chunked`, `Trailer: Lambda-Runtime-Function-Error-Type,
  Lambda-Runtime-Function-Error-Body` (aws-lambda-nodejs-runtime-interface-client, src/ResponseStream.js;
  aws-lambda-rust-runtime, lambda-runtime/src/requests.rs, `EventCompletionRequest`);
- for an HTTP caller (API Gateway's streaming Lambda proxy integration, a Function URL) `Content-Type:
  application/vnd.awslambda.http-integration-response` and a body that starts with a JSON prelude
  (`statusCode`, `headers`, `multiValueHeaders`, `cookies`) and 8 NUL bytes (src/HttpResponseStream.js;
  API Gateway developer guide, "Set up a Lambda proxy integration with payload response streaming": the
  prelude must come within the first 16 KB);
- an error after the first byte goes in the trailers: the error type, and the error's JSON in base64
  (src/ResponseStream.js, `addTrailers`; the RIE decodes it with base64.StdEncoding:
  aws-lambda-runtime-interface-emulator, invoke/runtime_response_request.go, `TrailerError`).

While the handler works and nothing was written for `STREAM_KEEPALIVE_SECONDS` (30 s), bytes every reader
ignores go out (`phi2.api.streams.KeptAlive`): an SSE comment on an event stream, or, for an answer sent whole,
the prelude with status 200 and then whitespace before the JSON body (API Gateway ends a stream idle for 5
minutes). Such a whole answer that turns out to be an error carries its real status in the body's
`status_code`. Direct invocations (not API Gateway events) get their plain JSON answer, posted buffered as
awslambdaric does. The loop never dies on a bad invocation: an event it cannot read is answered with awslambdaric's
`Runtime.UnmarshalError`, anything else with an error response, and it goes on to the next one.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import select
import sys
import time
import traceback
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from awslambdaric import bootstrap
from awslambdaric.lambda_runtime_client import LambdaRuntimeClient
from awslambdaric.lambda_runtime_exception import FaultException
from awslambdaric.lambda_runtime_marshaller import LambdaMarshaller, to_json

from phi2.api import streams
from phi2.api.streams import REQUEST_ID_HEADER
from phi2.settings import get_settings

RUNTIME_API_VERSION = "2018-06-01"
HTTP_INTEGRATION_RESPONSE = "application/vnd.awslambda.http-integration-response"
PRELUDE_DELIMITER = b"\0" * 8
ERROR_TYPE_TRAILER = "Lambda-Runtime-Function-Error-Type"
ERROR_BODY_TRAILER = "Lambda-Runtime-Function-Error-Body"
WRITE_TIMEOUT_S = 15.0
"""A write the Runtime API has not taken within this long means nobody reads the stream any more (Lambda's
Runtime API is a local reader that keeps up with a few kilobytes per second): stop producing."""
INTERNAL_ERROR_TYPE = "Runtime.HandlerError"

Handler = Callable[[Any, Any], Any]


class RuntimeResponseStream(streams.ResponseStream):
    """One invocation's response, streamed to the Runtime API as an HTTP integration response.

    Opens its POST on `start`; each `write` is one HTTP chunk, sent at once. A write returns False once the
    Runtime API stopped accepting the stream: it closed the connection, answered before the end (it does
    when the invocation is over for it), or did not take the bytes within `write_timeout_s`.
    """

    def __init__(self, address: str, request_id: str, write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
        self._address = address
        quoted = urllib.parse.quote(request_id, safe="")
        self._path = f"/{RUNTIME_API_VERSION}/runtime/invocation/{quoted}/response"
        self._write_timeout_s = write_timeout_s
        self._connection: http.client.HTTPConnection | None = None
        self._started = False
        self._open = False
        self._error: tuple[str, str] | None = None

    @property
    def started(self) -> bool:
        return self._started

    @property
    def open(self) -> bool:
        return self._open

    @property
    def failed(self) -> bool:
        return self._error is not None

    def start(self, status: int, headers: Mapping[str, str], cookies: Sequence[str] = ()) -> bool:
        prelude: dict[str, Any] = {"statusCode": status, "headers": dict(headers)}
        if cookies:
            prelude["cookies"] = list(cookies)
        return self.start_with_prelude(prelude)

    def start_with_prelude(self, prelude: Mapping[str, Any]) -> bool:
        """Open the POST and send the prelude (the JSON of `prelude`, then the 8-NUL delimiter)."""
        if self._started:
            raise RuntimeError("the response stream was already started")
        self._started = True
        host, _, port = self._address.rpartition(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=self._write_timeout_s)
        try:
            connection.putrequest("POST", self._path, skip_accept_encoding=True)
            connection.putheader("Lambda-Runtime-Function-Response-Mode", "streaming")
            connection.putheader("Transfer-Encoding", "chunked")
            connection.putheader("Content-Type", HTTP_INTEGRATION_RESPONSE)
            connection.putheader("Trailer", f"{ERROR_TYPE_TRAILER}, {ERROR_BODY_TRAILER}")
            connection.endheaders()
        except OSError:
            connection.close()
            return False
        self._connection = connection
        self._open = True
        # The prelude is JSON text, which never contains a NUL byte, so the delimiter is unambiguous.
        return self.write(json.dumps(prelude, separators=(",", ":")).encode() + PRELUDE_DELIMITER)

    def write(self, data: bytes) -> bool:
        if not self._started:
            raise RuntimeError("start the response stream before writing to it")
        if not self._open or self._connection is None:
            return False
        if not data:
            return True
        try:
            self._connection.send(b"%x\r\n" % len(data) + data + b"\r\n")
        except OSError:  # reset, broken pipe, or a timeout: the reader is gone
            self._abandon()
            return False
        if self._answered_early():
            self._abandon()
            return False
        return True

    def fail(self, error_type: str, message: str) -> None:
        self._error = (error_type, message)

    def finish(self) -> int | None:
        """End the stream (with the error trailers if it failed); the Runtime API's status, or None."""
        if self._connection is None:
            return None
        connection, self._connection = self._connection, None
        try:
            if not self._open:
                return None
            self._open = False
            trailers = b""
            if self._error is not None:
                error_type, message = self._error
                body = json.dumps({"errorType": error_type, "errorMessage": message, "trace": []})
                trailers = (
                    f"{ERROR_TYPE_TRAILER}: {error_type}\r\n"
                    f"{ERROR_BODY_TRAILER}: {base64.b64encode(body.encode()).decode()}\r\n"
                ).encode()
            connection.send(b"0\r\n" + trailers + b"\r\n")
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def _answered_early(self) -> bool:
        """The Runtime API answers a streamed POST only once it has the whole body: an answer (or a close)
        before that means it is done with this invocation."""
        sock = self._connection.sock if self._connection is not None else None
        if sock is None:
            return True
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    def _abandon(self) -> None:
        self._open = False
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def proxy_prelude(response: Mapping[str, Any]) -> tuple[dict[str, Any], bytes]:
    """An API Gateway proxy response (REST or HTTP API shape) as a streaming prelude and its body."""
    prelude: dict[str, Any] = {"statusCode": int(response.get("statusCode", 200))}
    for key in ("headers", "multiValueHeaders", "cookies"):
        if response.get(key):
            prelude[key] = response[key]
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        data = base64.b64decode(body)
    else:
        data = body.encode("utf-8") if isinstance(body, str) else json.dumps(body).encode()
    return prelude, data


def after_prelude(response: Mapping[str, Any], body: bytes) -> bytes:
    """The body of a whole answer whose status a keep-alive already sent as 200: when the answer's own status
    differs (an error that came after the prelude), a JSON object body says it in `status_code`, as direct
    invocations' answers do; anything else goes out as it is."""
    status = int(response.get("statusCode", 200))
    if status == 200:
        return body
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if not isinstance(parsed, dict):
        return body
    return json.dumps({**parsed, "status_code": status}).encode()


class StreamingRuntime:
    """Serves invocations one at a time from Lambda's Runtime API, streaming the answers that stream.

    Every API Gateway invocation's answer is kept alive (`streams.KeptAlive`): while the handler works and
    nothing was written for `keepalive_s`, an SSE comment, or whitespace before a whole JSON answer, goes out.
    """

    def __init__(
        self,
        client: LambdaRuntimeClient,
        address: str,
        handler: Handler,
        event_kind: Callable[[Any], str],
        write_timeout_s: float = WRITE_TIMEOUT_S,
        keepalive_s: float = 30.0,
    ) -> None:
        self.client = client
        self.address = address
        self.handler = handler
        self.event_kind = event_kind
        self.write_timeout_s = write_timeout_s
        self.keepalive_s = keepalive_s
        self.marshaller = LambdaMarshaller()

    def serve_next(self) -> None:
        """Wait for the next invocation and answer it; never raises for a bad invocation."""
        request = self.client.wait_next_invocation()
        bootstrap.update_xray_env_variable(request.x_amzn_trace_id)
        request_id = request.invoke_id
        try:
            context = bootstrap.create_lambda_context(
                request.client_context,
                request.cognito_identity,
                request.deadline_time_in_ms,
                request_id,
                request.invoked_function_arn,
                request.tenant_id,
            )
            event = self.marshaller.unmarshal_request(request.event_body, request.content_type)
        except FaultException as exc:
            self._post_error(request_id, bootstrap.make_error(exc.msg, exc.exception_type, exc.trace, request_id))
            return

        stream = RuntimeResponseStream(self.address, request_id, self.write_timeout_s)
        direct = self.event_kind(event) == "direct"
        # A direct invocation's answer is posted whole, with no API Gateway idle timer to keep happy.
        json_headers = {"Content-Type": "application/json", REQUEST_ID_HEADER: request_id}
        kept = streams.KeptAlive(stream, self.keepalive_s, json_headers)
        try:
            with streams.serving(kept), contextlib.nullcontext() if direct else kept.running():
                result = self.handler(event, context)
            if kept.opened_for_json:
                status = int(result.get("statusCode", 200))
                if status != 200:  # the client saw 200 already: the body says it, and so does the log
                    _log("ERROR", "status after a keep-alive sent 200", request_id=request_id, status=status)
                stream.write(after_prelude(result, proxy_prelude(result)[1]))
            elif not stream.started:
                if direct:
                    self.client.post_invocation_result(request_id, to_json(result), "application/json")
                    return
                prelude, body = proxy_prelude(result)
                if stream.start_with_prelude(prelude):
                    stream.write(body)
        except Exception as exc:  # noqa: BLE001 - the handler maps every error; this is a last resort
            _log_failure(request_id, exc)
            if not stream.started:
                message = "internal error; quote the request_id when reporting it"
                self._post_error(request_id, bootstrap.make_error(message, INTERNAL_ERROR_TYPE, [], request_id))
                return
            stream.fail(INTERNAL_ERROR_TYPE, type(exc).__name__)
        stream.finish()

    def _post_error(self, request_id: str, error: dict[str, Any]) -> None:
        fault = bootstrap.make_xray_fault(error["errorType"], error["errorMessage"], os.getcwd(), [])
        self.client.post_invocation_error(request_id, to_json(error), to_json(fault))


def _log(level: str, message: str, **fields: Any) -> None:
    """One JSON log line on stdout (CloudWatch's), for the runtime's own events; never request text."""
    sys.stdout.write(json.dumps({"level": level, "message": message, **fields}) + "\n")


def _log_failure(request_id: str, exc: BaseException) -> None:
    # The exception's type and stack only: its message may quote the request.
    stack = traceback.format_tb(exc.__traceback__)
    _log("ERROR", "invocation failed", request_id=request_id, error=type(exc).__name__, stack=stack)


def _init_error(exc: BaseException) -> dict[str, Any]:
    return bootstrap.make_error(
        f"the function failed to initialise: {type(exc).__name__}: {exc}",
        FaultException.IMPORT_MODULE_ERROR,
        traceback.format_tb(exc.__traceback__),
    )


def main() -> None:
    """Initialise the function (the init phase) and serve invocations until Lambda stops the environment."""
    address = os.environ["AWS_LAMBDA_RUNTIME_API"]
    client = LambdaRuntimeClient(address)
    started = time.monotonic()
    try:
        from phi2.runtime import handler  # the init phase: settings, resolvers, the model
    except Exception as exc:  # noqa: BLE001 - reported to Lambda, which fails the init phase
        error = _init_error(exc)
        _log("ERROR", "init failed", **error)
        client.post_init_error(error)
        sys.exit(1)
    _log("INFO", "streaming runtime ready", init_s=round(time.monotonic() - started, 3))
    settings = get_settings()
    runtime = StreamingRuntime(
        client, address, handler.lambda_handler, handler.event_kind, keepalive_s=settings.stream_keepalive_s
    )
    while True:
        runtime.serve_next()


if __name__ == "__main__":
    main()
