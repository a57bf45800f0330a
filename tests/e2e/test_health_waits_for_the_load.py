"""`GET /health` on a new execution environment whose model load takes seconds, on both surfaces.

Lambda freezes an environment while no request is in flight, background threads included, so a model that
loads in the background advances only while some request runs. A health check that answered at once would
poll a frozen load forever; `/health` therefore waits for the load (up to HEALTH_WAIT_SECONDS, within its
deadline), and each poll moves the load on. The RIE never freezes: tests/slowed_function.py stands in for the
freeze (the load's added seconds elapse only while an invocation is in flight) and makes the load take
seconds by construction, whatever the CPU's speed.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import load_event
from rie import RieServer, api_body, slowed
from runtime_api import RuntimeApiStandIn, RuntimeProcess, split_prelude

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOAD_S = 5.0
WAIT_S = 1.5
# More polls than the load can need once it has started, at WAIT_S each (the rest is the real load's own time).
MAX_POLLS = 20


def header(response: dict, name: str) -> str | None:
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    multi = {k.lower(): v[0] for k, v in (response.get("multiValueHeaders") or {}).items() if v}
    return headers.get(name) or multi.get(name)


def test_polled_health_moves_a_frozen_environments_load_on_until_it_answers_200(tiny_phi_dir):
    # GIVEN a new on-demand environment, frozen between requests, whose model load needs LOAD_S of request time
    rie = RieServer(
        tiny_phi_dir,
        MODEL_LOADING="background",
        HEALTH_WAIT_SECONDS=str(WAIT_S),
        **slowed(SLOW_LOAD_S=str(LOAD_S), FROZEN_BETWEEN_REQUESTS="true"),
    )
    try:
        # WHEN a liveness check that does not wait (?wait=0) polls it, with a pause longer than the whole wait
        no_wait = [rie.invoke(load_event("rest-health-no-wait"))]
        time.sleep(2 * WAIT_S)
        no_wait.append(rie.invoke(load_event("rest-health-no-wait")))
        # THEN it answers at once, loading, every time: nothing moved the load between the requests
        for response in no_wait:
            assert response["statusCode"] == 503, response
            assert api_body(response)["status"] == "loading"
        # WHEN /health is polled as a deploy script or an uptime check polls it
        polls: list[tuple[int, float, dict]] = []
        for _ in range(MAX_POLLS):
            started = time.monotonic()
            response = rie.invoke(load_event("rest-health"))
            polls.append((response["statusCode"], time.monotonic() - started, response))
            if response["statusCode"] == 200:
                break
        # THEN it became ready: each poll waited for the load and so moved it on
        assert polls[-1][0] == 200, [(status, round(s, 2)) for status, s, _ in polls]
        ready = api_body(polls[-1][2])
        assert ready["status"] == "ok" and ready["loaded"] is True
        # AND every answer before that waited its whole HEALTH_WAIT_SECONDS and said when to come back
        waiting = polls[:-1]
        assert len(waiting) >= int(LOAD_S / (WAIT_S + 0.5)), "the load finished without requests moving it"
        for status, seconds, response in waiting:
            assert status == 503 and api_body(response)["status"] == "loading"
            assert seconds >= WAIT_S
            assert header(response, "retry-after") == "1"
    finally:
        rie.stop()


def test_health_waits_on_the_streaming_surface_too(tiny_phi_dir):
    """The streaming runtime (`python -m slowed_function`) against a stand-in of Lambda's Runtime API: /health,
    answered as a normal response there, waits for the load the same way."""
    stand_in = RuntimeApiStandIn()
    process = RuntimeProcess(
        stand_in,
        ["-m", "slowed_function"],
        MODEL_DIR=str(tiny_phi_dir),
        MODEL_LOADING="background",
        HEALTH_WAIT_SECONDS=str(WAIT_S),
        SLOW_LOAD_S=str(LOAD_S),
        FROZEN_BETWEEN_REQUESTS="true",
    )
    try:
        # GIVEN the no-wait form answers loading at once
        first = stand_in.invoke(load_event("rest-health-no-wait"), wait_s=120)
        prelude, body = split_prelude(first.data)
        assert prelude["statusCode"] == 503 and json.loads(body)["status"] == "loading"
        # WHEN /health is polled
        statuses = []
        for _ in range(MAX_POLLS):
            answer = stand_in.invoke(load_event("rest-health"), wait_s=120)
            prelude, body = split_prelude(answer.data)
            statuses.append(prelude["statusCode"])
            if prelude["statusCode"] == 200:
                break
        # THEN it answered 503 while it waited for the load, then 200, as a normal JSON response each time
        assert statuses[-1] == 200 and json.loads(body)["status"] == "ok", statuses
        assert len(statuses) > int(LOAD_S / (WAIT_S + 0.5))
        content_type = prelude.get("headers", {}).get("Content-Type") or prelude["multiValueHeaders"]["Content-Type"][0]
        assert content_type == "application/json"
    finally:
        died = process.died_by()
        process.stop()
        stand_in.close()
    assert died is None
