"""The time promise, measured: through the real RIE with SmolLM2, every request shape is answered before API
Gateway's deadline (counted from when API Gateway received it), with a 200 `time_limit` carrying at least
one token or the 422 admission error, and the runtime keeps serving.

Budgets are scaled down so the test stays short, and set relative to prompt speeds this test measures
itself: a REST event whose `requestTimeEpoch` lies in the past has that much less budget.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import load_event
from rie import RieServer, api_body
from transformers import AutoTokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Longer than any budget this test sets, however slow the machine: budgets are cut from it by backdating.
API_TIMEOUT_S = 900.0
MARGIN_S = 1.5
TEXT = (Path(__file__).resolve().parents[2] / "infra" / "bench" / "quality_text.txt").read_text()


@pytest.fixture(scope="module")
def rie(smollm2_dir):
    server = RieServer(
        smollm2_dir,
        MODEL_LOADING="init",
        AWS_LAMBDA_FUNCTION_TIMEOUT="1200",
        API_TIMEOUT_MS=str(int(API_TIMEOUT_S * 1000)),
        DEADLINE_MARGIN_SECONDS=str(MARGIN_S),
        PROMPT_CHUNK_SECONDS="0.25",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def prompt_of(tokenizer, tokens: int, offset: int = 0) -> str:
    """A prompt of about `tokens` tokens of plain prose, from token `offset` of the text on (different offsets:
    prompts that share no prefix, so the prompt cache cannot shorten their pass)."""
    ids = tokenizer(TEXT * (2 + (offset + tokens) // 500), add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[offset : offset + tokens])


def rest_event(body: dict, budget_s: float | None = None) -> dict:
    """A REST event; with `budget_s`, received by API Gateway long enough ago to leave that much time."""
    event = load_event("rest-generate-seed-prompt")
    event["body"] = json.dumps(body)
    waited = API_TIMEOUT_S - MARGIN_S - budget_s if budget_s is not None else 0.0
    event["requestContext"]["requestTimeEpoch"] = int((time.time() - waited) * 1000)
    return event


def timed(rie: RieServer, event: dict) -> tuple[dict, float]:
    started = time.monotonic()
    response = rie.invoke(event)
    return response, time.monotonic() - started


@pytest.fixture(scope="module")
def prompt_pass_s(rie, tokenizer) -> dict[int, float]:
    """How long this machine takes to read prompts of 500 and 1,000 tokens, measured through the function."""
    measured = {}
    for offset, tokens in ((3000, 500), (4000, 1000)):
        # A direct invocation: its budget is the function's whole remaining time, whatever the machine's load.
        # Direct invocations are one caller of the prompt cache: these prompts share no prefix, so each is read whole.
        prompt = prompt_of(tokenizer, tokens, offset)
        answer = rie.invoke({"prompt": prompt, "max_new_tokens": 1, "do_sample": False})
        assert "generated_text" in answer, answer
        assert answer["details"]["cached_tokens"] == 0, answer["details"]
        measured[tokens] = answer["details"]["timings"]["prompt_pass_ms"] / 1000
    return measured


def assert_kept_the_promise(response: dict, elapsed: float, budget: float) -> dict:
    """Answered before API Gateway's cut, as a 200 with tokens or the 422 admission error."""
    assert elapsed < budget + MARGIN_S, f"answered {elapsed:.2f} s after arrival, budget {budget:.2f} s"
    body = api_body(response)
    if response["statusCode"] == 422:
        assert body["error"] == "prompt_too_long_for_deadline", body
    else:
        assert response["statusCode"] == 200, body
        details = body["details"] if isinstance(body["details"], list) else [body["details"]]
        for detail in details:
            assert detail["deadline_source"] == "api_timeout"
            if detail["finish_reason"] == "time_limit":
                assert detail["generated_tokens"] >= 1
    return body


@pytest.mark.parametrize("tokens", [500, 1000, 1900])
def test_single_prompts_are_answered_within_a_short_budget(rie, tokenizer, prompt_pass_s, tokens):
    # GIVEN a budget of about twice the measured time to read 1,000 tokens, and a request for many tokens
    budget = 2.2 * prompt_pass_s[1000]
    body = {"prompt": prompt_of(tokenizer, tokens), "max_new_tokens": 1024, "do_sample": False}
    # WHEN it arrives with that much time left
    response, elapsed = timed(rie, rest_event(body, budget))
    # THEN it is answered in time
    answer = assert_kept_the_promise(response, elapsed, budget)
    # AND a prompt whose measured pass takes at most half the budget is admitted, not refused
    if tokens <= 1000:
        assert response["statusCode"] == 200, answer
        assert answer["details"]["finish_reason"] in ("time_limit", "eos_token", "length")


def test_a_batch_of_8_long_prompts_is_refused_at_once_naming_what_fits(rie, tokenizer, prompt_pass_s):
    # GIVEN 8 different prompts of ~1,900 tokens (about 15 times the 1,000-token pass) and the same short budget
    # (8 copies of one prompt would be read once: rows of one prompt share its prompt pass)
    budget = 2.2 * prompt_pass_s[1000]
    body = {"prompts": [prompt_of(tokenizer, 1900, 97 * k) for k in range(8)], "max_new_tokens": 64, "do_sample": False}
    # WHEN it arrives
    response, elapsed = timed(rie, rest_event(body, budget))
    # THEN it is refused with the 422 before any compute, naming a smaller prompt for a batch of 8
    answer = assert_kept_the_promise(response, elapsed, budget)
    assert response["statusCode"] == 422, answer
    detail = answer["details"][0]
    assert detail["batch"] == 8 and 0 <= detail["largest_prompt_tokens"] < 1900
    assert elapsed < budget / 2


def test_an_event_received_20_s_ago_gets_20_s_less_budget(rie):
    fresh = api_body(rie.invoke(rest_event({"prompt": "Hello", "max_new_tokens": 2})))
    old = rest_event({"prompt": "Hello", "max_new_tokens": 2})
    old["requestContext"]["requestTimeEpoch"] -= 20_000
    aged = api_body(rie.invoke(old))
    lost = (fresh["details"]["timings"]["deadline_ms"] - aged["details"]["timings"]["deadline_ms"]) / 1000
    assert 19.0 < lost < 21.0


def test_the_runtime_keeps_serving_after_all_of_it(rie):
    response = rie.invoke({"prompt": "The capital of France is", "max_new_tokens": 4, "do_sample": False})
    assert "Paris" in response["generated_text"]
    assert rie.alive() and "Timeout" not in rie.logs()
