"""The real `openai` SDK against the function under the real Lambda RIE, with SmolLM2-135M-Instruct (whose
tokenizer ships a chat template). Each SDK request becomes an API Gateway REST event (tests/
apigateway_transport.py): completions, chat, models, n with a seed, logprobs, stop, and the typed errors
the SDK raises for a context overflow and other bad requests. One RIE process serves this module and
test_structured_output_rie.py (tests/conftest.py)."""

from __future__ import annotations

import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def transport(smollm2_openai_transport):
    return smollm2_openai_transport


@pytest.fixture(scope="module")
def client(smollm2_openai_client):
    return smollm2_openai_client


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_models_list_and_retrieve_name_the_served_model(client, transport, model):
    # WHEN the SDK lists the models and retrieves the one listed (its id holds a slash)
    models = client.models.list()
    retrieved = client.models.retrieve(model)
    # THEN there is one, SmolLM2, with its context length, and it is found by its id
    assert [m.id for m in models.data] == ["HuggingFaceTB/SmolLM2-135M-Instruct"] == [model]
    assert models.data[0].owned_by == "HuggingFaceTB" and models.data[0].max_model_len == 8192
    assert retrieved.id == model
    # AND what reached the function is what API Gateway sends: the stage left out of the path, the key in
    # x-api-key
    event = transport.events[-1]
    assert event["path"] == f"/models/{model}" and event["requestContext"]["path"] == f"/v1/models/{model}"
    assert event["headers"]["x-api-key"] == "test-key"


def test_chat_completion_answers_the_capital_of_france(client, model):
    # WHEN the SDK asks the chat question greedily
    completion = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=24)
    # THEN SmolLM2 answers Paris, in OpenAI's shape, echoing the model and counting tokens
    choice = completion.choices[0]
    assert "Paris" in choice.message.content, choice.message.content
    assert choice.message.role == "assistant" and completion.model == model
    assert choice.finish_reason in ("stop", "length")
    assert choice.model_extra["native_finish_reason"] in ("eos_token", "length", "time_limit")
    assert completion.usage.prompt_tokens > 10 and completion.usage.completion_tokens >= 1
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert completion.id.startswith("chatcmpl-") and completion.system_fingerprint.startswith("fp_")


def test_text_completion_continues_the_prompt(client, model):
    completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
    text = completion.choices[0].text
    assert "Paris" in text and not text.startswith("The capital")  # the continuation only
    assert completion.usage.completion_tokens <= 6


def test_n_with_a_seed_gives_distinct_reproducible_choices(client, model):
    # GIVEN n=3 and a seed, sampling at temperature 1
    def sample():
        completion = client.completions.create(
            model=model, prompt="Once upon a time,", n=3, seed=1234, max_tokens=12, temperature=1.0
        )
        return [choice.text for choice in sorted(completion.choices, key=lambda c: c.index)]

    # WHEN asked twice
    first, second = sample(), sample()
    # THEN three different texts, and the same three again
    assert len(set(first)) == 3, first
    assert first == second


def test_chat_logprobs_are_the_models_own_greedy_choices(client, model):
    # GIVEN greedy decoding with logprobs and 3 alternatives per token
    completion = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
    )
    choice = completion.choices[0]
    content = choice.logprobs.content
    # THEN one entry per generated token, whose texts spell the reply
    assert len(content) == completion.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(choice.message.content)
    for token in content:
        # AND greedy decoding picked the most likely token: it leads its own alternatives, with the same value
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)
        assert token.logprob <= 0 and bytes(token.bytes).decode("utf-8", "replace") == token.token


def test_completion_logprobs_with_echo_cover_prompt_and_continuation(client, model):
    prompt = "The capital of France is"
    completion = client.completions.create(
        model=model, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert choice.text.startswith(prompt)
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None  # nothing precedes the first prompt token
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(top is None or 1 <= len(top) <= 3 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def test_stop_ends_the_text_before_the_stop_string(client, model):
    completion = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=12, temperature=0, stop=["Paris"]
    )
    choice = completion.choices[0]
    assert "Paris" not in choice.text
    assert choice.finish_reason == "stop" and choice.model_extra["native_finish_reason"] == "stop_sequence"


def test_context_overflow_raises_bad_request_with_context_length_exceeded(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=100_000)
    error = raised.value
    assert error.status_code == 400 and error.code == "context_length_exceeded" and error.param == "messages"
    assert "maximum context length is 8192 tokens" in error.message
    assert error.request_id  # the x-request-id header


def test_an_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION)
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


def test_an_unsupported_value_raises_bad_request_naming_the_field(client, model):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=QUESTION, audio={"voice": "alloy", "format": "mp3"})
    assert raised.value.param == "audio" and raised.value.code == "unsupported_value"
