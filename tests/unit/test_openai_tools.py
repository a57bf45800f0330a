"""Structured output, tool calls, /tokenize and /detokenize on the OpenAI routes, with a fake generator for the
protocol (bodies in, OpenAI's shapes out, checked with the openai SDK's own types and its stream accumulator) and
the real constrained decoder (llguidance, on Phi-2's tokenizer) for the grammars the requests become."""

from __future__ import annotations

import json

import pytest
from conftest import LambdaContext, openai_event
from fakes import FakeGenerator
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.types.chat import ChatCompletion as SdkChatCompletion
from openai.types.chat import ChatCompletionChunk as SdkChatCompletionChunk
from reliability.hostile import outcome
from transformers import AutoTokenizer

from phi2.api.openai import serving, tools
from phi2.api.openai.protocol import ChatCompletionRequest
from phi2.engine import generator as generator_module
from phi2.engine.constrained.matcher import GrammarCompiler
from phi2.engine.generator import StepEvent
from phi2.runtime import handler

MODEL = "microsoft/phi-2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>'


@pytest.fixture
def fake(monkeypatch) -> FakeGenerator:
    generator = FakeGenerator(model_id=MODEL, finish_reason="eos_token")
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    return generator


def answer(event: dict) -> tuple[int, dict]:
    got = outcome(handler.lambda_handler(event, LambdaContext()))
    return got.status, got.body


def chat(**body) -> tuple[int, dict]:
    return answer(openai_event("rest-chat-completions-sdk", **body))


def error_of(body: dict) -> tuple[str, str]:
    return body["error"]["param"], body["error"]["code"]


# What requests become


def test_response_format_json_schema_becomes_the_grammar_with_its_field_named(fake):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    status, body = chat(response_format=fmt, temperature=0)
    assert status == 200, body
    grammar = fake.calls[0].params.grammar
    # Phi-2's QA format ends with "Output:": the JSON may begin after its space, as free text would
    assert grammar.kind == "lark" and grammar.origin == "response_format.json_schema.schema" and grammar.is_json
    assert '" "? value' in grammar.source and '"required":["city"]' in grammar.source
    # AND the answer says the JSON is complete
    assert body["choices"][0]["json_complete"] is True
    SdkChatCompletion.model_validate(body)


def test_with_a_chat_template_the_json_schema_is_the_grammar_itself(monkeypatch):
    generator = FakeGenerator(model_id=MODEL, chat_template=True)
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    chat(response_format={"type": "json_object"})
    grammar = generator.calls[0].params.grammar
    assert grammar.kind == "json_schema" and json.loads(grammar.source) == {"type": "object"}


def test_json_complete_is_only_on_constrained_answers_and_false_when_cut(fake):
    _, plain = chat()
    assert "json_complete" not in plain["choices"][0]
    fake.grammar_complete, fake.finish_reason = False, "length"
    _, cut = chat(response_format={"type": "json_object"}, max_tokens=3)
    choice = cut["choices"][0]
    assert choice["json_complete"] is False and choice["finish_reason"] == "length"


