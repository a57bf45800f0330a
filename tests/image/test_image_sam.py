"""SAM CLI, in its own virtualenv: `sam build` of template.yaml (Docker's classic builder), `sam local
start-api --port 9001` with the seed's curl, and `sam local invoke -e events/...`."""

from __future__ import annotations

import json
import time

import pytest

from image.image_harness import http_request, is_loading, load_event, post, response_header

pytestmark = pytest.mark.image


def seed_request(url: str):
    """The seed's call: curl -X POST <url>/generate -H "Content-Type: application/json" -d '{"prompt": ...}'."""
    body = load_event("rest-generate-seed-prompt")["body"]
    return post(f"{url}/generate", body.encode(), headers={"Content-Type": "application/json"})


def wait_until_loaded(url: str, timeout: float = 600) -> float:
    """Ask GET /health until the model is loaded; the seconds it took (SAM's container starts on the first)."""
    started = time.monotonic()
    while True:
        health = http_request(f"{url}/health")
        if health.http_status == 200 and health.body.get("loaded") is True:
            return time.monotonic() - started
        # 503 "loading" is the only other answer a healthy start gives (503 "not_ready": the load failed)
        assert health.http_status == 503 and health.body.get("status") == "loading", health
        assert time.monotonic() - started < timeout, f"not loaded after {timeout:.0f} s: {health}"
        time.sleep(1)


def test_start_api_answers_the_seeds_request(start_api_url, report):
    # GIVEN the emulated API Gateway, its function started and its model loaded (the request's deadline counts
    # from its arrival, as API Gateway's does: on a busy machine a cold start could eat it)
    report["sam_start_api_cold_start_seconds"] = round(wait_until_loaded(start_api_url), 2)
    # WHEN the seed's request comes, twice
    first = seed_request(start_api_url)
    again = seed_request(start_api_url)
    report["sam_start_api_first_generate_seconds"] = round(first.seconds, 2)
    report["sam_start_api_second_generate_seconds"] = round(again.seconds, 2)
    # THEN both are answered with the prompt continued
    for answer in (first, again):
        assert answer.http_status == 200, answer
        assert answer.body["generated_text"].startswith("In international football"), answer


def test_sam_containers_sit_on_the_bridge_without_nat(start_api_url, sam_build, engine):
    # GIVEN the containers SAM CLI started for the API (after a request, so at least one exists)
    assert http_request(f"{start_api_url}/health").http_status in (200, 503)
    containers = [c for image in sam_build for c in engine.client.containers.list(filters={"ancestor": image})]
    assert containers, f"no running container of {sam_build}"
    # THEN each is on the engine's default bridge only, and that bridge masquerades nothing
    for container in containers:
        assert set(container.attrs["NetworkSettings"]["Networks"]) == {"bridge"}, container.name
    options = engine.client.networks.get("bridge").attrs["Options"]
    assert options.get("com.docker.network.bridge.enable_ip_masquerade") == "false", options


def test_sam_local_invoke_answers_the_seed_event(sam_local_invoke, report):
    # WHEN `sam local invoke -e events/rest-generate-seed-prompt.json` runs (a new container every time)
    answer = sam_local_invoke("rest-generate-seed-prompt")
    report["sam_local_invoke_seconds"] = round(answer.seconds, 2)
    if is_loading(answer):
        # THEN (on a machine too busy to load the model within the request's deadline) the function said so,
        # with a Retry-After: every attempt is another cold start, so that is the answer a user gets here
        report["sam_local_invoke"] = "503 model_loading: the cold start outlasted the request's deadline"
        assert response_header(answer, "Retry-After"), answer
        return
    # THEN the function answers it
    report["sam_local_invoke"] = "200"
    assert answer.status_code == 200, answer
    assert answer.body["generated_text"], json.dumps(answer.response)[:800]
