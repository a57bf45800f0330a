"""Structured output and tool calls with the real `openai` SDK against the function under the real Lambda RIE,
serving SmolLM2-135M-Instruct (the real small model here): `parse` with pydantic models (nested objects, arrays,
enums, optional fields), `json_object`, strict `json_schema`, 22 schemas x 3 seeds whose every answer validates,
tools with `required`, a named function and `auto`, a tool result in the history, the SDK's
LengthFinishReasonError for an answer cut by max_tokens, the typed errors for a bad schema or tool, /tokenize,
and vLLM's `structured_outputs` on completions. One RIE process serves this module and test_openai_sdk_rie.py."""

from __future__ import annotations

import json
from typing import Literal

import httpx2
import jsonschema
import openai
import pytest
from apigateway_transport import BASE_URL
from pydantic import BaseModel, Field

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ASK = "Answer with JSON only."


@pytest.fixture(scope="module")
def client(smollm2_openai_client):
    return smollm2_openai_client


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": ASK}, {"role": "user", "content": text}]


# parse() with pydantic models


class Address(BaseModel):
    street: str = Field(max_length=30)
    city: str = Field(max_length=20)
    country: Literal["FR", "DE", "GB", "US", "IT"]


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    nickname: str | None = Field(max_length=12)
    languages: list[Literal["en", "fr", "de", "it"]] = Field(max_length=3)
    address: Address


def test_parse_returns_a_pydantic_object_with_nested_objects_arrays_enums_and_optional_fields(client, model):
    # WHEN the SDK parses a sampled answer into a pydantic model (it sends a strict json_schema)
    completion = client.chat.completions.parse(
        model=model,
        messages=ask("Describe a famous scientist: name, age, nickname, languages, address."),
        response_format=Person,
        temperature=0.7,
        seed=3,
        max_tokens=200,
    )
    choice = completion.choices[0]
    # THEN the answer is a Person, complete
    person = choice.message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address), choice.message.content
    assert choice.finish_reason == "stop" and choice.model_extra["json_complete"] is True
    assert Person.model_validate_json(choice.message.content) == person


def test_json_object_mode_answers_a_json_object(client, model):
    completion = client.chat.completions.create(
        model=model,
        messages=ask("Give the capital of France as JSON."),
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=60,
    )
    content = completion.choices[0].message.content
    assert isinstance(json.loads(content), dict), content


