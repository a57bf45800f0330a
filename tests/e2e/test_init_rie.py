"""Lambda's init phase under the real RIE: on-demand environments load the model in the background (init
returns at once, inside the 10 s limit, and early requests wait for the model within their own deadline),
provisioned concurrency loads and warms it fully during init.

The on-demand load is made to last at least LOAD_S by construction (tests/slowed_function.py), so that "the
model is still loading" holds on any CPU: on a fast one SmolLM2 loaded before the second request came."""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import load_event
from rie import RieServer, api_body, slowed

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_TIMEOUT_S = 60.0
MARGIN_S = 1.5
LOAD_S = 10.0


def init_seconds(rie: RieServer) -> float:
    """The init phase's duration as the RIE reports it (`INIT REPORT(durationMs: ...)`)."""
    match = re.search(r"INIT REPORT\(durationMs: ([0-9.]+)\)", rie.logs())
    assert match, f"no INIT REPORT in the RIE's log:\n{rie.logs()[-3000:]}"
    return float(match.group(1)) / 1000


def rest_event_with_budget(name: str, budget_s: float) -> dict:
    """A REST event that API Gateway received long enough ago to leave `budget_s` before its deadline."""
    event = load_event(name)
    received = time.time() - (API_TIMEOUT_S - MARGIN_S - budget_s)
    event["requestContext"]["requestTimeEpoch"] = int(received * 1000)
    return event


def start(model_dir, initialization_type: str, **env: str) -> RieServer:
    return RieServer(
        model_dir,
        AWS_LAMBDA_INITIALIZATION_TYPE=initialization_type,
        MODEL_LOADING="auto",
        AWS_LAMBDA_FUNCTION_TIMEOUT="120",
        API_TIMEOUT_MS=str(int(API_TIMEOUT_S * 1000)),
        DEADLINE_MARGIN_SECONDS=str(MARGIN_S),
        **env,
    )


def test_on_demand_init_returns_at_once_and_early_requests_wait_within_their_deadline(smollm2_dir):
    rie = start(smollm2_dir, "on-demand", **slowed(SLOW_LOAD_S=str(LOAD_S)))
    try:
        # GIVEN a new on-demand environment whose load takes LOAD_S at least: the RIE runs init on the first
        # invoke, a health check that does not wait
        health = rie.invoke(load_event("rest-health-no-wait"))
        # THEN init returned well inside Lambda's 10 s, before the model was loaded
        assert init_seconds(rie) < 10
        assert health["statusCode"] == 503 and api_body(health)["status"] == "loading", health
        # (how long an answer that waits for nothing takes on this machine right now, while the model loads)
        began = time.monotonic()
        rie.invoke(load_event("rest-health-no-wait"))
        overhead = time.monotonic() - began
        # WHEN a request with 0.5 s left before API Gateway's deadline arrives while the model is still loading
        event = rest_event_with_budget("rest-generate-greedy", 0.5)
        started = time.monotonic()
        first = rie.invoke(event)
        elapsed = time.monotonic() - started
        # THEN it gets a 503 with Retry-After by its deadline
        assert first["statusCode"] == 503, first
        body = api_body(first)
        assert body["error"] == "model_loading"
        headers = {k.lower(): v for k, v in (first.get("headers") or {}).items()}
        multi = {k.lower(): v for k, v in (first.get("multiValueHeaders") or {}).items()}
        assert int(headers.get("retry-after") or multi["retry-after"][0]) >= 1
        assert elapsed < 0.5 + MARGIN_S + 2 * overhead + 0.5, f"the 503 came {elapsed:.2f} s later"
        # WHEN a request with time to spare arrives (a direct invocation: the function's remaining time)
        answer = rie.invoke({"prompt": "The capital of France is", "max_new_tokens": 4, "do_sample": False})
        # THEN it waited for the model and is answered
        assert "Paris" in answer["generated_text"], answer
        ready = api_body(rie.invoke(load_event("rest-health")))
        assert ready["status"] == "ok"
        # AND the load went on after init ended: init was shorter than the load itself
        assert init_seconds(rie) < ready["load_seconds"]
        assert '"model ready"' in rie.logs() and '"background":true' in rie.logs()
    finally:
        rie.stop()


def test_provisioned_concurrency_loads_and_warms_fully_during_init(smollm2_dir):
    rie = start(smollm2_dir, "provisioned-concurrency")
    try:
        # WHEN the first request reaches an environment initialised for provisioned concurrency
        health = rie.invoke(load_event("rest-health"))
        # THEN the model was loaded (and measured) during init: the first request finds it ready
        assert health["statusCode"] == 200, health
        body = json.loads(health["body"])
        assert body["status"] == "ok" and body["cold_start"] is True
        assert body["speeds"]["calibrated"] is True
        assert init_seconds(rie) >= body["load_seconds"]
        assert '"background":false' in rie.logs()
    finally:
        rie.stop()
