"""The hostile-event catalogue (events/hostile/) through the real Lambda RIE on the tiny Phi-2 model,
one invoke at a time: every bad request gets its clear 4xx (valid-but-unusual ones a 200), never a
5xx, nothing internal leaks, the runtime process survives, and a normal request right after still works."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, load_event
from hostile import CATALOGUE, assert_openai_answer, load, names, outcome
from rie import RieServer, api_body
from runtime_process import runtime_pid

pytestmark = pytest.mark.e2e

# What must never appear in an answer: a stack trace, a source location, where the code or model lives.
LEAKS = ("Traceback", 'File "', "site-packages", str(ROOT), "/opt/model", '.py"', ".safetensors")


@pytest.fixture(scope="module")
def server(tiny_phi_dir):
    rie = RieServer(tiny_phi_dir)
    rie.invoke(load_event("rest-health"))  # init (model load) happens here
    rie.runtime_pid = runtime_pid(rie)
    yield rie
    rie.stop()


def test_the_catalogue_covers_at_least_forty_cases_each_with_an_expectation():
    specs = [json.loads(path.read_text(encoding="utf-8")) for path in CATALOGUE.glob("*.json")]
    assert len(specs) >= 40
    for spec in specs:
        assert spec["description"] and spec["expect"]
        assert "runtime_error" in spec["expect"] or spec["expect"]["status"] in (200, 400, 404, 405, 413, 415, 422)


def assert_nothing_internal_leaks(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} in the answer"


def assert_a_normal_request_still_works(server: RieServer) -> None:
    event = load_event("rest-generate-greedy")
    prompt = json.loads(event["body"])["prompt"]
    response = server.invoke(event)
    assert response["statusCode"] == 200, response
    assert api_body(response)["generated_text"].startswith(prompt)


@pytest.mark.parametrize("name", names())
def test_hostile_event_gets_its_expected_answer_and_the_runtime_keeps_serving(server, name):
    # GIVEN a case from the catalogue
    case = load(name)
    expect = case.expect
    # WHEN it is invoked through the RIE
    raw = server.invoke_raw(case.payload, timeout=120)
    got = outcome(raw)
    # THEN the answer is the one the catalogue expects: a 4xx naming the problem, a 200, or the Lambda
    # runtime's own rejection of a payload it cannot unmarshal
    if "runtime_error" in expect:
        assert got.runtime_error == expect["runtime_error"], raw
        assert raw["stackTrace"] == []
    elif "openai" in expect:
        assert_openai_answer(got, expect)
    else:
        assert got.status == expect["status"], f"{case.description}\n{raw}"
        if expect["status"] == 200:
            assert got.body["generated_text"], raw
            details = expect.get("details", {})
            assert {key: got.body["details"].get(key) for key in details} == details, got.body["details"]
        else:
            assert got.body["error"] == expect["error"], got.body
            assert got.body["request_id"], got.body
            for mention in expect.get("mentions", []):
                assert mention in got.body["message"], (mention, got.body["message"])
            assert len(got.body["message"]) < 2000  # input is named, not echoed back in bulk
    # AND nothing internal leaks into it
    assert_nothing_internal_leaks(json.dumps(raw))
    # AND the same runtime process (the warm model) is alive and answers a normal request
    assert server.alive() and runtime_pid(server) == server.runtime_pid
    assert_a_normal_request_still_works(server)


def test_no_catalogue_case_reached_the_catch_all_error_paths(server):
    # GIVEN the runtime's logs after the catalogue above (this test runs after it, on the same server)
    logs = server.logs()
    # THEN no case went through the generic 500 path or the last-resort "malformed event" catch-all:
    # every rejection was a deliberate, named one
    assert '"message":"unhandled error"' not in logs
    assert '"message":"malformed API Gateway event"' not in logs
    assert '"message":"request failed"' not in logs
