"""`stream: true` on the OpenAI routes, on the streaming surface, with a fake generator: OpenAI's chunk objects
(checked against the openai SDK's own types), the role chunk first, the usage chunk and `data: [DONE]` last,
the same text and usage as the buffered answer, errors before the first byte in OpenAI's shape as normal
responses, an error chunk after it, and what cannot be streamed refused by name."""

from __future__ import annotations

import json

import pytest
from conftest import LambdaContext, load_event, openai_event
from fakes import FakeGenerator
from openai._models import construct_type
from openai.types import Completion as SdkCompletion
from openai.types.chat import ChatCompletionChunk as SdkChatCompletionChunk
from recording_stream import RecordingStream
from runtime_api import sse_events

from phi2.api import streams
from phi2.engine import generator as generator_module
from phi2.runtime import handler

MODEL = "microsoft/phi-2"
TOKENS = (" Paris", " is", " the", " capital", ".")


@pytest.fixture
def fake(monkeypatch) -> FakeGenerator:
    generator = FakeGenerator(model_id=MODEL, tokens=TOKENS)
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    return generator


def streamed(event: dict) -> tuple[RecordingStream, dict]:
    stream = RecordingStream()
    with streams.serving(stream):
        response = handler.lambda_handler(event, LambdaContext())
    return stream, response


def data_of(stream: RecordingStream) -> list[str]:
    return [e["data"] for e in sse_events(stream.body) if "data" in e]


def completion_chunks(data: list[str]) -> list[SdkCompletion]:
    """Completion chunks read as the SDK reads a stream (its `construct_type`: a streamed chunk's
    finish_reason is null until the end, which the non-streamed type does not allow)."""
    chunks = []
    for item in data:
        raw = json.loads(item)
        assert raw["object"] == "text_completion" and set(raw) >= {"id", "created", "model", "choices"}
        for choice in raw["choices"]:
            assert set(choice) >= {"index", "text", "logprobs", "finish_reason"}
            assert choice["finish_reason"] in (None, "stop", "length")
        chunks.append(construct_type(value=raw, type_=SdkCompletion))
    return chunks


def buffered(event: dict) -> dict:
    body = json.loads(event["body"])
    body.pop("stream", None)
    body.pop("stream_options", None)
    response = handler.lambda_handler({**event, "body": json.dumps(body)}, LambdaContext())
    assert response["statusCode"] == 200, response
    return json.loads(response["body"])


