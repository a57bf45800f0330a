"""infra/smoke_test.py against moto's CloudFormation (the stack outputs) and a local stand-in of the deployed
API: an HTTP server on 127.0.0.1 that hands each request, as API Gateway would, to the real handler (with
the fake generator of the unit tests, so no model is needed)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
import smoke_test
from conftest import AWS_REGION, LambdaContext, load_event
from fakes import FakeGenerator
from moto import mock_aws

from phi2 import errors
from phi2.engine import generator as generator_module
from phi2.runtime import handler

STACK = "phi2-lambda"
REGION = AWS_REGION


class StandInApi:
    """API Gateway's side of the deployed stack: stage prefix, optional API key, and (optionally) a few
    504s first, as a cold start longer than 29 s gives."""

    def __init__(self, api_key: str | None = None, cold_504s: int = 0) -> None:
        self.api_key = api_key
        self.cold_504s = cold_504s
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.serve("GET")

            def do_POST(self) -> None:
                self.serve("POST")

            def serve(self, method: str) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                api.requests.append((method, self.path))
                status, payload = api.answer(method, self.path, body, self.headers.get("x-api-key"))
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}/v1"

    def answer(self, method: str, path: str, body: str, api_key: str | None) -> tuple[int, str]:
        if self.api_key and api_key != self.api_key:
            return 403, json.dumps({"message": "Forbidden"})
        if self.cold_504s:
            self.cold_504s -= 1
            return 504, json.dumps({"message": "Endpoint request timed out"})
        event = load_event("rest-generate-seed-prompt")
        resource = path.removeprefix("/v1")
        event.update(path=resource, resource=resource, httpMethod=method, body=body or None)
        event["requestContext"].update(path=path, resourcePath=resource, httpMethod=method, stage="v1")
        response = handler.lambda_handler(event, LambdaContext())
        return response["statusCode"], response["body"]


@contextmanager
def serving(api: StandInApi) -> Iterator[StandInApi]:
    thread = threading.Thread(target=api.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.server.shutdown()
        api.server.server_close()


@pytest.fixture
def fake_model(monkeypatch) -> FakeGenerator:
    generator = FakeGenerator()
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    return generator


@pytest.fixture
def aws(moto_credentials):
    with mock_aws():
        yield boto3.client("cloudformation", region_name=REGION)


def deploy_stack(cloudformation, outputs: dict[str, str]) -> None:
    """A stack in moto whose Outputs are the deployed template's, pointing at the stand-in API."""
    template = {
        "Resources": {"Placeholder": {"Type": "AWS::S3::Bucket"}},
        "Outputs": {key: {"Value": value} for key, value in outputs.items()},
    }
    cloudformation.create_stack(StackName=STACK, TemplateBody=json.dumps(template))


def test_smoke_test_passes_when_the_deployed_api_generates(aws, fake_model, capsys):
    with serving(StandInApi()) as api:
        # GIVEN a deployed stack whose outputs name the API's /generate and /health
        deploy_stack(aws, {"GenerateUrl": f"{api.base}/generate", "HealthUrl": f"{api.base}/health", "ApiId": "x"})
        # WHEN the smoke test runs against the stack by name
        code = smoke_test.main([STACK, "--region", REGION])
    # THEN it passes, having checked /health, then POSTed the seed's prompt
    assert code == 0
    out = capsys.readouterr().out  # the in-process handler also prints its one-line logs and metrics
    summary = json.loads(out[out.index("{\n") :])
    assert summary["status"] == 200
    assert summary["generated_text"].startswith(smoke_test.seed_prompt())
    assert summary["model_id"] == "fake/model"
    assert api.requests == [("GET", "/v1/health"), ("POST", "/v1/generate")]
    assert fake_model.calls[0].prompts == [smoke_test.seed_prompt()]


def test_smoke_test_sends_the_api_key_when_given(aws, fake_model):
    with serving(StandInApi(api_key="secret-key")) as api:
        # GIVEN a stack deployed with RequireApiKey=true
        deploy_stack(aws, {"GenerateUrl": f"{api.base}/generate"})
        # WHEN the smoke test runs without, then with, the key
        without = smoke_test.main([STACK, "--region", REGION, "--retries", "0"])
        with_key = smoke_test.main([STACK, "--region", REGION, "--api-key", "secret-key"])
    # THEN it fails on the 403, and passes with the key
    assert (without, with_key) == (1, 0)


