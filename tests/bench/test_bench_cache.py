"""The prompt cache and prompt lookup benchmark (infra/bench/cache.py, a `make bench` worker) in quick mode on
the tiny Phi-2, so it cannot rot. No timing asserts: only what the numbers are made of."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

CACHE = ROOT / "infra" / "bench" / "cache.py"


@pytest.fixture(scope="module")
def result(tiny_phi_dir) -> dict:
    command = [sys.executable, str(CACHE), str(tiny_phi_dir), "--quick", "--rounds", "2", "--threads", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "next_turn_ttft_fraction" in done.stderr  # the markdown section bench.py appends to its table
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["next_turn", "next_turn_model_answer"])
def test_the_next_turn_is_timed_from_the_cache_and_without_it_on_the_same_prompt(result, key):
    turn = result[key]
    assert len(turn["runs"]) == 2
    for run in turn["runs"]:
        # the history (200 tokens) at least came from the cache; the question (16) was read
        assert run["answer_tokens"] >= 15
        assert 200 <= run["cached_tokens"] <= run["next_turn_prompt_tokens"] - 16
        assert run["same_first_token"] is True
    assert turn["ttft_fraction"] == pytest.approx(turn["ttft_cached_s"] / turn["ttft_uncached_s"])


@pytest.mark.slow
def test_an_answer_sent_back_as_text_is_reused_whole(result):
    for run in result["next_turn"]["runs"]:
        assert run["cached_tokens"] >= 200 + run["answer_tokens"] - 1


@pytest.mark.slow
def test_prompt_lookup_is_compared_with_plain_decoding_on_a_prompt_it_copies_from(result):
    copy = result["lookup_copy"]
    assert copy["identical_greedy_output"] is True
    assert copy["drafted_tokens"] > 0 and copy["lookup_tokens"] > 0
    assert len(copy["runs_on"]) == len(copy["runs_off"]) == 2
    assert copy["speedup"] == pytest.approx(copy["decode_tokens_per_s_on"] / copy["decode_tokens_per_s_off"])


@pytest.mark.slow
def test_the_cache_reports_its_memory_and_hit_rate_and_the_targets_are_judged(result):
    cache = result["cache"]
    assert cache["enabled"] and cache["entries"] >= 1 and 0 < cache["bytes"] <= cache["peak_bytes"]
    assert cache["bytes"] <= cache["budget_bytes_idle"]
    assert 0 < cache["hit_rate"] <= 1 and cache["kv_bytes_per_token"] > 0
    assert set(result["targets"]) == {
        "next_turn_ttft_fraction",
        "prompt_lookup_copy_speedup",
        "prompt_lookup_no_copy_ratio",
    }
    assert result["targets"]["prompt_lookup_no_copy_ratio"]["met"] is None  # needs SmolLM2: not in quick mode