def test_tools_are_shown_in_the_prompt_deterministically_with_sorted_keys(fake):
    # GIVEN the same tools twice, their JSON written in different key orders
    shuffled = json.loads(json.dumps(WEATHER["function"]), object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    chat(tools=[WEATHER, TIME])
    chat(tools=[{"type": "function", "function": shuffled}, TIME])
    # THEN the prompts are identical, each tool a line of JSON with sorted keys
    first, second = fake.calls[0].prompts[0], fake.calls[1].prompts[0]
    assert first == second
    line = json.dumps(
        {
            "description": "The weather in a city",
            "name": "get_weather",
            "parameters": WEATHER["function"]["parameters"],
        },
        sort_keys=True,
    )
    assert line in first and '{"name": "get_time", "parameters": {"properties": {}, "type": "object"}}' in first
    assert first.endswith("Instruct: What is the capital of France?\nOutput:")
    # AND the grammar allows a reply or calls (auto)
    assert "start: calls | reply" in fake.calls[0].params.grammar.source


def test_tool_choice_none_shows_no_tools_and_constrains_nothing(fake):
    chat(tools=[WEATHER], tool_choice="none")
    assert "get_weather" not in fake.calls[0].prompts[0] and fake.calls[0].params.grammar is None


def test_tool_calls_and_results_in_the_history_are_rendered_into_phi2s_chat_format(fake):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"C"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    status, body = chat(messages=history, tools=[WEATHER])
    assert status == 200, body
    prompt = fake.calls[0].prompts[0]
    assert prompt.endswith(
        "Alice: Weather in Paris?\n"
        'Bob: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}</tool_call>\n'
        'Tool: <tool_result name="get_weather">21 degrees</tool_result>\n'
        "Bob:"
    )
    assert "\nTool:" in fake.calls[0].params.stop  # the model does not write the tool's answer


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "get weather!"}}]},
            "tools[0].function.name",
            "invalid_value",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "invalid_value"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type", "unsupported_value"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            "tool_choice.function.name",
            "invalid_value",
        ),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": {
                    "type": "allowed_tools",
                    "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "nope"}}]},
                },
            },
            "tool_choice.allowed_tools.tools[0]",
            "invalid_value",
        ),
        ({"functions": [WEATHER["function"]]}, "functions", "unsupported_value"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_9", "content": "1"},
                ]
            },
            "messages[1].tool_call_id",
            "invalid_value",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "invalid_value"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "uniqueItems": True}},
                }
            },
            "response_format.json_schema.schema",
            "invalid_json_schema",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]},
            "tools[0].function.parameters",
            "invalid_json_schema",
        ),
        ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs", "invalid_value"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "invalid_value"),
    ],
    ids=[
        "invalid-name",
        "duplicate-name",
        "custom-tool",
        "tool-choice-missing-tool",
        "required-without-tools",
        "allowed-tools-unknown",
        "functions",
        "tool-result-without-call",
        "json-schema-missing",
        "unsupported-keyword",
        "bad-parameters",
        "two-structured-outputs",
        "structured-json-not-json",
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_the_field_and_nothing_is_generated(body, param, code):
    generator = FakeGenerator(model_id=MODEL)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
        # A grammar the fake cannot compile is refused by the real compiler, as the function would
        patch.setattr(generator, "check_grammar", phi2_compiler().compile)
        status, answer_body = chat(**body)
    assert status == 400, answer_body
    assert error_of(answer_body) == (param, code), answer_body
    assert not generator.calls


_COMPILER: GrammarCompiler | None = None


def phi2_compiler() -> GrammarCompiler:
    """The real constrained decoder on Phi-2's tokenizer (the tiny test model ships it), built once."""
    global _COMPILER
    if _COMPILER is None:
        from conftest import prepared_model

        tokenizer = AutoTokenizer.from_pretrained(prepared_model("tiny-phi"))
        _COMPILER = GrammarCompiler(tokenizer, 51200, [50256])
    return _COMPILER


# What answers become


def test_a_call_in_auto_mode_is_tool_calls_with_finish_reason_tool_calls(fake):
    fake.tokens = (" " + CALL,)
    _, body = chat(tools=[WEATHER])
    completion = SdkChatCompletion.model_validate(body)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}
    assert body["choices"][0]["json_complete"] is True


def test_a_named_tool_choice_answers_finish_reason_stop_as_openai_does(fake):
    fake.tokens = (CALL,)
    _, body = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    grammar = fake.calls[0].params.grammar.source
    assert "get_time" not in grammar  # only the named function can be called
    _, required = chat(tools=[WEATHER], tool_choice="required")
    assert required["choices"][0]["finish_reason"] == "tool_calls"


def test_text_in_auto_mode_is_content_and_a_cut_call_is_length_and_incomplete(fake):
    fake.tokens = (" It is sunny.",)
    _, text = chat(tools=[WEATHER])
    assert (
        text["choices"][0]["message"]["content"] == "It is sunny." and "tool_calls" not in text["choices"][0]["message"]
    )
    assert text["choices"][0]["finish_reason"] == "stop" and "json_complete" not in text["choices"][0]
    fake.tokens, fake.finish_reason, fake.grammar_complete = (CALL[:60],), "length", False
    _, cut = chat(tools=[WEATHER], max_tokens=20)
    choice = cut["choices"][0]
    assert choice["finish_reason"] == "length" and choice["json_complete"] is False
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Pa'


