"""Incremental delivery with a real model (SmolLM2-135M): `python -m phi2.runtime.stream_runtime` against a local
stand-in of Lambda's Runtime API that timestamps every chunk (the real RIE returns a stream whole, so it
cannot show when the parts arrived). The first bytes arrive before the prompt pass ends, the first token
right after it, the others spread over the generation; a stand-in that stops accepting the stream stops the
generation. Bounds are relative to the speeds the run measures itself, and the model is slowed by construction
(tests/slowed_function.py: every prompt pass takes a second more, every step 50 ms more), so that "before
the prompt pass ended" and "within a few tokens" mean the same on a CPU four times faster or three times slower."""

from __future__ import annotations

import json
import time

import pytest
from conftest import load_event
from runtime_api import RuntimeApiStandIn, RuntimeProcess, split_prelude, sse_events

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# About 300 tokens, and a second more per prompt pass: long enough to tell "before it ended" from "after it".
LONG_PROMPT = "Here is a long list of facts about European capitals and rivers. " * 24 + "The capital of France is"


@pytest.fixture(scope="module")
def stand_in():
    server = RuntimeApiStandIn()
    yield server
    server.close()


@pytest.fixture(scope="module")
def runtime(stand_in, smollm2_dir):
    process = RuntimeProcess(
        stand_in,
        ["-m", "slowed_function"],
        MODEL_DIR=str(smollm2_dir),
        API_TIMEOUT_MS="300000",
        SLOW_PROMPT_PASS_S="1.0",
        SLOW_PASS_S="0.05",
    )
    # The init phase (model load, warm-up) happens before the first invocation is taken.
    stand_in.invoke(load_event("rest-health"), wait_s=600)
    yield process
    died = process.died_by()
    logs = process.logs()
    process.stop()
    assert died is None, f"the streaming runtime died by {died}:\n{logs[-4000:]}"


def stream_event(body: dict) -> dict:
    event = load_event("rest-generate-greedy")
    event["path"] = "/generate_stream"
    event["body"] = json.dumps(body)
    event["requestContext"]["requestTimeEpoch"] = int(time.time() * 1000)
    return event


def test_first_bytes_precede_the_prompt_pass_and_tokens_arrive_as_they_are_generated(stand_in, runtime):
    # GIVEN a long prompt and a greedy generation of 24 tokens
    request = {"prompt": LONG_PROMPT, "max_new_tokens": 24, "do_sample": False, "return_full_text": False}
    # WHEN it is streamed
    answer = stand_in.invoke(stream_event(request), timeout_s=900, wait_s=900)
    prelude, body = split_prelude(answer.data)
    assert prelude["statusCode"] == 200
    events = sse_events(body)
    final = json.loads(events[-1]["data"])
    timings = final["details"]["timings"]
    prompt_pass_s, ttft_s, total_s = (
        timings[k] / 1000 for k in ("prompt_pass_ms", "time_to_first_token_ms", "total_ms")
    )
    tokens = final["details"]["generated_tokens"]
    assert tokens >= 8 and prompt_pass_s > 0
    step_s = (total_s - ttft_s) / max(1, tokens - 1)
    # (the arrival time of each part, from the stand-in's clock)
    opened_at = next(chunk.at for chunk in answer.chunks if chunk.data == b": ok\n\n")
    token_times = [
        chunk.at for chunk in answer.chunks if chunk.data.startswith(b'data: {"index"') and b'"token":{' in chunk.data
    ]
    assert len(token_times) >= tokens - 1
    # THEN the opening bytes arrived while the prompt was still being read (most of its pass still to come)
    assert token_times[0] - opened_at >= 0.8 * prompt_pass_s, (token_times[0] - opened_at, prompt_pass_s)
    # AND the first token right after the prompt pass
    assert token_times[0] - opened_at <= ttft_s + 2 * step_s, (token_times[0] - opened_at, ttft_s, step_s)
    # AND the others spread over the decoding, not bunched at its end
    assert token_times[-1] - token_times[0] >= 0.5 * (total_s - ttft_s), (token_times, total_s, ttft_s)
    assert token_times == sorted(token_times)
    # AND the streamed tokens make up the final text
    text = "".join(json.loads(e["data"])["token"]["text"] for e in events[1:-1])
    assert text == final["generated_text"]


def test_a_runtime_api_that_stops_accepting_the_stream_stops_the_generation(stand_in, runtime):
    # GIVEN a long generation, and a Runtime API that stops taking the stream after the first token
    request = {"prompt": "Count from one to one thousand: one, two,", "max_new_tokens": 400, "do_sample": False}
    answer = stand_in.invoke(stream_event(request), wait_s=600, stop_after_chunks=3)
    assert not answer.complete
    # WHEN the runtime is given its next invocation
    follow_up = stand_in.invoke(load_event("rest-health"), wait_s=600)
    assert split_prelude(follow_up.data)[0]["statusCode"] == 200
    # THEN the abandoned generation had stopped within a few tokens (not run to its 400), and the runtime went on
    records = [r for r in runtime.records() if r.get("message") == "generated" and r["protocol"] == "native_stream"]
    assert records[-1]["finish_reasons"] == ["cancelled"], records[-1]
    assert records[-1]["generated_tokens"] <= 5
    assert runtime.alive()
