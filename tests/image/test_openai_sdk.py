"""The real `openai` SDK against `sam local start-api` of template.yaml and the real container image: the same
client a user points at the deployed API's OpenAIBaseUrl, here at SAM CLI's emulated API Gateway over HTTP:
completions, chat, typed errors, and structured output and tool calls (`parse` into pydantic models,
`json_object`, strict `json_schema`, tools with `required`, a named function and `auto`) with the image's own
constrained decoder (llguidance, installed from function/requirements.txt, no compiler at run time).

`sam local start-api` serves the template's paths without the stage, so the base URL is the server's root
(deployed: https://<api>.execute-api.<region>.amazonaws.com/v1). It serves the buffered API only: streamed tool
calls are tested against the image's streaming entry point in test_streaming.py."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.image

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(start_api_url):
    # The cold start (the model's load in SAM's container) can take a while on a loaded machine.
    with openai.OpenAI(
        base_url=start_api_url,
        api_key="unused",
        default_headers={"x-api-key": "local"},
        max_retries=0,
        timeout=300,
    ) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def model(client) -> str:
    (served,) = client.models.list().data
    return served.id


def test_sdk_chat_completion_through_the_container_answers_paris(client, model, report):
    completion = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    report["sam_openai_chat_completion_tokens"] = completion.usage.completion_tokens
    assert "Paris" in completion.choices[0].message.content, completion
    assert completion.object == "chat.completion" and completion.model == model


def test_sdk_text_completion_through_the_container_continues_the_prompt(client, model):
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert "Paris" in completion.choices[0].text, completion
    assert completion.object == "text_completion"


def test_sdk_errors_through_the_container_are_typed(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1_000_000)
    assert raised.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-4o")
    assert raised.value.code == "model_not_found"


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]
    landmarks: list[str] = Field(max_length=3)


def test_sdk_parse_through_the_container_returns_a_pydantic_object(client, model, report):
    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        temperature=0,
        max_tokens=160,
    )
    choice = completion.choices[0]
    report["sam_openai_parse_completion_tokens"] = completion.usage.completion_tokens
    assert isinstance(choice.message.parsed, City), choice
    assert choice.finish_reason == "stop" and choice.model_extra["json_complete"] is True


def test_sdk_json_object_and_strict_json_schema_through_the_container(client, model):
    loose = client.chat.completions.create(
        model=model, messages=QUESTION, response_format={"type": "json_object"}, temperature=0, max_tokens=60
    )
    assert isinstance(json.loads(loose.choices[0].message.content), dict), loose
    schema = {
        "type": "object",
        "properties": {
            "capital": {"type": "string", "maxLength": 20},
            "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
        },
        "required": ["capital", "population_millions"],
        "additionalProperties": False,
    }
    strict = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}},
        n=2,
        seed=7,
        temperature=0.8,
        max_tokens=60,
    )
    for choice in strict.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


TOOLS = [openai.pydantic_function_tool(GetWeather)]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_sdk_tool_calls_through_the_container(client, model):
    # required: calls whose arguments parse into the pydantic model, finish_reason tool_calls
    required = client.chat.completions.parse(
        model=model, messages=WEATHER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80
    ).choices[0]
    assert required.finish_reason == "tool_calls" and required.message.tool_calls, required
    assert all(isinstance(c.function.parsed_arguments, GetWeather) for c in required.message.tool_calls)
    # a named function: exactly that call, finish_reason stop (as OpenAI answers a forced call)
    named = client.chat.completions.parse(
        model=model,
        messages=WEATHER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        temperature=0,
        max_tokens=80,
    ).choices[0]
    assert named.finish_reason == "stop" and named.message.tool_calls[0].function.name == "GetWeather", named
    # auto: text, or calls that validate
    auto = client.chat.completions.create(
        model=model, messages=WEATHER, tools=TOOLS, temperature=0.8, seed=1, max_tokens=80
    ).choices[0]
    if auto.message.tool_calls:
        assert auto.finish_reason == "tool_calls"
        for call in auto.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    else:
        assert auto.message.content is not None


def test_sdk_a_schema_the_decoder_refuses_is_a_typed_error_through_the_container(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model,
            messages=QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            },
        )
    assert raised.value.code == "invalid_json_schema" and "uniqueItems" in raised.value.message
