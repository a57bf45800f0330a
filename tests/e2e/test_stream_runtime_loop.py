"""The streaming runtime's loop (`phi2.runtime.stream_runtime.main`, in its own process, with a fake generator) against
a local stand-in of Lambda's Runtime API: what it posts for each kind of invocation, that a failure
mid-stream ends with an error event and the error trailers, that a stream nobody reads any more stops the
generation, that it keeps serving afterwards, and that every hostile request of the catalogue gets exactly
the answer the buffered surface gives, as a normal (non-streamed) response."""

from __future__ import annotations

import base64
import copy
import json

import pytest
from conftest import LambdaContext, load_event
from fakes import FakeGenerator
from reliability.hostile import load, names
from runtime_api import RuntimeApiStandIn, RuntimeProcess, split_prelude, sse_events

from phi2.engine import generator as generator_module
from phi2.runtime import handler

pytestmark = pytest.mark.e2e

TOKENS = [" Paris", ".", " It", " is", " lovely", "."]
MODEL = "tiny-random-phi"  # the model the catalogue's OpenAI requests name (the RIE tests serve tiny-phi)
# The RIE cuts a payload over Lambda's limit (Lambda itself never runs the function): nothing to compare.
RIE_ONLY = {"direct-event-over-the-invoke-limit"}


@pytest.fixture(scope="module")
def stand_in():
    server = RuntimeApiStandIn()
    yield server
    server.close()


@pytest.fixture(scope="module")
def runtime(stand_in):
    process = RuntimeProcess(
        stand_in,
        ["-m", "stream_fake_runtime"],
        # 50 ms a token: a stream the stand-in stops taking is noticed well within the six tokens, on any CPU
        FAKE_GENERATOR=json.dumps({"tokens": TOKENS, "step_s": 0.05, "model_id": MODEL}),
        API_TIMEOUT_MS="300000",
    )
    yield process
    died = process.died_by()
    logs = process.logs()
    process.stop()
    assert died is None, f"the streaming runtime died by {died}:\n{logs[-4000:]}"


def stream_event(body: dict) -> dict:
    event = load_event("rest-generate-greedy")
    event["path"] = "/generate_stream"
    event["body"] = json.dumps(body)
    return event


def buffered_answer(payload: bytes, monkeypatch) -> object:
    """What the buffered surface answers (the handler awslambdaric calls), with the same fake generator."""
    fake = FakeGenerator(tokens=tuple(TOKENS), step_s=0.0, model_id=MODEL)
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: fake)
    return handler.lambda_handler(json.loads(payload), LambdaContext())


# What differs between any two answers to one request: ids, clocks, random seeds, and the deadline's source
# (each surface has its own API_TIMEOUT_MS).
VOLATILE = {"request_id", "id", "created", "timings", "seed", "deadline_source", "system_fingerprint"}


def normalized(body: object) -> object:
    if isinstance(body, dict):
        return {key: normalized(value) for key, value in body.items() if key not in VOLATILE}
    if isinstance(body, list):
        return [normalized(item) for item in body]
    return body


def assert_serves_a_normal_request(stand_in: RuntimeApiStandIn, runtime: RuntimeProcess) -> None:
    answer = stand_in.invoke(stream_event({"prompt": "The capital of France is"}), wait_s=60)
    events = sse_events(split_prelude(answer.data)[1])
    assert json.loads(events[-1]["data"])["generated_text"] == "The capital of France is" + "".join(TOKENS)
    assert answer.complete and not answer.trailers and runtime.alive()


def test_a_streamed_answer_is_an_http_integration_response_of_well_formed_sse(stand_in, runtime):
    # WHEN /generate_stream is invoked
    answer = stand_in.invoke(stream_event({"prompt": "The capital of France is"}), wait_s=120)
    # THEN the runtime streamed it with the documented headers
    assert answer.streamed and answer.headers["content-type"] == "application/vnd.awslambda.http-integration-response"
    assert answer.headers["transfer-encoding"] == "chunked"
    # AND the prelude says 200 and Server-Sent Events, before the 8-NUL delimiter
    prelude, body = split_prelude(answer.data)
    assert prelude["statusCode"] == 200 and prelude["headers"]["Content-Type"].startswith("text/event-stream")
    # AND the body is well-formed SSE: the opening comment, a token per event, the final answer
    events = sse_events(body)
    assert events[0]["comments"] == ["ok"]
    payloads = [json.loads(e["data"]) for e in events[1:]]
    assert [p["token"]["text"] for p in payloads[:-1]] == TOKENS
    assert payloads[-1]["generated_text"] == "The capital of France is" + "".join(TOKENS)
    # AND each token left in its own chunk, as it was produced
    assert len(answer.chunks) >= len(TOKENS) + 2
    assert answer.complete and answer.trailers == {}


def test_a_direct_invocation_gets_its_plain_json_answer_unstreamed(stand_in, runtime):
    answer = stand_in.invoke({"prompt": "Hi", "max_new_tokens": 2}, wait_s=60)
    assert answer.kind == "response" and not answer.streamed
    assert json.loads(answer.body)["generated_text"] == "Hi" + "".join(TOKENS)


