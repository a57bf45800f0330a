"""`GET /health` through the handler, with a stand-in for the model's loading state: how long it waits for a
loading model (HEALTH_WAIT_SECONDS, never past its deadline; `?wait=N` and `?wait=0`), and what it answers
(200, 503 loading with Retry-After, 503 not_ready at once). The real load, in an environment frozen between
requests, is tests/e2e/test_health_waits_for_the_load.py."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import LambdaContext, load_event
from fakes import FakeGenerator

from phi2 import errors
from phi2.engine import generator as generator_module
from phi2.runtime import handler
from phi2.settings import get_settings


class Loading:
    """get_generator while the model loads: records each wait, and is ready after `ready_after` calls."""

    def __init__(self, ready_after: int | None = None, failed: bool = False) -> None:
        self.waits: list[float | None] = []
        self.ready_after = ready_after
        self.failed = failed
        self.model = FakeGenerator()

    def __call__(self, wait_s: float | None = None):
        self.waits.append(wait_s)
        if self.failed:
            raise errors.ModelNotReady("the model failed to load")
        if self.ready_after is not None and len(self.waits) > self.ready_after:
            return self.model
        raise errors.ModelLoading(3.0)


@pytest.fixture
def loading(monkeypatch) -> Loading:
    state = Loading()
    monkeypatch.setattr(generator_module, "get_generator", state)
    return state


def health(wait: str | None = None, kind: str = "rest", remaining_ms: int = 60_000) -> dict:
    event = copy.deepcopy(load_event(f"{kind}-health"))
    if wait is not None:
        if kind == "rest":
            event["queryStringParameters"] = {"wait": wait}
            event["multiValueQueryStringParameters"] = {"wait": [wait]}
        else:
            event["rawQueryString"] = f"wait={wait}"
            event["queryStringParameters"] = {"wait": wait}
    return handler.lambda_handler(event, LambdaContext(remaining_ms=remaining_ms))


def header(response: dict, name: str) -> str | None:
    found = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    multi = {k.lower(): v[0] for k, v in (response.get("multiValueHeaders") or {}).items() if v}
    return found.get(name) or multi.get(name)


@pytest.mark.parametrize("kind", ["rest", "http"])
def test_health_waits_up_to_health_wait_seconds_for_a_loading_model(loading, kind):
    # WHEN /health finds the model loading, with a minute left before its deadline
    response = health(kind=kind)
    # THEN it waited HEALTH_WAIT_SECONDS for it, then said loading, to be asked again at once
    assert loading.waits == [pytest.approx(get_settings().health_wait_s)]
    assert response["statusCode"] == 503 and json.loads(response["body"])["status"] == "loading"
    assert header(response, "retry-after") == "1"


def test_health_never_waits_past_its_own_deadline(loading):
    # GIVEN 5 s left of the invocation (a replayed sample event: the invocation's own time applies)
    health(remaining_ms=5_000)
    # THEN it waited at most what the deadline leaves (5 s less the margin), not HEALTH_WAIT_SECONDS
    (waited,) = loading.waits
    assert 0 < waited <= 5.0 - get_settings().deadline_margin_s < get_settings().health_wait_s


@pytest.mark.parametrize(("wait", "expected"), [("0", 0.0), ("2.5", 2.5), ("3600", None)])
def test_wait_sets_the_wait_which_health_wait_seconds_still_caps(loading, wait, expected):
    response = health(wait)
    assert response["statusCode"] == 503
    assert loading.waits == [pytest.approx(get_settings().health_wait_s if expected is None else expected)]


@pytest.mark.parametrize("wait", ["-1", "soon", "nan"])
def test_a_wait_that_is_not_a_non_negative_number_is_refused(loading, wait):
    response = health(wait)
    assert response["statusCode"] == 422, response["body"]
    assert json.loads(response["body"])["error"] == "validation_error" and loading.waits == []


def test_a_polled_health_answers_200_once_the_model_is_ready(monkeypatch):
    state = Loading(ready_after=2)
    monkeypatch.setattr(generator_module, "get_generator", state)
    statuses = [health()["statusCode"] for _ in range(3)]
    assert statuses == [503, 503, 200]


def test_a_failed_load_is_not_ready_at_once(monkeypatch):
    state = Loading(failed=True)
    monkeypatch.setattr(generator_module, "get_generator", state)
    response = health()
    assert response["statusCode"] == 503 and json.loads(response["body"])["status"] == "not_ready"
    assert header(response, "retry-after") is None
