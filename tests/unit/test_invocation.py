"""The deadline of an invocation, per surface: from API Gateway's receipt of the request plus the integration's
timeout (the template sets both from one parameter), never past the invocation's own remaining time."""

from __future__ import annotations

import time

import pytest
from conftest import LambdaContext, load_event

from phi2 import settings as settings_module
from phi2.runtime import invocation

API_TIMEOUT_S = 29.0
MARGIN_S = 1.5


@pytest.fixture(autouse=True)
def surface(monkeypatch):
    """A buffered surface: API_TIMEOUT_MS=29000, margin 1.5 s, not under sam local."""
    monkeypatch.setenv("API_TIMEOUT_MS", str(int(API_TIMEOUT_S * 1000)))
    monkeypatch.setenv("DEADLINE_MARGIN_SECONDS", str(MARGIN_S))
    monkeypatch.delenv("AWS_SAM_LOCAL", raising=False)
    settings_module.get_settings.cache_clear()
    yield
    settings_module.get_settings.cache_clear()


def rest_event(received_s_ago: float) -> dict:
    event = load_event("rest-generate-seed-prompt")
    event["requestContext"]["requestTimeEpoch"] = int((time.time() - received_s_ago) * 1000)
    return event


def http_event(received_s_ago: float) -> dict:
    event = load_event("http-generate-seed-prompt")
    event["requestContext"]["timeEpoch"] = int((time.time() - received_s_ago) * 1000)
    return event


def deadline_for(event: dict, kind: str, remaining_s: float = 900.0) -> invocation.Deadline:
    invocation.begin(LambdaContext(remaining_ms=int(remaining_s * 1000)), kind, event)
    return invocation.deadline()


@pytest.mark.parametrize(("make", "kind"), [(rest_event, "rest"), (http_event, "http")])
def test_api_gateway_requests_count_from_when_api_gateway_received_them(make, kind):
    # GIVEN a request API Gateway received 20 s ago (a cold start, say)
    deadline = deadline_for(make(20.0), kind)
    # THEN what is left is the integration's timeout less those 20 s and the margin
    assert deadline.source == "api_timeout"
    assert deadline.remaining() == pytest.approx(API_TIMEOUT_S - 20.0 - MARGIN_S, abs=0.05)
    assert deadline.waited_s == pytest.approx(20.0, abs=0.05)


def test_the_invocation_s_remaining_time_caps_the_api_deadline():
    deadline = deadline_for(rest_event(0.0), "rest", remaining_s=10.0)
    assert deadline.source == "invocation_timeout"
    assert deadline.remaining() == pytest.approx(10.0 - MARGIN_S, abs=0.05)


def test_a_direct_invocation_gets_the_function_s_remaining_time():
    deadline = deadline_for({"prompt": "hi"}, "direct", remaining_s=300.0)
    assert deadline.source == "invocation_timeout"
    assert deadline.remaining() == pytest.approx(300.0 - MARGIN_S, abs=0.05)


def test_a_replayed_event_older_than_the_api_timeout_is_not_bound_by_it():
    # GIVEN a sample event from events/ (received yesterday, as `sam local invoke -e` replays it)
    deadline = deadline_for(load_event("rest-generate-seed-prompt"), "rest", remaining_s=60.0)
    # THEN no API Gateway waits for it: the invocation's own remaining time applies
    assert deadline.source == "invocation_timeout"
    assert deadline.remaining() == pytest.approx(60.0 - MARGIN_S, abs=0.05)


def test_sam_local_s_request_time_is_ignored(monkeypatch):
    # GIVEN sam local start-api, which stamps every request with its own start time (aws/aws-sam-cli#9279)
    monkeypatch.setenv("AWS_SAM_LOCAL", "true")
    deadline = deadline_for(rest_event(25.0), "rest")
    # THEN the request counts from its arrival in the function
    assert deadline.remaining() == pytest.approx(API_TIMEOUT_S - MARGIN_S, abs=0.05)


def test_a_request_past_its_deadline_has_no_time_left():
    deadline = deadline_for(rest_event(28.0), "rest")
    assert deadline.remaining() < 0
