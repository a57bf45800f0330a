"""The streaming runtime's keep-alive (`python -m stream_fake_runtime`: the real runtime loop and handler, the
fake generator slowed by construction) against the Runtime API stand-in, which records every chunk in order.

API Gateway ends a stream that sends nothing for 5 minutes. Here STREAM_KEEPALIVE_SECONDS is short and the
work several times longer: a streamed answer gets SSE comments while its prompt is read; a whole answer on the
streaming API gets its 200 prelude and whitespace while it is computed, then its JSON; one that fails after
that carries its real status in the body; answers ready before the first silence are untouched normal
responses; a direct invocation is never kept alive (no API Gateway in front of it). What is asserted is what
arrived and in which order, not how late: the slow parts are sleeps, so they are long on any CPU.
"""

from __future__ import annotations

import json

import pytest
from conftest import load_event, openai_event
from runtime_api import RuntimeApiStandIn, RuntimeProcess, split_prelude, sse_events

from phi2.api import streams

pytestmark = pytest.mark.e2e

KEEPALIVE_S = 0.2
WORK_S = 2.0  # the fake's prompt pass, and a whole answer's compute: ten keep-alive intervals
TOKENS = [" Paris", ".", " It", " is"]
MODEL = "tiny-random-phi"
KEEPALIVE_CHUNK = streams.sse_comment(streams.KEEPALIVE_COMMENT)


def start(stand_in: RuntimeApiStandIn, **fake: object) -> RuntimeProcess:
    fields = {"tokens": TOKENS, "prompt_pass_s": WORK_S, "buffered_s": WORK_S, "model_id": MODEL, **fake}
    return RuntimeProcess(
        stand_in,
        ["-m", "stream_fake_runtime"],
        FAKE_GENERATOR=json.dumps(fields),
        API_TIMEOUT_MS="300000",
        STREAM_KEEPALIVE_SECONDS=str(KEEPALIVE_S),
    )


@pytest.fixture(scope="module")
def stand_in():
    server = RuntimeApiStandIn()
    yield server
    server.close()


@pytest.fixture(scope="module")
def runtime(stand_in):
    process = start(stand_in)
    yield process
    died = process.died_by()
    logs = process.logs()
    process.stop()
    assert died is None, f"the streaming runtime died by {died}:\n{logs[-4000:]}"


def generate_event(path: str, body: dict) -> dict:
    event = load_event("rest-generate-greedy")
    event["path"] = path
    event["body"] = json.dumps(body)
    return event


def test_a_streamed_answer_gets_comments_while_its_prompt_is_read(stand_in, runtime):
    # WHEN a stream whose prompt pass takes ten keep-alive intervals is asked for
    answer = stand_in.invoke(generate_event("/generate_stream", {"prompt": "The capital of France is"}), wait_s=60)
    prelude, body = split_prelude(answer.data)
    # THEN it opened at admission, then keep-alive comments came while the prompt was read, then the tokens
    assert prelude["statusCode"] == 200 and prelude["headers"]["Content-Type"].startswith("text/event-stream")
    events = sse_events(body)
    assert events[0]["comments"] == ["ok"]
    first_token = next(i for i, e in enumerate(events) if "data" in e)
    assert first_token >= 3, events[:first_token]
    assert all(e == {"comments": [streams.KEEPALIVE_COMMENT]} for e in events[1:first_token])
    # AND each keep-alive left in a chunk of its own, a whole SSE comment
    assert sum(chunk.data == KEEPALIVE_CHUNK for chunk in answer.chunks) == first_token - 1
    final = json.loads(events[-1]["data"])
    assert final["generated_text"] == "The capital of France is" + "".join(TOKENS)
    assert answer.complete and answer.trailers == {}