def test_a_streamed_chat_is_sdk_chunks_with_the_role_first_then_the_text_then_usage_and_done(fake):
    # GIVEN the SDK's stream=True chat request with include_usage (events/openai/rest-chat-completions-stream)
    event = load_event("openai/rest-chat-completions-stream")
    # WHEN the streaming surface serves it
    stream, _ = streamed(event)
    # THEN it is a 200 event stream that ends with [DONE]
    assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
    assert stream.headers["x-request-id"]
    data = data_of(stream)
    assert data[-1] == "[DONE]"
    # AND every other event is a chunk the SDK's own type accepts
    chunks = [SdkChatCompletionChunk.model_validate_json(d) for d in data[:-1]]
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    # AND the first carries the assistant's role, the last (include_usage) no choices and the usage
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # AND the deltas make the buffered answer's message, with its finish reason and usage
    answer = buffered(event)
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1] if c.choices)
    assert content == answer["choices"][0]["message"]["content"]
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices and c.choices[0].finish_reason]
    assert finishes == [answer["choices"][0]["finish_reason"]]
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == tuple(
        answer["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
    )


def test_the_role_chunk_goes_out_with_the_first_bytes_before_the_prompt_pass(fake):
    fake.prompt_pass_s = 0.3
    stream, _ = streamed(load_event("openai/rest-chat-completions-stream"))
    first_at, first = stream.writes[0]
    assert first.startswith(b": ok\n\ndata: ") and b'"role":"assistant"' in first
    first_token_at = next(at for at, data in stream.writes if b"Paris" in data)
    assert first_token_at - first_at >= 0.3 * 0.9


def test_a_streamed_completion_with_two_samples_is_sdk_chunks_indexed_per_choice(fake):
    event = openai_event("rest-completions-sdk", stream=True, n=2, seed=7, temperature=0.8)
    stream, _ = streamed(event)
    data = data_of(stream)
    assert data[-1] == "[DONE]"
    chunks = completion_chunks(data[:-1])
    # THEN each choice's text, reassembled, is the buffered answer's for the same request
    answer = buffered(event)
    texts = {i: "".join(ch.text for c in chunks for ch in c.choices if ch.index == i) for i in (0, 1)}
    assert texts == {c["index"]: c["text"] for c in answer["choices"]}
    # AND no usage chunk was asked for
    assert all(c.usage is None for c in chunks)


def test_streamed_completion_logprobs_give_each_token_its_alternatives_and_offset(fake):
    event = openai_event("rest-completions-sdk", stream=True, logprobs=2)
    stream, _ = streamed(event)
    chunks = completion_chunks(data_of(stream)[:-1])
    entries = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [lp.tokens[0] for lp in entries] == list(TOKENS)
    assert all(lp.token_logprobs == [-0.5] and len(lp.top_logprobs[0]) == 3 for lp in entries)
    prompt = json.loads(event["body"])["prompt"]
    offsets = [lp.text_offset[0] for lp in entries]
    assert offsets == [len(prompt) + len("".join(TOKENS[:i])) for i in range(len(TOKENS))]


def test_an_echoed_prompt_streams_first(fake):
    event = openai_event("rest-completions-sdk", stream=True, echo=True)
    stream, _ = streamed(event)
    chunks = completion_chunks(data_of(stream)[:-1])
    prompt = json.loads(event["body"])["prompt"]
    assert chunks[0].choices[0].text == prompt
    assert "".join(ch.text for c in chunks for ch in c.choices) == buffered(event)["choices"][0]["text"]


@pytest.mark.parametrize(
    ("changes", "param"),
    [({"best_of": 3, "n": 1}, "best_of"), ({"echo": True, "logprobs": 1}, "echo")],
)
def test_what_cannot_be_streamed_is_refused_naming_the_field_before_any_byte(fake, changes, param):
    stream, response = streamed(openai_event("rest-completions-sdk", stream=True, **changes))
    assert not stream.started and fake.calls == []
    body = json.loads(response["body"])
    assert response["statusCode"] == 400 and body["error"]["param"] == param


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"model": "gpt-4o"}, 404, "model_not_found"),
        ({"max_tokens": 4000}, 400, "context_length_exceeded"),
        ({"stream_options": {"include_usage": "yes"}}, 400, None),
    ],
)
def test_errors_before_the_first_byte_are_normal_openai_error_responses(fake, changes, status, code):
    stream, response = streamed(openai_event("rest-completions-sdk", stream=True, **changes))
    assert not stream.started
    body = json.loads(response["body"])
    assert response["statusCode"] == status and set(body) == {"error"}
    if code:
        assert body["error"]["code"] == code


def test_a_failure_after_the_first_byte_is_an_openai_error_chunk_the_sdk_raises(fake):
    fake.fail_after_tokens = 2
    stream, _ = streamed(load_event("openai/rest-chat-completions-stream"))
    data = data_of(stream)
    assert data[-1] != "[DONE]"
    error = json.loads(data[-1])["error"]
    assert error["type"] == "server_error" and "x-request-id" in error["message"]
    assert stream.error is not None


def test_stream_false_on_the_streaming_surface_is_the_buffered_answer_unstreamed(fake):
    event = load_event("openai/rest-completions-sdk")
    stream, response = streamed(event)
    assert not stream.started and response["statusCode"] == 200
    assert json.loads(response["body"])["choices"][0]["text"] == "".join(TOKENS)


def test_stream_true_on_the_buffered_surface_is_refused_naming_the_streaming_api(fake):
    response = handler.lambda_handler(load_event("openai/rest-chat-completions-stream"), LambdaContext())
    body = json.loads(response["body"])
    assert response["statusCode"] == 400 and body["error"]["param"] == "stream"