def test_streamed_tool_calls_reassemble_in_the_sdk_exactly_as_the_buffered_answer():
    # GIVEN a plan with tools and a reply of two calls, cut into pieces at every awkward place
    request = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], "stream": True}
    )
    generator = FakeGenerator(model_id=MODEL)
    plan = serving.plan_chat(request, generator, streaming=True)
    text = " " + CALL + '\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    for size in (1, 3, 7, len(text)):
        chunker = serving.ChatChunker(plan, generator)
        chunks = [chunker.first()]
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            chunk = chunker.step([StepEvent(0, 1000 + k, piece, finish_reason="eos_token" if last else None)])
            if chunk is not None:
                chunks.append(chunk)
        # WHEN the SDK accumulates the stream
        state = ChatCompletionStreamState()
        for chunk in chunks:
            state.handle_chunk(SdkChatCompletionChunk.model_validate(chunk.model_dump(mode="json")))
        final = state.get_final_completion().choices[0]
        # THEN two calls with ids, names and whole arguments, finish_reason tool_calls, no content
        assert final.finish_reason == "tool_calls" and not final.message.content
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls]
        assert calls == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {})], size
        assert len({c.id for c in final.message.tool_calls}) == 2
        assert chunks[-1].model_dump(mode="json")["choices"][0]["json_complete"] is True


# The reply format and its grammar


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_a_reply_splits_into_calls_whatever_the_pieces_even_with_braces_and_markers_in_strings(size):
    tricky = {"q": 'say "}</tool_call>" and {[', "n": [1, {"a": "\\"}]}
    text = f'<tool_call>{{"name": "f", "arguments": {json.dumps(tricky)}}}</tool_call>'
    reply = tools.ToolReply()
    for i in range(0, len(text), size):
        reply.feed(text[i : i + size])
    reply.finish()
    assert [(c.name, json.loads(c.arguments)) for c in reply.calls] == [("f", tricky)]
    assert reply.content == ""


@pytest.mark.parametrize("text", ["<tool", " <tool_c is a word", "Hello", ""])
def test_a_reply_that_only_begins_like_a_call_is_text(text):
    reply = tools.ToolReply()
    content, _ = reply.feed(text)
    more, _ = reply.finish()
    assert content + more == text and not reply.calls and not reply.is_call


def accepts(grammar, text: str) -> bool:
    compiler = phi2_compiler()
    matcher = compiler.compile(grammar).deep_copy()
    ids = compiler._hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.consume_tokens(ids) and matcher.is_accepting()


WEATHER_TOOL = tools.Tool("get_weather", None, WEATHER["function"]["parameters"])
TIME_TOOL = tools.Tool("get_time", None, tools.NO_ARGUMENTS)
TIME_CALL = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


@pytest.mark.parametrize(
    ("mode", "parallel", "space", "text", "ok"),
    [
        ("auto", True, False, "It is sunny in Paris.", True),
        ("auto", True, False, "", True),
        ("auto", True, False, CALL, True),
        ("auto", True, True, " " + CALL, True),
        ("auto", True, False, CALL + "\n" + TIME_CALL, True),
        ("auto", True, False, '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', False),
        ("auto", True, False, '<tool_call>{"name": "get_wind", "arguments": {}}</tool_call>', False),
        ("auto", True, False, CALL + " and some text", False),
        ("required", True, False, "It is sunny.", False),
        ("required", True, False, CALL, True),
        ("required", False, False, CALL + "\n" + TIME_CALL, False),
        ("required", True, False, "\n".join([TIME_CALL] * 8), True),
        ("required", True, False, "\n".join([TIME_CALL] * 9), False),
    ],
)
def test_the_tool_grammar_allows_exactly_the_replies_its_mode_allows(mode, parallel, space, text, ok):
    plan = tools.ToolPlan((WEATHER_TOOL, TIME_TOOL), mode, parallel)
    assert accepts(tools.grammar(plan, leading_space=space), text) is ok


