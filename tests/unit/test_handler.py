"""The handler with a fake generator: routing, validation, error mapping, payload shapes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import ROOT, LambdaContext, load_event
from fakes import FakeGenerator

from phi2 import errors
from phi2.api import serving
from phi2.engine import generator as generator_module
from phi2.runtime import handler


@pytest.fixture
def fake(monkeypatch) -> FakeGenerator:
    generator = FakeGenerator()
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    return generator


def invoke(event: dict, context: LambdaContext | None = None) -> dict:
    return handler.lambda_handler(event, context or LambdaContext())


def body_of(response: dict) -> dict:
    return json.loads(response["body"])


def test_importing_the_handler_loads_no_model():
    # GIVEN a fresh interpreter outside any Lambda runtime
    code = (
        "import sys, phi2.runtime.handler, phi2.engine.generator as g; "
        "print(g.load_status() == (None, None), 'phi2.engine.hf_generator' in sys.modules, 'torch' in sys.modules)"
    )
    # WHEN the handler module is imported
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT / "function",
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "", "POWERTOOLS_TRACE_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"},
    )
    # THEN nothing was loaded, not even torch
    assert out.stdout.split() == ["True", "False", "False"]


def test_seed_request_over_rest_returns_generated_text_with_the_prompt(fake):
    # GIVEN the seed's request body in a REST API (payload v1) event
    event = load_event("rest-generate-seed-prompt")
    prompt = json.loads(event["body"])["prompt"]
    # WHEN it is handled
    response = invoke(event)
    # THEN it answers 200 with the seed's generated_text (prompt included) and details
    assert response["statusCode"] == 200
    body = body_of(response)
    assert body["generated_text"] == prompt + " ok"
    assert body["details"]["finish_reason"] == "length"
    assert body["details"]["prompt_tokens"] == len(prompt)
    assert fake.calls[0].params.do_sample is True  # the seed sampled
    assert fake.calls[0].params.max_new_tokens == 64


def test_http_api_v2_event_is_served_too(fake):
    response = invoke(load_event("http-generate-seed-prompt"))
    assert response["statusCode"] == 200
    assert body_of(response)["generated_text"].endswith(" ok")


def test_every_parameter_reaches_the_generator(fake):
    # GIVEN a request that sets every generation parameter
    event = load_event("rest-generate-parameters")
    sent = json.loads(event["body"])
    # WHEN handled
    body = body_of(invoke(event))
    # THEN the generator received each of them, and return_full_text=false drops the prompt
    params = fake.calls[0].params
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "do_sample", "seed"):
        assert getattr(params, name) == sent[name], name
    assert params.stop == tuple(sent["stop"])
    assert body["generated_text"] == " ok"
    assert body["details"]["seed"] == sent["seed"]


def test_batch_returns_one_text_and_one_details_per_prompt_in_order(fake):
    event = load_event("rest-generate-batch")
    prompts = json.loads(event["body"])["prompts"]
    body = body_of(invoke(event))
    assert body["generated_text"] == [p + " ok" for p in prompts]
    assert [d["prompt_tokens"] for d in body["details"]] == [len(p) for p in prompts]
    assert len(fake.calls) == 1 and fake.calls[0].prompts == prompts  # one batch, not three calls


def test_direct_invocation_returns_plain_json(fake):
    event = load_event("direct-generate")
    result = invoke(event)
    assert "statusCode" not in result
    assert result["generated_text"] == event["prompt"] + " ok"


def test_direct_invocation_with_a_bad_payload_returns_an_error_object(fake):
    context = LambdaContext()
    result = invoke(load_event("direct-generate-missing-prompt"), context)
    assert result["status_code"] == 422
    assert result["error"] == "validation_error"
    assert result["request_id"] == context.aws_request_id
    assert not fake.calls


@pytest.mark.parametrize(
    ("event_name", "status", "code", "mentions"),
    [
        ("rest-generate-malformed-json", 400, "invalid_json", "not valid JSON"),
        ("http-generate-malformed-json", 400, "invalid_json", "not valid JSON"),
        ("rest-generate-missing-prompt", 422, "validation_error", "exactly one of `prompt`"),
        ("rest-generate-invalid-temperature", 422, "validation_error", "temperature"),
        ("rest-generate-prompt-and-prompts", 422, "validation_error", "exactly one of `prompt`"),
        ("rest-generate-oversized-body", 413, "payload_too_large", "byte limit"),
        ("rest-unknown-route", 404, "not_found", "/nope"),
        ("rest-generate-wrong-method", 405, "method_not_allowed", "use POST"),
    ],
)
def test_bad_requests_get_a_json_error_naming_the_problem(fake, event_name, status, code, mentions):
    # GIVEN a bad request from events/
    context = LambdaContext()
    # WHEN handled
    response = invoke(load_event(event_name), context)
    # THEN the status, code and message say what is wrong, with the request id, and no model call
    assert response["statusCode"] == status
    body = body_of(response)
    assert body["error"] == code
    assert mentions in body["message"]
    assert body["request_id"] == context.aws_request_id
    assert not fake.calls


def test_wrong_method_says_which_method_is_allowed(fake):
    response = invoke(load_event("rest-generate-wrong-method"))
    assert response["multiValueHeaders"]["Allow"] == ["POST"]  # REST (v1) responses carry multi-value headers


def test_validation_error_lists_each_field(fake):
    event = load_event("rest-generate-seed-prompt")
    event["body"] = json.dumps({"prompt": "hi", "max_new_tokens": 0, "top_p": 2, "colour": "red"})
    body = body_of(invoke(event))
    fields = {d["field"] for d in body["details"]}
    assert fields == {"max_new_tokens", "top_p", "colour"}


def test_context_overflow_is_422_with_the_numbers(fake):
    fake.context_length = 100
    fake.info.context_length = 100
    event = load_event("rest-generate-seed-prompt")
    event["body"] = json.dumps({"prompt": "x" * 90, "max_new_tokens": 20})
    response = invoke(event)
    assert response["statusCode"] == 422
    body = body_of(response)
    assert body["error"] == "context_length_exceeded"
    assert "90" in body["message"] and "20" in body["message"] and "100" in body["message"]


def test_unexpected_failure_is_a_generic_500_and_the_next_request_works(fake):
    # GIVEN a generator that blows up once with a message that must not leak
    fake.fail_with = RuntimeError("secret internal detail at /opt/model/weights")
    context = LambdaContext()
    # WHEN a request hits it
    response = invoke(load_event("rest-generate-seed-prompt"), context)
    # THEN 500 with a generic message and the request id; no stack, no detail
    assert response["statusCode"] == 500
    body = body_of(response)
    assert body == {
        "error": "internal_error",
        "message": errors.INTERNAL_ERROR_MESSAGE,
        "request_id": context.aws_request_id,
        "details": [],
    }
    assert "Traceback" not in response["body"] and "/opt/model" not in response["body"]
    # AND the next request succeeds
    fake.fail_with = None
    assert invoke(load_event("rest-generate-seed-prompt"))["statusCode"] == 200


def test_model_not_ready_is_503(monkeypatch):
    def not_ready(wait_s=None):
        raise errors.ModelNotReady("the model failed to load")

    monkeypatch.setattr(generator_module, "get_generator", not_ready)
    response = invoke(load_event("rest-generate-seed-prompt"))
    assert response["statusCode"] == 503
    health = invoke(load_event("rest-health"))
    assert health["statusCode"] == 503
    assert body_of(health)["status"] == "not_ready"


def test_health_reports_the_model_and_warmth(fake):
    first = body_of(invoke(load_event("rest-health")))
    second = body_of(invoke(load_event("http-health")))
    assert first["status"] == "ok" and first["loaded"] is True
    assert first["model_id"] == "fake/model" and first["dtype"] == "float32"
    assert first["model"]["revision"] == "r1"
    assert second["cold_start"] is False


def test_openapi_document_describes_generate_and_its_bounds(fake):
    response = invoke(load_event("rest-openapi"))
    spec = json.loads(response["body"])
    assert "/generate" in spec["paths"] and "/health" in spec["paths"]
    request = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert request["max_new_tokens"]["maximum"] == 1024
    assert "description" in request["prompt"]


def test_deadline_respects_budget_and_remaining_time(fake, monkeypatch):
    # GIVEN an invocation with only 5 s left, and a 25 s budget
    context = LambdaContext(remaining_ms=5000)
    # WHEN handled
    invoke(load_event("rest-generate-seed-prompt"), context)
    # THEN the generator must finish before the remaining time minus the margin
    call = fake.calls[0]
    assert call.deadline - call.at <= 5.0 - handler.settings.deadline_margin_s + 0.05


def _logged(caplog) -> str:
    return "\n".join(json.dumps(record.__dict__, default=str) for record in caplog.records)


def test_prompts_and_generated_text_are_not_logged_by_default(fake, caplog):
    event = load_event("rest-generate-seed-prompt")
    prompt = json.loads(event["body"])["prompt"]
    invoke(event)
    assert any(record.getMessage() == "generated" for record in caplog.records)  # a summary is logged...
    assert prompt not in _logged(caplog)  # ...without the prompt


def test_prompts_are_logged_only_when_enabled(fake, caplog, monkeypatch):
    logging_text = dataclasses.replace(handler.settings, log_text=True)
    monkeypatch.setattr(serving, "get_settings", lambda: logging_text)
    event = load_event("rest-generate-seed-prompt")
    invoke(event)
    assert json.loads(event["body"])["prompt"] in _logged(caplog)


def test_base64_encoded_body_is_decoded(fake):
    import base64

    event = load_event("rest-generate-seed-prompt")
    event["body"] = base64.b64encode(event["body"].encode()).decode()
    event["isBase64Encoded"] = True
    assert invoke(event)["statusCode"] == 200