def strict(properties: dict, **extra) -> dict:
    """An object as OpenAI's strict mode wants it: every property required, nothing else allowed."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
        **extra,
    }


SCHEMAS: list[dict] = [
    strict({"answer": {"type": "string", "maxLength": 20}}),
    strict({"n": {"type": "integer", "minimum": 1, "maximum": 10}}),
    strict({"ok": {"type": "boolean"}}),
    strict({"colour": {"enum": ["red", "green", "blue"]}}),
    strict({"x": {"type": "number", "minimum": -5, "maximum": 5, "multipleOf": 0.25}}),  # bounded digits
    strict({"tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3}}),
    strict(
        {
            "point": strict(
                {
                    "x": {"type": "integer", "minimum": 0, "maximum": 99},
                    "y": {"type": "integer", "minimum": 0, "maximum": 99},
                }
            )
        }
    ),
    strict({"v": {"type": ["string", "null"], "maxLength": 10}}),
    strict({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    strict({"day": {"type": "string", "format": "date"}}),
    strict({"id": {"type": "string", "format": "uuid"}}),
    strict({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 5}]}}),
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 2, "maxItems": 4},
    {"type": "string", "maxLength": 15},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 1900, "maximum": 2100},
    {
        "$defs": {
            "item": strict(
                {"name": {"type": "string", "maxLength": 10}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}
            )
        },
        **strict({"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 3}}),
    },
    strict(
        {
            "grid": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
                "maxItems": 3,
            }
        }
    ),
    strict({"name": {"type": "string", "maxLength": 12}, "role": {"const": "admin"}}),
    strict(
        {
            "shape": {
                "oneOf": [
                    strict({"circle": {"type": "integer", "minimum": 1, "maximum": 9}}),
                    strict({"square": {"type": "integer", "minimum": 1, "maximum": 9}}),
                ]
            }
        }
    ),
    strict(
        {
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "string", "maxLength": 6}, {"type": "integer", "minimum": 0, "maximum": 9}],
                "items": False,
            }
        }
    ),
    strict(
        {
            "a": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 50},
            "b": {"type": "string", "minLength": 2, "maxLength": 4},
        }
    ),
]


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_every_sampled_answer_validates_against_its_schema(client, model, index):
    # GIVEN one of 22 schemas (objects, arrays, enums, bounded numbers, patterns, formats, anyOf, oneOf, $ref,
    # tuples, top-level scalars; every string, number and list bounded, as a small model may otherwise go on until
    # max_tokens), strict, and three sampled choices (seeds 100+index, +1, +2)
    schema = SCHEMAS[index]
    completion = client.chat.completions.create(
        model=model,
        messages=ask("Fill in the JSON."),
        response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema, "strict": True}},
        n=3,
        seed=100 + index,
        temperature=0.9,
        max_tokens=160,
    )
    # THEN every choice is complete JSON that validates
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert choice.finish_reason == "stop" and choice.model_extra["json_complete"] is True, choice
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_an_answer_cut_by_max_tokens_makes_parse_raise_length_finish_reason_error(client, model):
    with pytest.raises(openai.LengthFinishReasonError) as raised:
        client.chat.completions.parse(
            model=model, messages=ask("Describe a scientist."), response_format=Person, temperature=0, max_tokens=5
        )
    choice = raised.value.completion.choices[0]
    assert choice.finish_reason == "length" and choice.model_extra["json_complete"] is False
    assert choice.message.content.startswith("{")


def test_a_schema_the_decoder_refuses_is_a_bad_request_naming_it(client, model):
    bad = {"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model,
            messages=ask("x"),
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}},
        )
    error = raised.value
    assert error.code == "invalid_json_schema" and error.param == "response_format.json_schema.schema"
    assert "uniqueItems" in error.message


# Tools


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=20)
    unit: Literal["celsius", "fahrenheit"]


class GetTime(BaseModel):
    """The local time in a time zone."""

    timezone: str = Field(max_length=24)


TOOLS = [openai.pydantic_function_tool(GetWeather), openai.pydantic_function_tool(GetTime)]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def test_tool_choice_required_calls_a_tool_with_arguments_that_parse(client, model):
    # (one call: greedy SmolLM2, allowed several, repeats its call until max_tokens; parallel calls: below)
    completion = client.chat.completions.parse(
        model=model,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
    )
    choice = completion.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "tool_calls"
    assert call.id.startswith("call_") and call.function.name in ("GetWeather", "GetTime")
    assert isinstance(call.function.parsed_arguments, GetWeather | GetTime)


def test_parallel_calls_are_each_whole_and_valid_even_when_cut(client, model):
    # GIVEN several calls allowed and too few tokens for all the model wants to make
    completion = client.chat.completions.create(
        model=model, messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=60
    )
    choice = completion.choices[0]
    calls = choice.message.tool_calls
    # THEN every call but a cut last one has arguments that validate, each its own id
    assert calls and len({c.id for c in calls}) == len(calls)
    complete = calls[:-1] if choice.finish_reason == "length" else calls
    for call in complete:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
    assert choice.model_extra["json_complete"] is (choice.finish_reason != "length")


def test_a_named_function_is_called_once_and_finishes_with_stop_as_openai_does(client, model):
    completion = client.chat.completions.parse(
        model=model,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        temperature=0,
        max_tokens=120,
    )
    choice = completion.choices[0]
    (call,) = choice.message.tool_calls
    assert choice.finish_reason == "stop" and call.function.name == "GetWeather"
    assert isinstance(call.function.parsed_arguments, GetWeather)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_auto_answers_either_text_or_calls_that_validate(client, model, seed):
    completion = client.chat.completions.create(
        model=model, messages=WEATHER_QUESTION, tools=TOOLS, temperature=0.8, seed=seed, max_tokens=120
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("stop", "tool_calls", "length"), choice
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        for call in choice.message.tool_calls:
            schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
            jsonschema.validate(json.loads(call.function.arguments), schema)
    else:
        assert isinstance(choice.message.content, str) and "<tool_call>" not in choice.message.content


def test_a_tool_result_in_the_history_is_read_and_the_conversation_goes_on(client, model):
    first = client.chat.completions.create(
        model=model,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "GetWeather"}},
        temperature=0,
        max_tokens=120,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *WEATHER_QUESTION,
        first.choices[0].message.model_dump(exclude_none=True, exclude={"annotations", "refusal"}),
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"},
    ]
    second = client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40
    )
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


def test_an_invalid_tool_name_and_a_missing_named_tool_are_bad_requests(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model, messages=WEATHER_QUESTION, tools=[{"type": "function", "function": {"name": "get weather"}}]
        )
    assert raised.value.param == "tools[0].function.name"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=model,
            messages=WEATHER_QUESTION,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "GetStockPrice"}},
        )
    assert raised.value.param == "tool_choice.function.name" and "GetStockPrice" in raised.value.message


# Completions and /tokenize


def test_completions_take_structured_outputs_as_vllm_does(client, model):
    completion = client.completions.create(
        model=model,
        prompt="Is Paris the capital of France? Answer:",
        max_tokens=5,
        temperature=0,
        extra_body={"structured_outputs": {"choice": [" yes", " no"]}},
    )
    assert completion.choices[0].text in (" yes", " no")


def test_tokenize_counts_exactly_the_prompt_tokens_a_chat_request_is_billed(client, model, smollm2_openai_transport):
    with httpx2.Client(transport=smollm2_openai_transport) as http:
        tokens = http.post(
            f"{BASE_URL}/tokenize", json={"model": model, "messages": WEATHER_QUESTION, "tools": TOOLS}
        ).json()
        text = http.post(f"{BASE_URL}/detokenize", json={"model": model, "tokens": tokens["tokens"]}).json()
    # (tool_choice left at auto, as /tokenize renders it: the prompt says what the choice requires)
    completion = client.chat.completions.create(model=model, messages=WEATHER_QUESTION, tools=TOOLS, max_tokens=1)
    assert tokens["count"] == completion.usage.prompt_tokens == len(tokens["tokens"])
    assert tokens["max_model_len"] == 8192
    assert "GetWeather" in text["prompt"] and text["prompt"].endswith("<|im_start|>assistant\n")