def test_smoke_test_fails_when_the_api_answers_an_error(aws, fake_model, capsys):
    fake_model.fail_with = RuntimeError("boom")
    with serving(StandInApi()) as api:
        # GIVEN a deployed API whose function fails
        deploy_stack(aws, {"GenerateUrl": f"{api.base}/generate"})
        # WHEN the smoke test runs
        code = smoke_test.main([STACK, "--region", REGION])
    # THEN it fails and says what the API answered
    assert code == 1
    assert "POST /generate answered 500" in capsys.readouterr().err


def test_smoke_test_waits_out_a_cold_start_that_outlasts_api_gateway(aws, fake_model):
    with serving(StandInApi(cold_504s=2)) as api:
        # GIVEN an API that answers 504 twice while the function initialises
        deploy_stack(aws, {"GenerateUrl": f"{api.base}/generate"})
        outputs = smoke_test.stack_outputs(STACK, aws)
        # WHEN the smoke test runs with retries
        summary = smoke_test.run(outputs, "The capital of France is", retries=3, pause=0)
    # THEN it retried and passed
    assert summary["status"] == 200 and summary["generated_text"] == "The capital of France is ok"
    assert len(api.requests) == 3


def test_smoke_test_names_the_problem_when_the_stack_is_missing_or_incomplete(aws, capsys):
    # GIVEN no such stack WHEN the smoke test runs THEN it fails saying so
    assert smoke_test.main(["no-such-stack", "--region", REGION]) == 1
    assert "no-such-stack" in capsys.readouterr().err
    # GIVEN a stack without a GenerateUrl output WHEN the smoke test runs THEN it fails naming the output
    deploy_stack(aws, {"ApiId": "abc"})
    assert smoke_test.main([STACK, "--region", REGION]) == 1
    assert "no GenerateUrl output" in capsys.readouterr().err


def test_smoke_test_polls_health_at_once_until_the_load_its_calls_move_on_is_done(aws, monkeypatch):
    # GIVEN a new environment, frozen between requests as Lambda freezes it: its model load moves on only while
    # a request waits for it, and this one needs three such waits
    fake = FakeGenerator()
    waits: list[float | None] = []

    def get_generator(wait_s=None):
        waits.append(wait_s)
        if len(waits) <= 3:
            raise errors.ModelLoading(5.0)
        return fake

    monkeypatch.setattr(generator_module, "get_generator", get_generator)
    with serving(StandInApi()) as api:
        deploy_stack(aws, {"GenerateUrl": f"{api.base}/generate", "HealthUrl": f"{api.base}/health"})
        outputs = smoke_test.stack_outputs(STACK, aws)
        # WHEN the smoke test runs, with a long pause for API Gateway's own errors
        started = time.monotonic()
        summary = smoke_test.run(outputs, "The capital of France is", pause=60)
        elapsed = time.monotonic() - started
    # THEN it polled /health until the model was loaded, then generated
    assert summary["health_calls"] == 4 and summary["model_id"] == "fake/model"
    assert api.requests == [("GET", "/v1/health")] * 4 + [("POST", "/v1/generate")]
    # AND each /health waited for the load (HEALTH_WAIT_SECONDS), while the smoke test itself never paused
    # between them: on Lambda a pause only waits on a frozen environment
    assert all(wait and wait > 0 for wait in waits[:4])
    assert elapsed < 60


def test_smoke_test_gives_up_on_a_load_that_does_not_finish(aws, monkeypatch, capsys):
    def never_loaded(wait_s=None):
        raise errors.ModelLoading(5.0)

    monkeypatch.setattr(generator_module, "get_generator", never_loaded)
    with serving(StandInApi()) as api:
        deploy_stack(aws, {"GenerateUrl": f"{api.base}/generate", "HealthUrl": f"{api.base}/health"})
        code = smoke_test.main([STACK, "--region", REGION, "--load-timeout", "0"])
    assert code == 1
    assert "GET /health answered 503" in capsys.readouterr().err
    assert ("POST", "/v1/generate") not in api.requests
