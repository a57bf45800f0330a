"""The streaming runtime's response stream on the wire, against a local stand-in of Lambda's Runtime API:
the documented headers, the prelude and its 8-NUL delimiter, one chunk per write, the error trailers, and
writes that report the Runtime API no longer accepting the stream."""

from __future__ import annotations

import base64
import json
import time

import pytest
from runtime_api import RuntimeApiStandIn, split_prelude

from phi2.runtime.stream_runtime import HTTP_INTEGRATION_RESPONSE, RuntimeResponseStream, proxy_prelude


@pytest.fixture(scope="module")
def stand_in():
    server = RuntimeApiStandIn()
    yield server
    server.close()


def test_a_stream_carries_the_documented_headers_then_the_prelude_delimiter_and_one_chunk_per_write(stand_in):
    # GIVEN an invocation the Runtime API expects an answer to
    invocation = stand_in.submit({})
    stream = RuntimeResponseStream(stand_in.address, invocation.request_id)
    # WHEN the runtime starts the stream, writes two parts and finishes
    assert stream.start(200, {"Content-Type": "text/event-stream"}, cookies=["a=1"])
    assert stream.write(b"data: one\n\n") and stream.write(b"data: two\n\n")
    status = stream.finish()
    invocation.done.wait(10)
    # THEN the POST has the headers of a streamed HTTP integration response
    headers = invocation.headers
    assert headers["lambda-runtime-function-response-mode"] == "streaming"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == HTTP_INTEGRATION_RESPONSE == "application/vnd.awslambda.http-integration-response"
    assert headers["trailer"] == "Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body"
    # AND its body is the JSON prelude, 8 NUL bytes, then the parts, each in its own chunk
    prelude, body = split_prelude(invocation.data)
    assert prelude == {"statusCode": 200, "headers": {"Content-Type": "text/event-stream"}, "cookies": ["a=1"]}
    assert body == b"data: one\n\ndata: two\n\n"
    assert [chunk.data for chunk in invocation.chunks[1:]] == [b"data: one\n\n", b"data: two\n\n"]
    assert invocation.chunks[0].data.endswith(b"\0" * 8) and invocation.chunks[0].data.count(b"\0") == 8
    # AND it ended normally: no error trailers, and the Runtime API accepted it
    assert invocation.complete and invocation.trailers == {}
    assert status == 202


def test_a_failed_stream_ends_with_the_error_type_and_its_json_in_base64_in_the_trailers(stand_in):
    invocation = stand_in.submit({})
    stream = RuntimeResponseStream(stand_in.address, invocation.request_id)
    # GIVEN a stream that has sent some of its body
    stream.start(200, {"Content-Type": "text/event-stream"})
    stream.write(b"data: partial\n\n")
    # WHEN it fails and then ends
    stream.fail("Runtime.StreamError", "internal_error: generation failed")
    stream.finish()
    invocation.done.wait(10)
    # THEN everything written was delivered, then the trailers name the error type
    assert split_prelude(invocation.data)[1] == b"data: partial\n\n"
    assert invocation.trailers["lambda-runtime-function-error-type"] == "Runtime.StreamError"
    # AND carry the error as base64-encoded JSON (what the RIE decodes with base64.StdEncoding)
    error = json.loads(base64.b64decode(invocation.trailers["lambda-runtime-function-error-body"], validate=True))
    assert error["errorType"] == "Runtime.StreamError"
    assert error["errorMessage"] == "internal_error: generation failed"


def test_writes_return_false_once_the_runtime_api_stops_accepting_the_stream(stand_in):
    # GIVEN a Runtime API that closes the connection after two chunks (its caller went away)
    invocation = stand_in.submit({}, stop_after_chunks=2)
    stream = RuntimeResponseStream(stand_in.address, invocation.request_id)
    stream.start(200, {"Content-Type": "text/event-stream"})
    stream.write(b"data: token\n\n")  # the last chunk it takes (this write may already see it stop)
    assert invocation.done.wait(30), "the stand-in did not stop reading"
    # WHEN the runtime keeps writing after the connection was closed
    results = []
    for _ in range(50):
        results.append(stream.write(b"data: token\n\n"))
        if not results[-1]:
            break
        time.sleep(0.02)
    # THEN the first or second write reports it, the stream is closed, and later writes fail at once
    assert results[-1] is False and len(results) <= 2, results
    assert not stream.open and stream.write(b"data: late\n\n") is False
    # AND ending it does not raise or hang
    assert stream.finish() is None


def test_a_rest_proxy_response_becomes_a_prelude_with_its_multi_value_headers_and_the_body_bytes():
    response = {
        "statusCode": 422,
        "multiValueHeaders": {"Content-Type": ["application/json"]},
        "body": '{"error": "validation_error"}',
        "isBase64Encoded": False,
    }
    prelude, body = proxy_prelude(response)
    assert prelude == {"statusCode": 422, "multiValueHeaders": {"Content-Type": ["application/json"]}}
    assert body == b'{"error": "validation_error"}'


def test_an_http_api_proxy_response_keeps_headers_and_cookies_and_decodes_a_base64_body():
    response = {
        "statusCode": 200,
        "headers": {"Content-Type": "application/octet-stream"},
        "cookies": ["session=1"],
        "body": base64.b64encode(b"\x00\xffbytes").decode(),
        "isBase64Encoded": True,
    }
    prelude, body = proxy_prelude(response)
    assert prelude == {
        "statusCode": 200,
        "headers": {"Content-Type": "application/octet-stream"},
        "cookies": ["session=1"],
    }
    assert body == b"\x00\xffbytes"
