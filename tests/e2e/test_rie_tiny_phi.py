"""End to end through the real Lambda RIE, on the Phi-2 code path (tiny random Phi + Phi-2 tokenizer).

Invokes are sequential: the RIE serves one at a time.
"""

from __future__ import annotations

import json

import pytest
from conftest import EVENTS, load_event
from rie import RieServer, api_body, slowed

pytestmark = pytest.mark.e2e

SLOW_PASS_S = 0.05


@pytest.fixture(scope="module")
def server(tiny_phi_dir):
    rie = RieServer(tiny_phi_dir)
    yield rie
    rie.stop()


def test_seed_body_answers_with_generated_text_and_the_runtime_stays_warm(server):
    # GIVEN the sample event, sent as `curl -d @events/...` would send it
    payload = (EVENTS / "rest-generate-seed-prompt.json").read_bytes()
    prompt = json.loads(load_event("rest-generate-seed-prompt")["body"])["prompt"]
    # WHEN invoked twice
    first = server.invoke_raw(payload)
    second = server.invoke_raw(payload)
    # THEN both are API Gateway proxy responses with the seed's {"generated_text": ...}
    for response in (first, second):
        assert response["statusCode"] == 200
        body = api_body(response)
        assert body["generated_text"].startswith(prompt)
        assert body["details"]["generated_tokens"] > 0
    # AND the second found the model warm
    health = api_body(server.invoke(load_event("rest-health")))
    assert health["cold_start"] is False and health["loaded"] is True
    assert health["model_id"] == "tiny-random-phi"
    assert len(health["model"]["weights_sha256"]["model.safetensors"]) == 64


def test_http_api_event(server):
    response = server.invoke(load_event("http-generate-seed-prompt"))
    assert response["statusCode"] == 200
    assert isinstance(api_body(response)["generated_text"], str)


def test_every_parameter_and_the_same_seed_reproduces_the_text(server):
    event = load_event("rest-generate-parameters")
    sent = json.loads(event["body"])
    first, second = api_body(server.invoke(event)), api_body(server.invoke(event))
    assert first["generated_text"] == second["generated_text"]
    assert not first["generated_text"].startswith(sent["prompt"])  # return_full_text=false
    assert first["details"]["seed"] == sent["seed"]
    assert first["details"]["generated_tokens"] <= sent["max_new_tokens"]
    assert first["details"]["finish_reason"] in {"length", "eos_token", "stop_sequence"}
    for stop in sent["stop"]:
        assert stop not in first["generated_text"]


def test_batch(server):
    event = load_event("rest-generate-batch")
    prompts = json.loads(event["body"])["prompts"]
    body = api_body(server.invoke(event))
    assert len(body["generated_text"]) == len(prompts) == len(body["details"])
    for prompt, text in zip(prompts, body["generated_text"], strict=True):
        assert text.startswith(prompt)


def test_direct_invocation(server):
    event = load_event("direct-generate")
    result = server.invoke(event)
    assert result["generated_text"].startswith(event["prompt"])
    assert result["details"]["prompt_tokens"] > 0


def test_openapi_document(server):
    spec = api_body(server.invoke(load_event("rest-openapi")))
    assert spec["paths"]["/generate"]["post"]


@pytest.mark.parametrize(
    ("event_name", "status", "code"),
    [
        ("rest-generate-malformed-json", 400, "invalid_json"),
        ("http-generate-malformed-json", 400, "invalid_json"),
        ("rest-generate-missing-prompt", 422, "validation_error"),
        ("rest-generate-invalid-temperature", 422, "validation_error"),
        ("rest-generate-prompt-and-prompts", 422, "validation_error"),
        ("rest-generate-context-overflow", 422, "context_length_exceeded"),
        ("rest-generate-oversized-body", 413, "payload_too_large"),
        ("rest-unknown-route", 404, "not_found"),
        ("rest-generate-wrong-method", 405, "method_not_allowed"),
    ],
)
def test_each_error_case_then_a_good_request_still_works(server, event_name, status, code):
    # WHEN a bad request arrives
    response = server.invoke(load_event(event_name))
    # THEN it gets its JSON error with the request id
    assert response["statusCode"] == status
    body = api_body(response)
    assert body["error"] == code and body["message"] and body["request_id"]
    # AND the warm model still answers the next request
    assert server.invoke(load_event("rest-generate-greedy"))["statusCode"] == 200
    assert server.alive()


def test_deadline_from_the_lambda_timeout_returns_partial_text(tiny_phi_dir):
    # GIVEN a function whose Lambda timeout leaves ~1.5 s for generation (20 s minus an 18.5 s margin;
    # the RIE counts init against the first invoke's timeout, so the timeout itself cannot be tiny), and a
    # model whose every pass takes at least 50 ms by construction: 1,024 tokens take 51 s or more on any CPU
    # (unslowed, a fast CPU generated all of them inside the 1.5 s)
    rie = RieServer(
        tiny_phi_dir,
        AWS_LAMBDA_FUNCTION_TIMEOUT="20",
        DEADLINE_MARGIN_SECONDS="18.5",
        **slowed(SLOW_PASS_S=str(SLOW_PASS_S)),
    )
    try:
        rie.invoke(load_event("rest-health"))  # init (model load) happens here, outside the test
        event = load_event("rest-generate-seed-prompt")
        event["body"] = json.dumps({"prompt": "Count:", "max_new_tokens": 1024, "do_sample": False})
        # WHEN asked for far more than fits
        response = rie.invoke(event)
        # THEN it answers 200 with what it had, marked time_limit, instead of timing out
        assert response["statusCode"] == 200, response
        details = api_body(response)["details"]
        assert details["finish_reason"] == "time_limit"
        assert 0 < details["generated_tokens"] < 1024
    finally:
        rie.stop()
