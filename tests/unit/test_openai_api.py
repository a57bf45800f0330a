"""The OpenAI-compatible routes with a fake generator: request bodies shaped as the SDK, LangChain and LiteLLM
send them, their translation to the generator's parameters, OpenAI's response and error shapes (checked
against the openai SDK's own types), and the Phi-2 chat format."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import LambdaContext, load_event, openai_event
from fakes import FakeGenerator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types import Completion as SdkCompletion
from openai.types import Model as SdkModel
from openai.types.chat import ChatCompletion as SdkChatCompletion
from openai.types.chat import ChatCompletionChunk as SdkChatCompletionChunk
from reliability.hostile import CATALOGUE, assert_openai_answer, load, outcome

from phi2 import errors
from phi2.api.openai import chat_template, serving
from phi2.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from phi2.engine import generator as generator_module
from phi2.engine.generator import Completion, GenerationParams, GenerationResult, StepEvent, TokenLogprob
from phi2.runtime import handler

MODEL = "microsoft/phi-2"
# The cases a fake generator can answer (the others need the real constrained decoder: the RIE suite runs them)
OPENAI_HOSTILE = sorted(
    path.stem for path in CATALOGUE.glob("openai-*.json") if not json.loads(path.read_text()).get("real_model")
)


@pytest.fixture
def fake(monkeypatch) -> FakeGenerator:
    generator = FakeGenerator(model_id=MODEL)
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    return generator


def invoke(event: dict) -> dict:
    return handler.lambda_handler(event, LambdaContext())


def answer(event: dict) -> tuple[int, dict, dict[str, str]]:
    got = outcome(invoke(event))
    return got.status, got.body, got.headers


# Bodies as real clients send them


@pytest.mark.parametrize(
    "name",
    [
        "rest-chat-completions-sdk",
        "rest-chat-completions-langchain",
        "rest-chat-completions-litellm",
        "rest-chat-completions-every-neutral-field",
        "rest-chat-completions-v1-prefixed",
        "http-chat-completions",
    ],
)
def test_chat_bodies_as_clients_send_them_get_a_chat_completion_the_sdk_parses(fake, name):
    # GIVEN a chat request shaped as the SDK, LangChain or LiteLLM sends it (REST, HTTP API, /v1-prefixed)
    event = load_event(f"openai/{name}")
    # WHEN it is handled
    status, body, headers = answer(event)
    # THEN it is a 200 chat.completion that the SDK's own type validates, echoing the model
    assert status == 200, body
    completion = SdkChatCompletion.model_validate(body)
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "ok"
    assert completion.usage.completion_tokens == 1
    # AND the id and the x-request-id header carry the Lambda request id
    assert headers["x-request-id"] in completion.id


@pytest.mark.parametrize("name", ["rest-completions-sdk", "rest-completions-every-neutral-field"])
def test_completion_bodies_get_a_text_completion_the_sdk_parses(fake, name):
    status, body, _ = answer(load_event(f"openai/{name}"))
    assert status == 200, body
    completion = SdkCompletion.model_validate(body)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == " ok"  # the continuation only: no prompt unless echo


def test_langchain_body_translates_to_greedy_with_its_token_limit_and_system_preamble(fake):
    # GIVEN LangChain's ChatOpenAI(temperature=0, max_tokens=64) body with a system and a user message
    answer(load_event("openai/rest-chat-completions-langchain"))
    call = fake.calls[0]
    # THEN temperature 0 is greedy decoding, max_completion_tokens is the limit
    assert call.params.do_sample is False
    assert call.params.max_new_tokens == 64
    # AND Phi-2's QA format carries the system text before the question, with the next turn's marker as a stop
    assert call.prompts == ["You are a concise assistant.\n\nInstruct: What is the capital of France?\nOutput:"]
    assert call.params.stop == ("\nInstruct:",)
    assert call.params.return_full_text is False


def test_litellm_body_keeps_its_stop_seed_and_text_parts(fake):
    answer(load_event("openai/rest-chat-completions-litellm"))
    call = fake.calls[0]
    assert call.params.stop == ("\n\n", "\nInstruct:")
    assert call.seeds == (7,) and call.params.temperature == 0.2 and call.params.do_sample is True
    assert "What is the capital of France?" in call.prompts[0]


def test_openai_defaults_apply_not_the_native_ones(fake):
    # GIVEN the SDK's minimal chat body (model and messages only)
    answer(load_event("openai/rest-chat-completions-sdk"))
    params = fake.calls[0].params
    # THEN OpenAI's defaults: temperature 1, top_p 1, no top_k, and the rest of the context as the limit
    assert (params.do_sample, params.temperature, params.top_p, params.top_k) == (True, 1.0, 1.0, 0)
    prompt = fake.calls[0].prompts[0]
    assert params.max_new_tokens == fake.context_length - len(prompt) - 1
    # AND a completions request without max_tokens generates OpenAI's documented 16
    answer(openai_event("rest-completions-sdk", max_tokens=None))
    assert fake.calls[1].params.max_new_tokens == 16


@pytest.mark.parametrize(
    ("fields", "do_sample"),
    [({"temperature": 0}, False), ({"temperature": 0.005}, False), ({"top_p": 0}, False), ({"temperature": 0.5}, True)],
)
def test_temperature_zero_or_an_empty_nucleus_is_greedy(fake, fields, do_sample):
    answer(openai_event("rest-chat-completions-sdk", **fields))
    assert fake.calls[0].params.do_sample is do_sample


def test_penalties_logit_bias_and_extras_reach_the_generator(fake):
    event = openai_event(
        "rest-chat-completions-sdk",
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        logit_bias={"50256": -100, "7": 2.5},
        top_k=40,
        repetition_penalty=1.2,
        top_p=0.9,
    )
    status, body, _ = answer(event)
    assert status == 200, body
    params = fake.calls[0].params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.25)
    assert params.logit_bias == ((50256, -100.0), (7, 2.5))
    assert (params.top_k, params.repetition_penalty, params.top_p) == (40, 1.2, 0.9)


def test_n_samples_one_batch_with_consecutive_seeds(fake):
    # GIVEN n=3 and a seed
    status, body, _ = answer(openai_event("rest-chat-completions-sdk", n=3, seed=11))
    # THEN one batch of three rows of the same prompt, seeded 11, 12, 13, and three choices
    assert status == 200
    call = fake.calls[0]
    assert len(call.prompts) == 3 and len(set(call.prompts)) == 1
    assert call.seeds == (11, 12, 13)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    # AND the prompt is counted once in the usage, every choice's tokens once each
    assert body["usage"]["prompt_tokens"] == len(call.prompts[0])
    assert body["usage"]["completion_tokens"] == 3


def test_several_prompts_times_n_keep_each_prompts_seeds_and_openai_indexes(fake):
    status, body, _ = answer(openai_event("rest-completions-sdk", prompt=["a b", "c d e"], n=2, seed=2**32 + 5))
    assert status == 200
    call = fake.calls[0]
    assert call.prompts == ["a b", "a b", "c d e", "c d e"]
    # a seed past 32 bits is taken modulo 2^32; a prompt's choices have the same seeds wherever it sits
    assert call.seeds == (5, 6, 5, 6)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 3 + 5


def test_negative_seed_wraps_into_the_seed_space(fake):
    answer(openai_event("rest-chat-completions-sdk", n=2, seed=-1))
    assert fake.calls[0].seeds == (2**32 - 1, 0)


@pytest.mark.parametrize(
    ("native", "openai"),
    [("length", "length"), ("time_limit", "length"), ("eos_token", "stop"), ("stop_sequence", "stop")],
)
def test_finish_reason_is_openais_with_ours_in_native_finish_reason(fake, native, openai):
    fake.finish_reason = native
    for name in ("rest-chat-completions-sdk", "rest-completions-sdk"):
        _, body, _ = answer(load_event(f"openai/{name}"))
        choice = body["choices"][0]
        assert (choice["finish_reason"], choice["native_finish_reason"]) == (openai, native)


def test_completion_logprobs_give_tokens_alternatives_and_offsets(fake):
    # GIVEN logprobs=2 on a completion
    prompt = "The capital of France is"
    _, body, _ = answer(openai_event("rest-completions-sdk", logprobs=2))
    assert fake.calls[0].params.logprobs == 2 and fake.calls[0].params.prompt_logprobs is False
    logprobs = SdkCompletion.model_validate(body).choices[0].logprobs
    # THEN each generated token with its log-probability, the 2 best alternatives plus the chosen token, and
    # where it starts (counted from the start of the prompt, as OpenAI's legacy offsets are)
    assert logprobs.tokens == [" ok"]
    assert logprobs.token_logprobs == [-0.5]
    assert logprobs.top_logprobs == [{"A": -1.0, "B": -2.0, " ok": -0.5}]
    assert logprobs.text_offset == [len(prompt)]


def test_echo_with_logprobs_returns_the_prompt_and_its_token_logprobs(fake):
    prompt = "Hi there"
    _, body, _ = answer(openai_event("rest-completions-sdk", prompt=prompt, echo=True, logprobs=0))
    assert fake.calls[0].params.prompt_logprobs is True
    choice = body["choices"][0]
    assert choice["text"] == prompt + " ok"
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == prompt + " ok"
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == [-1.5] * (len(prompt) - 1) + [-0.5]
    assert logprobs["text_offset"] == list(range(len(prompt) + 1))


def test_max_tokens_zero_with_echo_scores_the_prompt_only(fake):
    # GIVEN the scoring request evaluation harnesses send: echo, logprobs, max_tokens 0
    prompt = "Hi"
    _, body, _ = answer(openai_event("rest-completions-sdk", prompt=prompt, echo=True, logprobs=1, max_tokens=0))
    choice = body["choices"][0]
    # THEN the text is the prompt, with its logprobs, and nothing generated is returned or counted
    assert choice["text"] == prompt
    assert choice["logprobs"]["tokens"] == ["H", "i"]
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0


def test_chat_logprobs_give_each_tokens_bytes_and_top_alternatives(fake):
    _, body, _ = answer(openai_event("rest-chat-completions-sdk", logprobs=True, top_logprobs=2))
    content = SdkChatCompletion.model_validate(body).choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in content] == [(" ok", -0.5, list(b" ok"))]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("A", -1.0), ("B", -2.0)]
    assert fake.calls[0].params.logprobs == 2


def test_chat_without_logprobs_asks_for_none(fake):
    _, body, _ = answer(openai_event("rest-chat-completions-sdk", logprobs=False, top_logprobs=0))
    assert body["choices"][0]["logprobs"] is None and fake.calls[0].params.logprobs is None


def test_best_of_returns_the_n_most_likely_rows():
    # GIVEN a plan for best_of=3, n=1 and three rows of different mean log-probability
    generator = FakeGenerator(model_id=MODEL)
    request = CompletionRequest.model_validate({"model": MODEL, "prompt": "a", "best_of": 3, "seed": 1})
    plan = serving.plan_completion(request, generator)
    assert plan.rows == ["a", "a", "a"] and plan.params.logprobs == 0  # ranking needs the logprobs

    def row(text: str, logprob: float) -> Completion:
        return Completion(text, "length", 1, 1, (1000,), (TokenLogprob(1000, logprob),))

    result = GenerationResult([row("x", -3.0), row("y", -0.1), row("z", -1.0)], 1, 0.0, 0.0, 0.0)
    # WHEN the response is built
    body = serving.completion_response(plan, result, generator)
    # THEN the single choice is the most likely row, and no logprobs are shown (none were asked for)
    assert [c.text for c in body.choices] == ["y"]
    assert body.choices[0].logprobs is None
    assert body.usage.completion_tokens == 3  # every sampled row was computed


# Models and aliases


def test_models_list_and_retrieve_name_the_served_model(fake):
    status, body, _ = answer(load_event("openai/rest-models"))
    assert status == 200
    assert [SdkModel.model_validate(m).id for m in body["data"]] == [MODEL]
    assert body["data"][0]["owned_by"] == "microsoft" and body["data"][0]["max_model_len"] == fake.context_length
    status, body, _ = answer(load_event("openai/rest-model-retrieve"))
    assert status == 200 and body["id"] == MODEL


@pytest.mark.parametrize("path", ["/models/phi-2", "/models/microsoft%2Fphi-2", "/v1/models/microsoft/phi-2"])
def test_a_model_is_found_by_alias_encoded_slash_or_v1_path(fake, path):
    event = load_event("openai/rest-model-retrieve")
    event["path"] = path
    status, body, _ = answer(event)
    assert status == 200 and body["id"] == MODEL


@pytest.mark.parametrize("alias", ["phi-2", "PHI-2", "Microsoft/Phi-2"])
def test_aliases_are_accepted_and_echoed(fake, alias):
    status, body, _ = answer(openai_event("rest-chat-completions-sdk", model=alias))
    assert status == 200 and body["model"] == alias


def test_an_unknown_model_is_a_404_naming_the_served_one(fake):
    status, body, headers = answer(openai_event("rest-chat-completions-sdk", model="gpt-4o-mini"))
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert MODEL in body["error"]["message"] and headers["x-request-id"]
    assert not fake.calls


# Errors in OpenAI's shape


@pytest.mark.parametrize("name", OPENAI_HOSTILE)
def test_openai_hostile_case_gets_its_openai_error_in_process(monkeypatch, name):
    # GIVEN the tiny model's id (the one the RIE suite serves) and a case from the hostile catalogue
    generator = FakeGenerator(model_id="tiny-random-phi")
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    case = load(name)
    # WHEN handled in process
    got = outcome(invoke(json.loads(case.payload)))
    # THEN the answer is the catalogue's, in OpenAI's shape
    assert_openai_answer(got, case.expect)


def test_stream_true_names_the_configured_streaming_base_url(fake, monkeypatch):
    settings = dataclasses.replace(serving.get_settings(), stream_base_url="https://stream.example/v1")
    monkeypatch.setattr(serving, "get_settings", lambda: settings)
    status, body, _ = answer(load_event("openai/rest-chat-completions-stream"))
    assert status == 400 and body["error"]["param"] == "stream"
    assert "https://stream.example/v1" in body["error"]["message"]
    assert not fake.calls


def test_context_overflow_uses_openais_wording_and_code(fake):
    # GIVEN a completion whose prompt plus max_tokens exceeds the fake's 2,048-token context
    status, body, _ = answer(openai_event("rest-completions-sdk", prompt="x" * 2000, max_tokens=100))
    error = body["error"]
    # THEN a 400 with code context_length_exceeded and the sentence LiteLLM and LangChain recognise
    assert status == 400
    assert (error["code"], error["param"], error["type"]) == (
        "context_length_exceeded",
        "prompt",
        "invalid_request_error",
    )
    assert error["message"].startswith(
        "This model's maximum context length is 2048 tokens. However, you requested 2100"
    )


def test_a_prompt_too_long_for_the_deadline_is_a_400_naming_the_messages(fake):
    fake.fail_with = errors.PromptTooLongForDeadline(
        prompt_tokens=5000, batch=1, estimated_s=40.0, available_s=20.0, largest_prompt_tokens=2000
    )
    status, body, _ = answer(load_event("openai/rest-chat-completions-sdk"))
    assert status == 400
    assert body["error"]["code"] == "prompt_too_long_for_deadline" and body["error"]["param"] == "messages"
    assert "2000 tokens" in body["error"]["message"]


def test_model_not_ready_is_a_503_server_error(monkeypatch):
    def not_ready(wait_s=None):
        raise errors.ModelNotReady("the model failed to load")

    monkeypatch.setattr(generator_module, "get_generator", not_ready)
    status, body, _ = answer(load_event("openai/rest-chat-completions-sdk"))
    assert status == 503 and body["error"]["type"] == "server_error" and body["error"]["code"] == "model_not_ready"


@pytest.mark.parametrize("name", ["rest-chat-completions-sdk", "rest-completions-sdk", "rest-models"])
def test_a_request_during_the_models_load_waits_for_it_within_its_deadline(monkeypatch, name):
    # GIVEN a model still loading (get_generator is asked how long it may wait)
    waits: list[float | None] = []
    generator = FakeGenerator(model_id=MODEL)

    def loading(wait_s=None):
        waits.append(wait_s)
        return generator

    monkeypatch.setattr(generator_module, "get_generator", loading)
    # WHEN an OpenAI route is called with 60 s left in the invocation
    status, _, _ = answer(load_event(f"openai/{name}"))
    # THEN it waited for the model, but never past the invocation's time (not /health's "not ready" at once)
    assert status == 200
    assert waits and all(wait is not None and 0 < wait <= 60 for wait in waits)


def test_a_model_still_loading_after_the_wait_is_a_503_with_retry_after(monkeypatch):
    def still_loading(wait_s=None):
        raise errors.ModelLoading(12.0)

    monkeypatch.setattr(generator_module, "get_generator", still_loading)
    status, body, headers = answer(load_event("openai/rest-chat-completions-sdk"))
    assert status == 503 and body["error"]["type"] == "server_error" and headers["retry-after"] == "12"


def test_an_unexpected_failure_is_a_500_without_detail(fake):
    fake.fail_with = RuntimeError("secret internal detail")
    status, body, headers = answer(load_event("openai/rest-chat-completions-sdk"))
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "secret" not in json.dumps(body) and "x-request-id" in body["error"]["message"]
    assert headers["x-request-id"]


@pytest.mark.parametrize("path", ["/generate", "/v1/generate"])
def test_native_routes_keep_their_own_error_shape_with_or_without_v1(fake, path):
    # GIVEN /generate (or /v1/generate, as an HTTP API's $default stage sends it) with an invalid field
    event = load_event("rest-generate-invalid-temperature")
    event["path"] = path
    status, body, _ = answer(event)
    # THEN the native 422, not OpenAI's shape
    assert status == 422 and body["error"] == "validation_error"


def test_user_and_text_never_reach_the_logs(fake, caplog, capsys):
    # GIVEN a request whose user id and message carry a canary
    canary = "canary-7f3a91"
    event = openai_event(
        "rest-chat-completions-sdk", user=f"user-{canary}", messages=[{"role": "user", "content": canary}]
    )
    # WHEN it is served
    invoke(event)
    # THEN the generation's summary is logged, and the canary appears in no log record and no metric
    logged = "\n".join(json.dumps(record.__dict__, default=str) for record in caplog.records)
    assert any(record.getMessage() == "generated" and record.protocol == "openai" for record in caplog.records)
    printed = capsys.readouterr()
    assert canary not in logged + printed.out + printed.err


def test_openapi_document_lists_the_openai_routes_with_their_bounds(fake):
    spec = json.loads(invoke(load_event("rest-openapi"))["body"])
    assert {"/chat/completions", "/completions", "/models", "/models/{model}"} <= set(spec["paths"])
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["maxItems"] == 2048
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert chat["temperature"]["anyOf"][0]["maximum"] == 2.0
    completion = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert completion["logprobs"]["anyOf"][0]["maximum"] == 5
    assert completion["n"]["anyOf"][0]["maximum"] == 8


# The prompt: the tokenizer's template, else Phi-2's format


def test_a_tokenizers_own_chat_template_is_used_when_it_ships_one(monkeypatch):
    generator = FakeGenerator(model_id=MODEL, chat_template=True)
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    _, body, _ = answer(load_event("openai/rest-chat-completions-langchain"))
    call = generator.calls[0]
    assert call.prompts == [
        "<|system|>You are a concise assistant.\n<|user|>What is the capital of France?\n<|assistant|>"
    ]
    assert call.params.stop == ()  # the template's own end-of-turn token ends the reply
    assert body["choices"][0]["message"]["content"] == " ok"  # not stripped: no Phi-2 separator to remove


def test_phi2_qa_format_for_a_single_question():
    prompt = chat_template.phi2_prompt([{"role": "user", "content": "Name a prime."}])
    assert prompt.text == "Instruct: Name a prime.\nOutput:"
    assert prompt.stop == ("\nInstruct:",) and prompt.strip_reply


def test_phi2_chat_format_for_a_conversation_with_names():
    prompt = chat_template.phi2_prompt(
        [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello.", "name": "Sam"},
            {"role": "user", "content": "How are you?", "name": "Ann"},
        ]
    )
    assert prompt.text == "Be kind.\n\nAlice: Hi!\nSam: Hello.\nAnn: How are you?\nSam:"
    assert prompt.stop == ("\nAlice:", "\nAnn:")


def test_the_phi2_reply_loses_the_formats_separating_space(fake):
    fake.tokens = ("  Paris", ".")
    _, body, _ = answer(load_event("openai/rest-chat-completions-sdk"))
    assert body["choices"][0]["message"]["content"] == "Paris."


# Chunks for the streaming surface


def test_chat_chunks_from_step_events_are_what_the_sdk_parses():
    generator = FakeGenerator(model_id=MODEL)
    request = ChatCompletionRequest.model_validate(
        {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "n": 2, "stream": True, "logprobs": True}
    )
    plan = serving.plan_chat(request, generator, streaming=True)
    chunker = serving.ChatChunker(plan, generator)
    first = chunker.first()
    step = chunker.step(
        [
            StepEvent(row=0, token_id=1000, text=" Hel", logprob=TokenLogprob(1000, -0.5)),
            StepEvent(row=1, token_id=None, text=""),
        ]
    )
    last = chunker.step([StepEvent(row=1, token_id=1000, text=" Yo", finish_reason="eos_token")])
    chunks = [SdkChatCompletionChunk.model_validate(c.model_dump()) for c in (first, step, last)]
    assert [c.delta.role for c in chunks[0].choices] == ["assistant", "assistant"]
    assert [(c.index, c.delta.content) for c in chunks[1].choices] == [(0, "Hel")]  # the separator stripped
    assert chunks[1].choices[0].logprobs.content[0].logprob == -0.5
    assert [(c.index, c.delta.content, c.finish_reason) for c in chunks[2].choices] == [(1, "Yo", "stop")]
    assert {c.id for c in chunks} == {plan.id}
    assert chunker.step([StepEvent(row=0, token_id=None, text="")]) is None


def test_streaming_plan_accepts_stream_options():
    request = ChatCompletionRequest.model_validate(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    plan = serving.plan_chat(request, FakeGenerator(model_id=MODEL), streaming=True)
    assert plan.include_usage is True
    assert isinstance(plan.params, GenerationParams)


# Fuzzing: whatever the body, an answer below 500 in OpenAI's shape

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bot"]), "content": _json}
    ),
    max_size=4,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(["rest-chat-completions-sdk", "rest-completions-sdk"]),
    fields=st.dictionaries(
        st.sampled_from(sorted(set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields))),
        _json | _messages,
        max_size=6,
    ),
)
def test_any_body_on_the_openai_routes_gets_an_answer_below_500_in_openais_shape(fake, route, fields):
    event = load_event(f"openai/{route}")
    event["body"] = json.dumps({**json.loads(event["body"]), **fields})
    status, body, headers = answer(event)
    assert status < 500, body
    if status == 200:
        assert body["choices"] and body["usage"]["total_tokens"] >= 1
    else:
        assert set(body) == {"error"} and body["error"]["message"] and headers["x-request-id"]
        assert body["error"]["type"] == "invalid_request_error"
