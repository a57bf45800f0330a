"""The real `openai` SDK against `sam local start-api` of template.yaml and the real container image: the same
client a user points at the deployed API's OpenAIBaseUrl, here at SAM CLI's emulated API Gateway over HTTP.

`sam local start-api` serves the template's paths without the stage, so the base URL is the server's root
(deployed: https://<api>.execute-api.<region>.amazonaws.com/v1)."""

from __future__ import annotations

import openai
import pytest

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
