"""Soak: a long run of mixed valid and invalid requests through the RIE on the tiny Phi-2 model, one at
a time. Every answer is the expected one, and the runtime's resident memory does not grow."""

from __future__ import annotations

import base64
import copy
import itertools
import json

import pytest
from conftest import load_event
from hostile import load, outcome
from rie import RieServer
from runtime_process import rss_kib, runtime_pid

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

INVOKES = 300
BASELINE_AFTER = 20
MAX_GROWTH = 0.05


def _rest(body: object, **changes: object) -> dict:
    event = copy.deepcopy(load_event("rest-generate-seed-prompt"))
    event["body"] = body if isinstance(body, str) else json.dumps(body)
    event.update(changes)
    return event


def _http(body: object) -> dict:
    event = copy.deepcopy(load_event("http-generate-seed-prompt"))
    event["body"] = json.dumps(body)
    return event


def _payload(event: object) -> bytes:
    return json.dumps(event).encode()


# (what, invoke payload, expected status); small max_new_tokens keeps the run to a couple of minutes.
MIX: list[tuple[str, bytes, int]] = [
    ("greedy", _payload(load_event("rest-generate-greedy")), 200),
    ("sampled, seeded, stop", _payload(_rest({"prompt": "Once upon a time", "max_new_tokens": 6, "stop": ["."]})), 200),
    ("malformed JSON", _payload(load_event("rest-generate-malformed-json")), 400),
    ("http api", _payload(_http({"prompt": "def add(a, b):", "max_new_tokens": 5, "do_sample": False})), 200),
    ("unknown field", _payload(_rest({"prompt": "hi", "max_tokens": 5})), 422),
    ("batch of three", _payload(_rest({"prompts": ["a", "bb bb", "c c c"], "max_new_tokens": 4})), 200),
    ("context overflow", load("rest-prompt-far-past-the-context").payload, 422),
    ("direct", _payload({"prompt": "The capital of France is", "max_new_tokens": 4}), 200),
    ("oversized body", _payload(load_event("rest-generate-oversized-body")), 413),
    ("health", _payload(load_event("rest-health")), 200),
    ("invalid base64", load("rest-base64-invalid").payload, 400),
    ("emoji", load("rest-prompt-emoji").payload, 200),
    ("wrong method", _payload(load_event("rest-generate-wrong-method")), 405),
    ("unknown route", _payload(load_event("rest-unknown-route")), 404),
    (
        "base64 body",
        _payload(_rest(base64.b64encode(b'{"prompt": "Hi", "max_new_tokens": 4}').decode(), isBase64Encoded=True)),
        200,
    ),
    ("wrong content type", load("rest-content-type-form").payload, 415),
    ("NaN temperature", load("rest-temperature-nan").payload, 400),
    ("direct garbage", load("direct-garbage-list").payload, 400),
]


def test_soak_mixed_requests_get_expected_answers_and_memory_does_not_grow(tiny_phi_dir):
    # GIVEN the function under the RIE, warm
    server = RieServer(tiny_phi_dir)
    try:
        server.invoke(load_event("rest-health"))
        pid = runtime_pid(server)
        unexpected: list[str] = []
        baseline = 0
        # WHEN it serves a long mixed run, one invoke at a time
        for number, (what, payload, status) in enumerate(itertools.islice(itertools.cycle(MIX), INVOKES), 1):
            got = outcome(server.invoke_raw(payload, timeout=120))
            if got.status != status or (status >= 400 and not got.body.get("request_id")):
                unexpected.append(f"#{number} {what}: expected {status}, got {got}")
            if number == BASELINE_AFTER:
                baseline = rss_kib(pid)
        final = rss_kib(pid)
        growth = (final - baseline) / baseline
        print(
            f"\nsoak: {INVOKES} invokes, {len(unexpected)} unexpected; VmRSS after {BASELINE_AFTER}: {baseline} KiB, "
            f"after {INVOKES}: {final} KiB ({growth:+.2%})"
        )
        # THEN every answer was the expected one, from the same runtime process
        assert unexpected == []
        assert runtime_pid(server) == pid
        # AND resident memory after the run is within 5 % of what it was after the first 20
        assert abs(growth) <= MAX_GROWTH, f"VmRSS {baseline} KiB -> {final} KiB ({growth:+.2%})"
    finally:
        server.stop()
