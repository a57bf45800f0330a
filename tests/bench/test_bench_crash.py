"""A bench worker that dies by a signal is reported as a crash naming it, never as a missing number.

The quality gate's worker died by SIGSEGV on an AVX-512 machine (issue 9) and the report only had an empty
`quality`. Here a real worker process is killed by a real signal as it starts (a sitecustomize on its
PYTHONPATH sends it), standing in for a crash in a native kernel.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("bench", ROOT / "infra" / "bench" / "bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench
spec.loader.exec_module(bench)


@pytest.fixture
def dying_env(tmp_path):
    """Environment for a worker that dies by SIGSEGV as soon as its interpreter starts."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    return {"PYTHONPATH": str(site)}


@pytest.fixture
def crashed_run(tmp_path, dying_env):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    return bench.run_worker("served", model_dir, dying_env, timeout=120, extra=[])


def test_a_worker_killed_by_a_signal_is_a_crash_naming_the_signal(crashed_run):
    assert crashed_run == {"error": "crashed: killed by SIGSEGV", "crashed": True, "signal": "SIGSEGV"}


def test_a_crashed_quality_gate_and_serving_variant_fail_their_targets_naming_the_crash(crashed_run, tmp_path):
    # GIVEN a report where the seed ran, the serving variant and the quality gate crashed
    seed_run = {m: 1.0 for m in bench.METRICS} | {"new_tokens": 64, "round": 1}
    variants = [bench.Variant("seed", "fp32", "seed"), bench.Variant("int8", "int8", "served")]
    runs = {"seed": [seed_run], "int8": [{**crashed_run, "round": 1}]}
    context = {"model": "tiny-phi", "serving_format": "int8"}
    dirs = {"fp32": tmp_path, "int8": tmp_path}
    # WHEN the report is built
    report = bench.build_report(context, variants, dirs, runs, dict(crashed_run), [], 1)
    # THEN every target that depended on them is not met and names the crash, none is "not measured"
    targets = report["targets"]
    assert targets["greedy_agreement"] == {
        "value": None,
        "target": ">= 0.95",
        "met": False,
        "crashed": "crashed: killed by SIGSEGV",
    }
    assert targets["decode_speedup_vs_seed"]["met"] is False
    assert "SIGSEGV" in targets["decode_speedup_vs_seed"]["crashed"]
    assert all(t["met"] is not None for t in targets.values() if t["value"] is None)
    # AND the table says so in words
    table = bench.markdown_table({**report, "rounds_done": 1})
    assert "Quality gate: crashed: killed by SIGSEGV" in table
    assert "| int8 | int8 | served | failed: crashed: killed by SIGSEGV |" in table
    assert "NOT met: crashed: killed by SIGSEGV" in table