def test_a_whole_answer_gets_its_200_prelude_and_whitespace_before_its_json(stand_in, runtime):
    # WHEN /generate (not streamed) is asked on the streaming API, and takes ten keep-alive intervals
    answer = stand_in.invoke(generate_event("/generate", {"prompt": "The capital of France is"}), wait_s=60)
    prelude, body = split_prelude(answer.data)
    # THEN the prelude fixed 200 and JSON before the answer existed, then whitespace came, then the answer
    assert prelude == {
        "statusCode": 200,
        "headers": {"Content-Type": "application/json", "x-request-id": answer.request_id},
    }
    kept = [chunk.data for chunk in answer.chunks[1:-1]]
    assert len(kept) >= 3 and set(kept) == {streams.JSON_KEEPALIVE}
    assert body.startswith(streams.JSON_KEEPALIVE * len(kept))
    # AND the body is the JSON answer a JSON parser reads, whitespace and all
    answered = json.loads(body)
    assert answered["generated_text"] == "The capital of France is" + "".join(TOKENS)
    assert "status_code" not in answered
    assert answer.complete and answer.trailers == {}


def test_openai_whole_answers_are_kept_alive_the_same_way(stand_in, runtime):
    event = openai_event("rest-chat-completions-sdk", model=MODEL, stream=None)
    answer = stand_in.invoke(event, wait_s=60)
    prelude, body = split_prelude(answer.data)
    assert prelude["statusCode"] == 200 and body.startswith(streams.JSON_KEEPALIVE)
    assert json.loads(body)["object"] == "chat.completion"


def test_errors_known_before_any_compute_are_normal_responses_with_their_status(stand_in, runtime):
    # GIVEN requests refused before the model works: a validation error and a context overflow
    invalid = generate_event("/generate", {"prompt": "x", "max_new_tokens": "64"})
    overflow = generate_event("/generate_stream", {"prompt": "x" * 2040, "max_new_tokens": 64})
    for event, status, code in ((invalid, 422, "validation_error"), (overflow, 422, "context_length_exceeded")):
        # WHEN each is sent to the streaming API, whose keep-alive fires after 0.2 s of silence
        answer = stand_in.invoke(event, wait_s=60)
        prelude, body = split_prelude(answer.data)
        # THEN it is the normal error response: its own status, its JSON body alone
        assert prelude["statusCode"] == status, body
        assert json.loads(body)["error"] == code


def test_a_direct_invocation_is_never_kept_alive(stand_in, runtime):
    answer = stand_in.invoke({"prompt": "Hi", "max_new_tokens": 2}, wait_s=60)
    assert answer.kind == "response" and not answer.streamed
    assert json.loads(answer.body)["generated_text"] == "Hi" + "".join(TOKENS)


def test_a_whole_answer_that_fails_after_the_prelude_says_its_status_in_the_body():
    # GIVEN a model that fails after ten keep-alive intervals of work
    stand_in = RuntimeApiStandIn()
    process = start(stand_in, fail_with="the model failed")
    try:
        native = stand_in.invoke(generate_event("/generate", {"prompt": "The capital of France is"}), wait_s=60)
        openai = stand_in.invoke(openai_event("rest-chat-completions-sdk", model=MODEL, stream=None), wait_s=60)
        records = process.records()
        alive = process.alive()
    finally:
        died = process.died_by()
        process.stop()
        stand_in.close()
    # THEN the client saw 200 (sent before the failure), whitespace, then the error body with the real status
    for answer in (native, openai):
        prelude, body = split_prelude(answer.data)
        assert prelude["statusCode"] == 200 and body.startswith(streams.JSON_KEEPALIVE)
        assert json.loads(body)["status_code"] == 500
        # AND the body ended normally (a whole JSON value, no error trailers that would cut it short)
        assert answer.complete and answer.trailers == {}
    assert json.loads(split_prelude(native.data)[1])["error"] == "internal_error"
    assert json.loads(split_prelude(openai.data)[1])["error"]["type"] == "server_error"
    # AND the runtime logged it and went on
    assert [r["status"] for r in records if r.get("message") == "status after a keep-alive sent 200"] == [500, 500]
    assert alive and died is None
