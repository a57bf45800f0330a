"""The prompt cache through the real Lambda RIE with SmolLM2-135M: a chat's next turn reuses the first turn's
prompt pass for the same API key (`usage.prompt_tokens_details.cached_tokens` is the shared prefix, token for
token), and another API key reuses nothing."""

from __future__ import annotations

import json

import pytest
from conftest import load_event
from rie import RieServer, api_body
from transformers import AutoTokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "Name three rivers of France and say where each one rises."
FOLLOW_UP = "Which of them is the longest? Answer in one sentence."


@pytest.fixture(scope="module")
def rie(smollm2_dir):
    server = RieServer(smollm2_dir)
    yield server
    server.stop()


def chat(rie: RieServer, key_id: str, messages: list[dict]) -> dict:
    """A REST chat request, as API Gateway sends it for a method that requires an API key."""
    event = load_event("openai/rest-chat-completions-api-key")
    event["requestContext"]["identity"]["apiKeyId"] = key_id
    body = {"model": "SmolLM2-135M-Instruct", "messages": messages, "temperature": 0, "max_tokens": 40}
    event["body"] = json.dumps(body)
    response = rie.invoke(event)
    assert response["statusCode"] == 200, response
    return api_body(response)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_the_next_turn_reuses_the_shared_prefix_for_its_api_key_and_nothing_for_another(rie, smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    first = [{"role": "user", "content": QUESTION}]
    # GIVEN a first turn for the API key of tenant A
    one = chat(rie, "tenant-a-key-id", first)
    assert one["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    answer = one["choices"][0]["message"]["content"]
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]
    # WHEN tenant B sends the same conversation's next turn, then tenant A does
    other = chat(rie, "tenant-b-key-id", second)
    two = chat(rie, "tenant-a-key-id", second)
    # THEN tenant B reused nothing of tenant A's
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # AND tenant A reused exactly the prefix its next turn shares with what the first turn left: its prompt and
    # the answer's tokens that were fed back (all but the last generated one, unless that ended the answer)
    first_ids, second_ids = (
        tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))["input_ids"]
        for m in (first, second)
    )
    generated = tokenizer(answer, add_special_tokens=False)["input_ids"]
    fed = len(generated) - (1 if one["choices"][0]["finish_reason"] == "length" else 0)
    shared = min(common_prefix(second_ids, first_ids + generated[:fed]), len(second_ids) - 1)
    assert two["usage"]["prompt_tokens"] == len(second_ids)
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] == shared > len(first_ids)
    # AND the answer is the one an uncached request gets (tenant B's was uncached)
    assert two["choices"][0]["message"]["content"] == other["choices"][0]["message"]["content"]
