"""`POST /generate_stream` through the handler with a fake generator: on the buffered surface it names the
streaming API; on the streaming surface (a response stream bound, as phi2.runtime.stream_runtime binds one) it
streams TGI-shaped Server-Sent Events, opens the stream before the prompt pass, answers errors found before
the first byte as normal responses, ends a failed stream with an error event, and stops when nobody reads."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import LambdaContext, load_event
from fakes import FakeGenerator
from recording_stream import RecordingStream
from runtime_api import sse_events

from phi2.api import streaming, streams
from phi2.engine import generator as generator_module
from phi2.runtime import handler
from phi2.settings import get_settings


def stream_event(body: dict, base: str = "rest-generate-greedy") -> dict:
    event = load_event(base)
    event["path"] = "/generate_stream"
    if "rawPath" in event:
        event["rawPath"] = "/generate_stream"
    event["body"] = json.dumps(body)
    return event


def invoke_streaming(event: dict, stream: RecordingStream) -> dict:
    with streams.serving(stream):
        return handler.lambda_handler(event, LambdaContext())


@pytest.fixture
def fake(monkeypatch) -> FakeGenerator:
    generator = FakeGenerator(tokens=(" Paris", ".", " It", " is"))
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    return generator


def data_events(stream: RecordingStream) -> list[dict]:
    return [json.loads(event["data"]) for event in sse_events(stream.body) if "data" in event]


def test_on_the_buffered_surface_generate_stream_answers_400_naming_the_streaming_base_url(fake, monkeypatch):
    # GIVEN the buffered function, told where the streaming API is
    settings = dataclasses.replace(get_settings(), stream_base_url="https://stream.example/v1")
    monkeypatch.setattr(streaming, "get_settings", lambda: settings)
    # WHEN /generate_stream reaches it (no response stream is bound)
    response = handler.lambda_handler(stream_event({"prompt": "The capital of France is"}), LambdaContext())
    # THEN it answers 400 naming the streaming URL, and generates nothing
    body = json.loads(response["body"])
    assert response["statusCode"] == 400 and body["error"] == "bad_request"
    assert "https://stream.example/v1/generate_stream" in body["message"]
    assert body["details"] == [{"stream_base_url": "https://stream.example/v1"}]
    assert fake.calls == []


def test_tokens_stream_as_tgi_events_then_a_final_event_with_the_answer_generate_gives(fake):
    request = {"prompt": "The capital of France is", "max_new_tokens": 8, "do_sample": False}
    stream = RecordingStream()
    # WHEN /generate_stream is served on the streaming surface
    invoke_streaming(stream_event(request), stream)
    # THEN the stream is a 200 of Server-Sent Events that opens with a comment
    assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(stream.body)
    assert events[0] == {"comments": ["ok"]}
    # AND has one event per token with its id, text and log-probability, in order
    payloads = data_events(stream)
    tokens = [p["token"] for p in payloads[:-1]]
    assert [t["text"] for t in tokens] == list(fake.tokens)
    assert all(isinstance(t["id"], int) and t["logprob"] == -0.5 and t["special"] is False for t in tokens)
    assert all(p["generated_text"] is None and p["details"] is None for p in payloads[:-1])
    assert [p["index"] for p in payloads] == list(range(1, len(payloads) + 1))
    # AND a final event with generated_text and details exactly as /generate answers them
    final = payloads[-1]
    buffered = json.loads(handler.lambda_handler(load_event("rest-generate-greedy"), LambdaContext())["body"])
    buffered_request = json.loads(load_event("rest-generate-greedy")["body"])
    assert final["token"] is None
    assert final["generated_text"] == buffered_request["prompt"] + "".join(fake.tokens) == buffered["generated_text"]
    assert set(final["details"]) == set(buffered["details"])
    assert final["details"]["finish_reason"] == "length" and final["details"]["generated_tokens"] == len(fake.tokens)
    # AND the log-probability was asked of the generator (TGI's events carry it)
    assert fake.calls[0].params.logprobs == 0
    assert stream.error is None


def test_the_stream_opens_at_admission_before_the_prompt_pass(fake):
    # GIVEN a generator whose prompt pass takes 0.3 s after it admits the request
    fake.prompt_pass_s = 0.3
    stream = RecordingStream()
    invoke_streaming(stream_event({"prompt": "a long prompt"}), stream)
    # THEN the status, headers and the opening comment went out before the prompt pass ended
    first_token_at = next(at for at, data in stream.writes if b'"token":{' in data)
    assert stream.writes[0][1] == b": ok\n\n"
    assert first_token_at - stream.writes[0][0] >= 0.3 * 0.9
    assert first_token_at - stream.started_at >= 0.3 * 0.9


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"prompt": ""}, 422, "validation_error"),
        ({"prompts": ["a", "b"]}, 422, "validation_error"),
        ({"prompt": "x" * 2000, "max_new_tokens": 100}, 422, "context_length_exceeded"),
        ({"prompt": "a", "temperature": "hot"}, 422, "validation_error"),
    ],
)
def test_errors_found_before_the_first_byte_are_normal_json_responses(fake, body, status, error):
    # GIVEN a bad request to the streaming route on the streaming surface
    stream = RecordingStream()
    # WHEN it is handled
    response = invoke_streaming(stream_event(body), stream)
    # THEN nothing was streamed: the answer is the normal JSON error, as on the buffered route
    assert not stream.started
    assert response["statusCode"] == status and json.loads(response["body"])["error"] == error


def test_a_failure_after_the_first_byte_ends_the_stream_with_an_error_event_and_marks_it_failed(fake):
    # GIVEN a generator that fails after two tokens
    fake.fail_after_tokens = 2
    stream = RecordingStream()
    invoke_streaming(stream_event({"prompt": "The capital of France is"}), stream)
    # THEN the two tokens went out, then an error event with the generic message and the request id
    events = sse_events(stream.body)
    assert [json.loads(e["data"])["token"]["text"] for e in events[1:3]] == [" Paris", "."]
    assert events[-1]["event"] == "error"
    error = json.loads(events[-1]["data"])
    assert error["error"] == "internal_error" and error["request_id"]
    assert "fake generator" not in stream.body.decode()  # the exception's text stays in the logs
    # AND the stream is marked failed, for the runtime's error trailers
    assert stream.error is not None and stream.error[0] == streaming.STREAM_ERROR_TYPE


def test_generation_stops_when_the_reader_stops_accepting_the_stream(fake):
    # GIVEN many tokens, and a reader that takes the opening comment and two events, then goes away
    fake.tokens = tuple(f" t{i}" for i in range(50))
    stream = RecordingStream(accept_writes=3)
    invoke_streaming(stream_event({"prompt": "count"}), stream)
    # THEN the generator was told to stop at the first step whose event was refused
    assert len(stream.writes) == 3
    assert fake.steps_taken == 3 < len(fake.tokens)
    assert stream.error is None  # nobody left to tell: no error, and no final event attempted
    assert b'generated_text":"' not in stream.body
