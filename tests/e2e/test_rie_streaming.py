"""The streaming surface end to end through the real Lambda RIE with a real model (SmolLM2-135M): the image's
entry script started with the streaming Command (`phi2.runtime.stream_runtime`), next to the buffered surface
(awslambdaric). The RIE accepts the streamed POST and returns it whole: the prelude and its content type,
the 8-NUL delimiter, well-formed Server-Sent Events, and the same text as the buffered route for the same
greedy or seeded request; and the real `openai` SDK with `stream=True` reassembles exactly the buffered
answer from the captured stream. (When each part arrives is tested against a Runtime API stand-in:
test_stream_incremental_smollm2.py.) One pair of RIE processes serves the whole module."""

from __future__ import annotations

import json
import time
import urllib.request

import httpx2
import openai
import pytest
from apigateway_transport import BASE_URL, ApiGatewayTransport
from conftest import load_event
from rie import INVOKE_PATH, RieServer, api_body
from runtime_api import split_prelude, sse_events

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def surfaces(smollm2_dir):
    """(streaming, buffered): the two surfaces of the template, each under its own RIE."""
    # The protocol is under test here, not the deadline: budgets generous enough that a loaded machine does
    # not turn either surface's answer into a time limit.
    streaming = RieServer(smollm2_dir, HANDLER="phi2.runtime.stream_runtime", API_TIMEOUT_MS="300000")
    buffered = RieServer(smollm2_dir, API_TIMEOUT_MS="120000")
    try:
        for surface in (streaming, buffered):
            wait_until_ready(surface)
        yield streaming, buffered
    finally:
        streaming.stop()
        buffered.stop()


def wait_until_ready(rie: RieServer, attempts: int = 60) -> None:
    """Invoke /health until the model is loaded (on-demand init loads it in the background)."""
    for _ in range(attempts):
        raw = invoke_bytes(rie, load_event("rest-health"))
        status = split_prelude(raw)[0]["statusCode"] if b"\0" * 8 in raw else json.loads(raw)["statusCode"]
        if status == 200:
            return
        time.sleep(2)
    raise TimeoutError(f"the model did not load:\n{rie.logs()[-3000:]}")


def invoke_bytes(rie: RieServer, event: dict, timeout: float = 600) -> bytes:
    """The invoke's raw answer (a streamed answer is not JSON: prelude, NULs, body)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{rie.port}{INVOKE_PATH}", data=json.dumps(event).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def on(path: str, body: dict) -> dict:
    event = load_event("rest-generate-greedy")
    event["path"] = path
    event["body"] = json.dumps(body)
    return event


@pytest.mark.parametrize(
    "request_body",
    [
        {"prompt": "The capital of France is", "max_new_tokens": 16, "do_sample": False},
        {"prompt": "Once upon a time", "max_new_tokens": 16, "do_sample": True, "seed": 1234, "temperature": 0.9},
    ],
    ids=["greedy", "seeded-sampling"],
)
def test_the_stream_is_a_prelude_then_sse_whose_text_is_the_buffered_routes(surfaces, request_body):
    streaming, buffered = surfaces
    # GIVEN the buffered surface's answer to /generate
    expected = api_body(buffered.invoke(on("/generate", request_body)))
    # WHEN the streaming surface answers /generate_stream for the same request
    raw = invoke_bytes(streaming, on("/generate_stream", request_body))
    # THEN it is a JSON prelude (200, Server-Sent Events), the 8-NUL delimiter, then the events
    prelude, body = split_prelude(raw)
    assert prelude["statusCode"] == 200
    assert prelude["headers"]["Content-Type"] == "text/event-stream; charset=utf-8"
    assert raw.count(b"\0" * 8) == 1 and raw.index(b"\0" * 8) == len(json.dumps(prelude, separators=(",", ":")))
    # AND the events are well-formed SSE: the opening comment, one per token, the final answer
    events = sse_events(body)
    assert events[0] == {"comments": ["ok"]}
    payloads = [json.loads(e["data"]) for e in events[1:]]
    tokens, final = payloads[:-1], payloads[-1]
    assert all(isinstance(p["token"]["id"], int) and isinstance(p["token"]["logprob"], float) for p in tokens)
    # AND the streamed text is exactly the buffered route's, token by token and as a whole
    completion = "".join(p["token"]["text"] for p in tokens)
    assert request_body["prompt"] + completion == expected["generated_text"] == final["generated_text"]
    assert final["details"]["generated_tokens"] == expected["details"]["generated_tokens"] == len(tokens)
    assert final["details"]["finish_reason"] == expected["details"]["finish_reason"]
    assert final["details"]["seed"] == expected["details"]["seed"] or not request_body.get("seed")


def test_a_non_streamed_route_on_the_streaming_surface_is_one_chunk_with_the_buffered_answer(surfaces):
    streaming, buffered = surfaces
    request_body = {"prompt": "The capital of France is", "max_new_tokens": 8, "do_sample": False}
    expected = api_body(buffered.invoke(on("/generate", request_body)))
    prelude, body = split_prelude(invoke_bytes(streaming, on("/generate", request_body)))
    assert prelude["statusCode"] == 200
    assert prelude["multiValueHeaders"]["Content-Type"] == ["application/json"]
    assert json.loads(body)["generated_text"] == expected["generated_text"]


@pytest.mark.parametrize(
    ("request_body", "status", "error"),
    [
        ({"prompt": ""}, 422, "validation_error"),
        ({"prompt": "x " * 9000, "max_new_tokens": 10}, 422, "context_length_exceeded"),
    ],
)
def test_a_bad_streaming_request_gets_the_buffered_routes_4xx_as_a_normal_response(
    surfaces, request_body, status, error
):
    streaming, buffered = surfaces
    expected = buffered.invoke(on("/generate", request_body))
    prelude, body = split_prelude(invoke_bytes(streaming, on("/generate_stream", request_body)))
    assert prelude["statusCode"] == expected["statusCode"] == status
    assert json.loads(body)["error"] == api_body(expected)["error"] == error
    assert streaming.alive()


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class StreamingApiGatewayTransport(ApiGatewayTransport):
    """API Gateway's streaming integration, played over the RIE: the prelude's status and headers, then the
    body after the delimiter (the RIE has captured the whole stream)."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        event = self.event_for(request)
        self.events.append(event)
        prelude, body = split_prelude(invoke_bytes(self.rie, event))
        headers = list((prelude.get("headers") or {}).items())
        headers += [
            (name, value) for name, values in (prelude.get("multiValueHeaders") or {}).items() for value in values
        ]
        return httpx2.Response(prelude["statusCode"], headers=headers, content=body, request=request)


