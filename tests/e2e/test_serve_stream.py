"""infra/serve_stream.py, the README's way to watch a stream locally: a real HTTP client (as `curl -N`) sees the
events as they are produced, the openai SDK streams from it over real HTTP, and a client that disconnects
stops the generation. The runtime attached is the streaming runtime with a fake generator whose timing is
known (a 0.6 s prompt pass, then a token every 0.15 s)."""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import httpx2
import openai
import pytest
from conftest import ROOT
from rie import free_port

pytestmark = pytest.mark.e2e

TOKENS = [" Paris", " is", " the", " capital", "."]
PROMPT_PASS_S = 0.6
STEP_S = 0.15


@pytest.fixture(scope="module")
def server():
    port = free_port()
    fake = {"tokens": TOKENS, "prompt_pass_s": PROMPT_PASS_S, "step_s": STEP_S, "model_id": "microsoft/phi-2"}
    command = [sys.executable, "-m", "stream_fake_runtime"]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "infra" / "serve_stream.py"), "--port", str(port), "--command", *command],
        cwd=ROOT / "function",
        env={
            **os.environ,
            "FAKE_GENERATOR": json.dumps(fake),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "function"), str(ROOT / "tests")]),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert "streaming API on" in process.stdout.readline()
    yield port
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    assert process.returncode is not None and process.returncode >= 0, f"killed by signal {-process.returncode}"


def post(port: int, path: str, body: dict) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return connection.getresponse()


def test_a_plain_http_client_sees_each_event_when_it_is_produced(server):
    # WHEN a client posts to /v1/generate_stream and reads the answer line by line, as `curl -N` shows it
    started = time.monotonic()
    response = post(server, "/v1/generate_stream", {"prompt": "The capital of France is"})
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    arrivals = []
    while line := response.readline():
        if line.strip():
            arrivals.append((time.monotonic() - started, line.decode().strip()))
    # THEN the comment came before the prompt pass was over, and the tokens one step apart
    assert arrivals[0][1] == ": ok"
    token_times = [at for at, line in arrivals if '"token":{' in line]
    assert len(token_times) == len(TOKENS)
    assert token_times[0] - arrivals[0][0] >= PROMPT_PASS_S * 0.8
    gaps = [b - a for a, b in itertools.pairwise(token_times)]
    assert min(gaps) >= STEP_S * 0.5, gaps
    final = json.loads(arrivals[-1][1].removeprefix("data: "))
    assert final["generated_text"] == "The capital of France is" + "".join(TOKENS)


def test_the_openai_sdk_streams_over_real_http(server):
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server}/v1", api_key="unused", http_client=httpx2.Client(), max_retries=0
    )
    with client:
        stream = client.chat.completions.create(
            model="microsoft/phi-2", messages=[{"role": "user", "content": "Capital of France?"}], stream=True
        )
        content = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert content == "".join(TOKENS).lstrip()


def test_a_client_that_disconnects_stops_the_stream_and_the_next_request_is_served(server):
    response = post(server, "/v1/generate_stream", {"prompt": "The capital of France is"})
    assert response.readline().strip() == b": ok"
    response.close()  # the client goes away during the prompt pass
    started = time.monotonic()
    follow_up = post(server, "/v1/health", {})
    body = json.loads(follow_up.read())
    # THEN the next request was served after at most the rest of the abandoned generation, not a full one more
    assert follow_up.status == 405 or body  # /health is GET: the point is that an answer came
    assert time.monotonic() - started < PROMPT_PASS_S + len(TOKENS) * STEP_S + 5
