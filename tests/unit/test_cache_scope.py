"""Who may reuse whose prompt pass: the caller as API Gateway or Lambda identified it (an API key id, an IAM
principal; every direct invocation is one caller), narrowed by OpenAI's `prompt_cache_key`, never widened; and
what the answers report about it (`usage.prompt_tokens_details.cached_tokens`, the native `cached_tokens`)."""

from __future__ import annotations

import json

import pytest
from conftest import LambdaContext, load_event
from fakes import FakeGenerator

from phi2 import settings as settings_module
from phi2.engine import generator as generator_module
from phi2.runtime import handler, invocation


@pytest.fixture
def fake(monkeypatch) -> FakeGenerator:
    generator = FakeGenerator(model_id="microsoft/phi-2", cached_tokens=7)
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
    return generator


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch):
    monkeypatch.delenv("PROMPT_CACHE_UNAUTHENTICATED", raising=False)
    settings_module.get_settings.cache_clear()
    yield
    settings_module.get_settings.cache_clear()


def invoke(event: dict) -> dict:
    return handler.lambda_handler(event, LambdaContext())


def with_key(key_id: str | None, **body) -> dict:
    event = load_event("openai/rest-chat-completions-api-key")
    if key_id is None:
        del event["requestContext"]["identity"]["apiKeyId"]
    else:
        event["requestContext"]["identity"]["apiKeyId"] = key_id
    event["body"] = json.dumps({**json.loads(event["body"]), **body})
    return event


def test_a_rest_request_is_scoped_to_its_api_key_id_and_never_to_the_key_itself(fake):
    # GIVEN two REST requests with the API keys of two tenants
    invoke(with_key("key-id-a"))
    invoke(with_key("key-id-b"))
    # THEN each generation is scoped to its key's id; the key's value never appears
    scopes = [call.cache_scope for call in fake.calls]
    assert scopes[0] != scopes[1]
    assert "key-id-a" in scopes[0][0] and "key-id-b" in scopes[1][0]
    assert not any("example-api-key-value" in str(scope) for scope in scopes)


def test_prompt_cache_key_narrows_a_callers_scope_and_cannot_reach_another_caller(fake):
    invoke(with_key("key-id-a", prompt_cache_key="project-1"))
    invoke(with_key("key-id-a", prompt_cache_key="project-2"))
    invoke(with_key("key-id-b", prompt_cache_key="project-1"))
    invoke(with_key("key-id-a"))
    a1, a2, b1, a = (call.cache_scope for call in fake.calls)
    assert len({a1, a2, b1, a}) == 4
    assert a1[0] == a2[0] == a[0] != b1[0]


def test_an_iam_signed_function_url_request_is_scoped_to_its_principal(fake):
    event = load_event("function-url-generate-iam")
    invoke(event)
    assert fake.calls[-1].cache_scope == ("userArn=arn:aws:iam::123456789012:user/tenant-a", "")


def test_every_direct_invocation_is_one_caller(fake):
    invoke(load_event("direct-generate"))
    invoke(load_event("direct-generate"))
    assert fake.calls[0].cache_scope == fake.calls[1].cache_scope == ("direct", "")


def test_unauthenticated_requests_share_nothing_unless_the_deployer_allows_it(fake, monkeypatch):
    # GIVEN API Gateway requests that carry no identity (RequireApiKey=false, no IAM)
    invoke(with_key(None))
    invoke(load_event("http-generate-seed-prompt"))
    assert [call.cache_scope for call in fake.calls] == [None, None]
    # WHEN the deployer allows them one shared cache
    monkeypatch.setenv("PROMPT_CACHE_UNAUTHENTICATED", "true")
    settings_module.get_settings.cache_clear()
    invoke(with_key(None))
    assert fake.calls[-1].cache_scope == ("unauthenticated", "")
    assert invocation.caller() is None


def test_openai_usage_and_native_details_report_the_cached_tokens(fake):
    response = invoke(with_key("key-id-a", n=2))
    usage = json.loads(response["body"])["usage"]
    # The prompt is counted once however many choices share it, and so are its cached tokens
    assert usage["prompt_tokens_details"]["cached_tokens"] == 7
    native = invoke(load_event("direct-generate"))
    assert native["details"]["cached_tokens"] == 7