def sdk(transport: ApiGatewayTransport) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=BASE_URL,
        api_key="unused",
        default_headers={"x-api-key": "test-key"},
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


@pytest.fixture(scope="module")
def clients(surfaces):
    """(streaming, buffered) SDK clients, each on its surface."""
    streaming, buffered = surfaces
    with (
        sdk(StreamingApiGatewayTransport(streaming)) as streaming_client,
        sdk(ApiGatewayTransport(buffered)) as buffered_client,
    ):
        yield streaming_client, buffered_client


def test_a_streamed_chat_reassembles_exactly_the_buffered_answer_with_its_usage(clients):
    streaming, buffered = clients
    model = buffered.models.list().data[0].id
    expected = buffered.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    # WHEN the SDK streams the same request, with the usage
    chunks = list(
        streaming.chat.completions.create(
            model=model,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    # THEN the deltas are the buffered message, the finish reason and the usage are the same
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected.choices[0].message.content
    assert "Paris" in content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        expected.choices[0].finish_reason
    ]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.model_dump() == expected.usage.model_dump()


def test_a_streamed_completion_with_seeded_samples_reassembles_each_buffered_choice(clients):
    streaming, buffered = clients
    model = buffered.models.list().data[0].id
    request = {"model": model, "prompt": "Once upon a time", "max_tokens": 12, "n": 2, "seed": 11, "temperature": 0.9}
    expected = buffered.completions.create(**request)
    texts = {0: "", 1: ""}
    for chunk in streaming.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {c.index: c.text for c in expected.choices}


def test_a_bad_streamed_request_raises_the_same_typed_error_as_buffered(clients):
    streaming, buffered = clients
    with pytest.raises(openai.NotFoundError) as streamed_error:
        streaming.chat.completions.create(model="gpt-4o", messages=QUESTION, stream=True)
    with pytest.raises(openai.NotFoundError) as buffered_error:
        buffered.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert streamed_error.value.code == buffered_error.value.code == "model_not_found"


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
def test_streamed_tool_calls_come_in_openais_delta_shape_and_match_the_buffered_call(clients, tool_choice):
    streaming, buffered = clients
    model = buffered.models.list().data[0].id
    request = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice,
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 80,
    }
    # GIVEN the buffered answer: one call
    expected = buffered.chat.completions.create(**request).choices[0]
    (expected_call,) = expected.message.tool_calls
    # WHEN the SDK streams the same request
    chunks = list(streaming.chat.completions.create(**request, stream=True))
    # THEN the first piece of the call carries its id, type and name with empty arguments, the later pieces only
    # more arguments (OpenAI's delta shape)
    pieces = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
    assert (
        pieces[0].id.startswith("call_") and pieces[0].type == "function" and pieces[0].function.name == "get_weather"
    )
    assert pieces[0].function.arguments == "" and all(p.id is None and p.function.name is None for p in pieces[1:])
    # AND, accumulated, they are the buffered call (ids differ: each answer names its own), and the same finish
    arguments = "".join(p.function.arguments for p in pieces)
    assert arguments == expected_call.function.arguments
    json.loads(arguments)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [expected.finish_reason] == ["tool_calls" if tool_choice == "required" else "stop"]