def test_a_named_function_grammar_calls_only_it_once():
    plan = tools.ToolPlan((TIME_TOOL,), "named", False)
    grammar = tools.grammar(plan, leading_space=False)
    assert accepts(grammar, TIME_CALL) and not accepts(grammar, CALL) and not accepts(grammar, "text")


# Completions and the native API


@pytest.mark.parametrize(
    ("so", "kind", "is_json"),
    [
        ({"json": {"type": "object"}}, "json_schema", True),
        ({"json": '{"type": "integer"}'}, "json_schema", True),
        ({"json_object": True}, "json_schema", True),
        ({"regex": "[0-9]{3}"}, "regex", False),
        ({"choice": ["yes", "no"]}, "lark", False),
        ({"grammar": 'start: "a"+'}, "lark", False),
    ],
)
def test_completions_take_vllms_structured_outputs(fake, so, kind, is_json):
    status, body = answer(openai_event("rest-completions-sdk", structured_outputs=so))
    assert status == 200, body
    grammar = fake.calls[0].params.grammar
    assert grammar.kind == kind and grammar.origin.startswith("structured_outputs")
    assert ("json_complete" in body["choices"][0]) is is_json


def test_min_p_and_typical_p_reach_the_generator(fake):
    chat(min_p=0.05, typical_p=0.9)
    params = fake.calls[0].params
    assert (params.min_p, params.typical_p) == (0.05, 0.9)


def test_native_generate_takes_a_json_schema_or_a_grammar_and_reports_grammar_complete(fake):
    event = openai_event("rest-chat-completions-sdk")
    event["path"] = event["resource"] = "/generate"
    event["body"] = json.dumps({"prompt": "Person:", "json_schema": {"type": "object"}, "max_new_tokens": 8})
    status, body = answer(event)
    assert status == 200 and body["details"]["grammar_complete"] is True
    assert fake.calls[0].params.grammar.kind == "json_schema"
    event["body"] = json.dumps({"prompt": "x", "json_schema": {"type": "object"}, "grammar": 'start: "a"'})
    status, body = answer(event)
    assert status == 422 and "at most one of `json_schema` and `grammar`" in body["message"]
    event["body"] = json.dumps({"prompt": "x"})
    status, body = answer(event)
    assert "grammar_complete" not in body["details"]


# /tokenize and /detokenize


def on(path: str, body: dict) -> dict:
    event = openai_event("rest-chat-completions-sdk")
    event["path"] = event["resource"] = path
    event["body"] = json.dumps(body)
    return event


@pytest.mark.parametrize("prefix", ["", "/v1"])
def test_tokenize_and_detokenize_answer_vllms_shapes(fake, prefix):
    status, body = answer(on(f"{prefix}/tokenize", {"model": MODEL, "prompt": "hi!", "return_token_strs": True}))
    assert status == 200, body
    assert body == {"count": 3, "max_model_len": 2048, "tokens": [104, 105, 33], "token_strs": ["h", "i", "!"]}
    status, body = answer(on(f"{prefix}/detokenize", {"model": MODEL, "tokens": [104, 105]}))
    assert (status, body) == (200, {"prompt": "hi"})


def test_tokenize_counts_a_chat_as_the_chat_route_renders_it(fake):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    _, body = answer(on("/tokenize", {"messages": messages, "tools": [WEATHER]}))
    chat(messages=messages, tools=[WEATHER])
    assert body["count"] == len(fake.calls[0].prompts[0]) and body["token_strs"] is None


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "gpt-4o"}, 404, "model"),
        ("/detokenize", {"tokens": [51200]}, 400, "tokens[0]"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
def test_bad_tokenize_requests_get_openai_shaped_errors(fake, path, body, status, param):
    got_status, got = answer(on(path, body))
    assert got_status == status and got["error"]["param"] == param, got
