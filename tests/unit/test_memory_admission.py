"""Memory admission: a request whose KV cache and working memory would not fit in what is left of the function's
memory is refused with a 4xx before anything is allocated, never left to Lambda's OOM kill.

The limit is Lambda's own variable, AWS_LAMBDA_FUNCTION_MEMORY_SIZE (MB), set small here: what the loaded tiny
Phi-2 already uses, plus a little. Nothing is mocked: the resident set is this process's, the requests are real.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import LambdaContext, load_event

from phi2 import errors
from phi2.engine import generator as generator_module
from phi2.engine import memory
from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.runtime import handler

LONG = "word " * 1900  # ~1,900 tokens: its pass's activations need tens of MiB on the tiny model


@pytest.fixture(scope="module")
def phi(tiny_phi_dir) -> TransformersGenerator:
    generator = TransformersGenerator.load(tiny_phi_dir, warmup=False)
    generator.prefix_cache = None  # nothing evictable: what is left is what is left
    return generator


@pytest.fixture
def tight(monkeypatch):
    """Set the function's memory to what this process uses now plus the reserve plus `spare_mib`."""

    def set_spare(spare_mib: int) -> int:
        used = memory.rss_bytes()
        limit_mib = (used + memory.ADMISSION_RESERVE_BYTES) // memory.MIB + spare_mib
        monkeypatch.setenv(memory.LAMBDA_MEMORY_VARIABLE, str(limit_mib))
        return limit_mib

    return set_spare


def test_a_request_that_would_not_fit_is_refused_with_what_it_needs_and_what_is_free(phi, tight):
    # GIVEN a function with 48 MiB to spare beyond what the loaded model uses (and the reserve)
    need = phi._request_bytes(1, phi.count_tokens(LONG) + 1, 16)
    assert need.total > 48 * memory.MIB
    limit_mib = tight(48)
    # WHEN a long prompt comes, whose pass needs more
    with pytest.raises(errors.MemoryLimitExceeded) as refused:
        phi.generate([LONG], GenerationParams(max_new_tokens=16, do_sample=False), time.monotonic() + 600)
    # THEN it is refused, as a 422 that says what it needs, what is free and of how much
    error = refused.value
    assert error.status_code == 422 and error.code == "insufficient_memory"
    details = error.details[0]
    assert details["memory_limit_bytes"] == limit_mib * memory.MIB
    assert details["needed_bytes"] > details["available_bytes"] >= 0
    assert "MemorySize" in error.message
    # AND nothing was computed for it
    assert phi.last_passes == [] or all(s.tokens < 1000 for s in phi.last_passes)


def test_a_request_that_fits_runs_and_the_model_still_serves_after_a_refusal(phi, tight):
    tight(48)
    with pytest.raises(errors.MemoryLimitExceeded):
        phi.generate([LONG], GenerationParams(max_new_tokens=16), time.monotonic() + 600)
    result = phi.generate(["Hello world"], GenerationParams(max_new_tokens=4, do_sample=False), time.monotonic() + 60)
    assert result.completions[0].generated_tokens == 4


def test_the_refusal_names_the_longest_generation_that_fits():
    # GIVEN a request whose KV cache grows by 1 MiB per new token, 100 MiB besides, with 300 MiB free
    need = memory.RequestBytes(
        kv_cache=(40 + 1000) * memory.MIB,
        activations=60 * memory.MIB,
        logits=0,
        new_tokens=1000,
        per_new_token=memory.MIB,
    )
    with pytest.MonkeyPatch.context() as patch:
        used = memory.rss_bytes()
        patch.setenv(memory.LAMBDA_MEMORY_VARIABLE, str((used + memory.ADMISSION_RESERVE_BYTES) // memory.MIB + 300))
        with pytest.raises(errors.MemoryLimitExceeded) as refused:
            memory.check_fits(need)
    # THEN the largest max_new_tokens that would fit is given: 300 - 40 - 60 = 200 (within the resident set's drift)
    assert 190 <= refused.value.largest_new_tokens <= 200
    assert "at most" in refused.value.message


def test_without_a_known_limit_nothing_is_refused(monkeypatch):
    monkeypatch.delenv(memory.LAMBDA_MEMORY_VARIABLE, raising=False)
    monkeypatch.setattr(memory, "CGROUP_LIMITS", ())
    huge = memory.RequestBytes(kv_cache=2**50, activations=0, logits=0, new_tokens=1, per_new_token=2**50)
    memory.check_fits(huge)


def test_through_the_handler_the_refusal_is_a_422_json_error(phi, tight, monkeypatch):
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: phi)
    tight(48)
    event = load_event("rest-generate-seed-prompt")
    event["body"] = json.dumps({"prompt": LONG, "max_new_tokens": 16})
    response = handler.lambda_handler(event, LambdaContext(remaining_ms=600_000))
    body = json.loads(response["body"])
    assert response["statusCode"] == 422, body
    assert body["error"] == "insufficient_memory" and body["details"][0]["largest_max_new_tokens"] >= 0