def test_a_failure_mid_stream_ends_with_an_error_event_and_the_error_trailers_and_the_loop_goes_on():
    # GIVEN a runtime (with a Runtime API of its own) whose generator fails after two tokens
    stand_in = RuntimeApiStandIn()
    process = RuntimeProcess(
        stand_in,
        ["-m", "stream_fake_runtime"],
        FAKE_GENERATOR=json.dumps({"tokens": TOKENS, "fail_after_tokens": 2}),
    )
    try:
        # WHEN a stream is asked for
        answer = stand_in.invoke(stream_event({"prompt": "The capital of France is"}), wait_s=120)
        # THEN the tokens made before the failure went out, then an error event with the request id
        events = sse_events(split_prelude(answer.data)[1])
        assert [json.loads(e["data"])["token"]["text"] for e in events[1:3]] == TOKENS[:2]
        assert events[-1]["event"] == "error"
        error = json.loads(events[-1]["data"])
        assert error["error"] == "internal_error" and error["request_id"] == answer.request_id
        # AND the stream ended with the error trailers (type, and base64 JSON)
        assert answer.complete
        assert answer.trailers["lambda-runtime-function-error-type"] == "Runtime.StreamError"
        trailer = json.loads(base64.b64decode(answer.trailers["lambda-runtime-function-error-body"]))
        assert trailer["errorType"] == "Runtime.StreamError" and "internal_error" in trailer["errorMessage"]
        # AND the same process serves the next invocation
        follow_up = stand_in.invoke(load_event("rest-health"), wait_s=60)
        assert split_prelude(follow_up.data)[0]["statusCode"] == 200
        assert process.alive()
    finally:
        died = process.died_by()
        process.stop()
        stand_in.close()
    assert died is None


def test_a_stream_the_runtime_api_stops_accepting_stops_the_generation(stand_in, runtime):
    # GIVEN a Runtime API that stops taking the stream after the prelude, the comment and one token
    answer = stand_in.invoke(stream_event({"prompt": "The capital of France is"}), wait_s=60, stop_after_chunks=3)
    assert not answer.complete
    # THEN the runtime serves the next invocation, and its log shows the generation was cancelled early
    assert_serves_a_normal_request(stand_in, runtime)
    generated = [r for r in runtime.records() if r.get("message") == "generated" and r.get("protocol") != "native"]
    cancelled = [r for r in generated if r["finish_reasons"] == ["cancelled"]]
    assert cancelled and cancelled[-1]["generated_tokens"] < len(TOKENS)


def test_an_unreadable_event_gets_the_runtimes_unmarshal_error_and_the_loop_goes_on(stand_in, runtime):
    answer = stand_in.invoke(b'{"prompt": ', wait_s=60)
    assert answer.kind == "error"
    error = json.loads(answer.body)
    assert error["errorType"] == "Runtime.UnmarshalError" and error["stackTrace"] == []
    assert_serves_a_normal_request(stand_in, runtime)


def asks_to_stream(payload: bytes) -> bool:
    try:
        body = json.loads(json.loads(payload)["body"])
    except (ValueError, TypeError, KeyError, RecursionError):
        return False
    return isinstance(body, dict) and body.get("stream") is True


def hostile_cases() -> list[tuple[str, str]]:
    """Every catalogue case as it is, and its body sent to /generate_stream when it is a REST /generate 4xx."""
    cases = [(name, "as-is") for name in names() if name not in RIE_ONLY]
    for name in names():
        case = load(name)
        # (a case only the real model answers with a 4xx is answered 200 by the fake generators here)
        if case.expect.get("status", 200) >= 400 and name.startswith("rest-") and not case.real_model:
            event = json.loads(case.payload)
            if isinstance(event, dict) and event.get("path") == "/generate":
                cases.append((name, "to-generate-stream"))
    return cases


@pytest.mark.parametrize(("name", "variant"), hostile_cases())
def test_a_hostile_request_gets_the_buffered_surfaces_answer_as_a_normal_response(
    stand_in, runtime, monkeypatch, name, variant
):
    case = load(name)
    payload = case.payload
    # GIVEN a case of the catalogue (or its body sent to the streaming route)
    if variant == "to-generate-stream":
        event = json.loads(payload)
        streamed_event = copy.deepcopy(event)
        streamed_event["path"] = "/generate_stream"
        payload_sent = json.dumps(streamed_event).encode()
    else:
        payload_sent = payload
    # WHEN the streaming runtime answers it
    answer = stand_in.invoke(payload_sent, wait_s=120)
    # THEN it is exactly what the buffered surface answers for the same request
    if "runtime_error" in case.expect:
        assert answer.kind == "error" and json.loads(answer.body)["errorType"] == case.expect["runtime_error"]
        return
    if asks_to_stream(payload):
        # Refused by the buffered surface (which names this one), served here: a stream that ends with [DONE]
        prelude, body = split_prelude(answer.data)
        assert prelude["statusCode"] == 200 and sse_events(body)[-1]["data"] == "[DONE]"
        return
    expected = buffered_answer(payload, monkeypatch)
    if isinstance(expected, dict) and "statusCode" in expected:
        # An API Gateway answer: a prelude and the JSON body in one piece, never an event stream
        prelude, body = split_prelude(answer.data)
        assert prelude["statusCode"] == expected["statusCode"], (body[:300], expected["body"][:300])
        content_type = prelude.get("headers", {}).get("Content-Type") or prelude["multiValueHeaders"]["Content-Type"][0]
        assert content_type == "application/json"
        # (a message that names the route names the one it was sent to)
        got = body.decode().replace("/generate_stream", "/generate") if variant == "to-generate-stream" else body
        assert normalized(json.loads(got)) == normalized(json.loads(expected["body"]))
    else:
        assert answer.kind == "response" and not answer.streamed
        assert normalized(json.loads(answer.body)) == normalized(expected)
    assert runtime.alive()
