"""`make bench QUICK=1`: the benchmark's own code on the tiny Phi-2, so it cannot rot. No timing asserts:
timings on a shared machine are noise; only the report's shape and its arithmetic are checked."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODEL_CACHE, ROOT

BENCH = ROOT / "infra" / "bench" / "bench.py"
TIMED = ("cold_start_s", "ttft_32_s", "ttft_512_s", "decode_tokens_per_s", "peak_rss_gib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """GIVEN the quick benchmark, models cached with the other test models WHEN it runs two rounds."""
    out = tmp_path_factory.mktemp("bench")
    # A generous per-process timeout: on a loaded 2-core CI machine the quality worker (three SmolLM2
    # models) took over the quick default of 300 s. This is a hang guard, not a timing assertion.
    command = [sys.executable, str(BENCH), "--quick", "--rounds", "2", "--timeout", "1500", "--formats", "int8,int4"]
    completed = subprocess.run(
        [*command, "--cache-dir", str(MODEL_CACHE / "bench"), "--out-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed.stdout, out


@pytest.fixture(scope="module")
def report(quick_run):
    stdout, _ = quick_run
    return json.loads(Path(stdout.strip().splitlines()[-1]).read_text())


@pytest.mark.slow
def test_the_report_path_is_the_last_line_of_stdout_and_lies_in_the_output_dir(quick_run):
    stdout, out = quick_run
    last = Path(stdout.strip().splitlines()[-1])
    assert last.name == "report.json" and last.is_file()
    assert out in last.parents


@pytest.mark.slow
def test_the_report_has_the_keys_the_issue_asks_for(report):
    for key in ("decode_speedup_vs_seed", "ttft_speedup_vs_seed", "cold_start_speedup_vs_seed"):
        assert key in report["ratios"]
    assert {"peak_rss_gib"} <= set(report["serving"]) and {"peak_rss_gib"} <= set(report["seed"])
    assert {"greedy_agreement", "perplexity_ratio"} <= set(report["quality"])


@pytest.mark.slow
def test_every_variant_ran_every_round_in_its_own_process_with_positive_numbers(report):
    assert report["mode"] == "quick" and report["model"] == "tiny-phi"
    assert {"seed", report["serving_format"], f"{report['serving_format']}+avx2"} <= set(report["variants"])
    for name, variant in report["variants"].items():
        assert [run.get("error") for run in variant["runs"]] == [None, None], name
        for run in variant["runs"]:
            assert all(run[m] > 0 and math.isfinite(run[m]) for m in TIMED), (name, run)
            # The prompts really are 32 and 512 tokens, and 64 tokens were decoded.
            assert run["prompt_tokens"] == {"32": 32, "512": 512}
            assert run["new_tokens"] == 64


@pytest.mark.slow
def test_the_avx2_variant_ran_with_every_library_capped_to_avx2_and_the_others_without(report):
    avx2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    for name, variant in report["variants"].items():
        isa = {run["onednn_max_cpu_isa"] for run in variant["runs"]}
        assert isa == ({"AVX2"} if name.endswith("+avx2") else {None})
        for run in variant["runs"]:
            assert run["isa_caps"] == (avx2 if name.endswith("+avx2") else dict.fromkeys(avx2))
            if name.endswith("+avx2"):
                # what the served code reads for any ISA-dependent choice: AVX2 on any host
                assert run["cpu"]["effective_isa"] == "avx2" and run["cpu"]["aten"] == "avx2"


@pytest.mark.slow
def test_served_runs_record_the_cpu_the_kernels_that_ran_and_how_fast_each_layer_shape_streamed(report):
    for name, variant in report["variants"].items():
        if variant["path"] != "served":
            continue
        for run in variant["runs"]:
            assert {"hardware_isa", "effective_isa", "flags", "usable", "bf16_gemm"} <= set(run["cpu"]), name
            kernels = run["kernels"]
            layers = kernels[f"{variant['format']}_linears"]
            if kernels["kernel_library"]["loaded"]:
                isa = kernels["kernel_library"]["variant"]
                assert layers["up_to_threshold"].startswith(f"phi2 q{variant['format'][3]} kernel ({isa})")
                assert isa == "avx2" or not name.endswith("+avx2")
            assert kernels["quantized_operands_64_byte_aligned"] is True
            # every shape of linear layer, with the bytes per second it streamed and the threads it ran on
            assert {(layer["n"], layer["k"]) for layer in run["layers"]} >= {(128, 64), (64, 64), (64, 128)}
            assert all(layer["gb_per_s"] > 0 and layer["threads"] == run["threads"] for layer in run["layers"])
            # the 512-token prompt as served, and one unchunked pass of it
            assert run["prompt_512_chunks"] >= 1 and run["unchunked_512_s"] > 0


@pytest.mark.slow
def test_every_variant_has_its_targets_and_the_bake_off_ran(report):
    targets = report["variant_targets"]
    for name, variant in report["variants"].items():
        if variant["path"] == "served":
            for target in ("decode x seed", "peak RSS GiB", "TTFT 512 x seed", "far-deadline 512 prompt x one pass"):
                assert f"{name}: {target}" in targets, (name, target)
    # (quick mode gates the serving format only)
    assert {"int8: greedy agreement", "int8: perplexity ratio"} <= set(targets)
    assert all(t["met"] in (True, False) for t in targets.values())
    bakeoff = report["kernel_bakeoff"]
    assert {"native", "avx2-capped"} <= set(bakeoff)
    kernels = {r["kernel"] for r in bakeoff["native"]["results"]}
    assert "fp32 F.linear (seed)" in kernels and any(k.startswith("phi2 q8") for k in kernels)


@pytest.mark.slow
def test_medians_are_the_medians_of_the_runs_and_ratios_are_computed_from_the_medians(report):
    for variant in report["variants"].values():
        for metric in TIMED:
            assert variant["median"][metric] == statistics.median(run[metric] for run in variant["runs"])
    seed, serving, ratios = report["seed"], report["serving"], report["ratios"]
    assert ratios["decode_speedup_vs_seed"] == pytest.approx(
        serving["decode_tokens_per_s"] / seed["decode_tokens_per_s"]
    )
    assert ratios["ttft_speedup_vs_seed"] == pytest.approx(seed["ttft_32_s"] / serving["ttft_32_s"])
    assert ratios["cold_start_speedup_vs_seed"] == pytest.approx(seed["cold_start_s"] / serving["cold_start_s"])
    assert report["ratios_by_variant"]["seed"]["decode_speedup_vs_seed"] == pytest.approx(1.0)


@pytest.mark.slow
def test_the_served_variants_load_the_format_their_manifest_names(report):
    for variant in report["variants"].values():
        if variant["path"] == "served":
            expected = variant["format"] if variant["format"] in ("int8", "int4", "int4-mixed") else "safetensors"
            assert {run["manifest_format"] for run in variant["runs"]} == {expected}


@pytest.mark.slow
def test_the_quality_gate_compares_the_serving_format_of_smollm2_with_its_fp32(report):
    quality = report["quality"]
    assert quality["format"] == report["serving_format"]
    # on both paths a format's layers take, the worse kept; the serving format is one that passes
    assert set(quality["numerics"]) == {"decode", "prompt"}
    assert quality["greedy_agreement"] == min(n["greedy_agreement"] for n in quality["numerics"].values())
    assert report["targets"]["greedy_agreement"]["met"] and report["targets"]["perplexity_ratio"]["met"]
    assert 0.0 <= quality["greedy_agreement"] <= 1.0
    assert quality["compared_tokens"] == 16 * 32  # every prompt, every teacher-forced position
    assert quality["perplexity"] > 0 and quality["reference_perplexity"] > 0
    assert quality["perplexity_ratio"] == pytest.approx(quality["perplexity"] / quality["reference_perplexity"])
    assert report["targets"]["greedy_agreement"]["value"] == quality["greedy_agreement"]


@pytest.mark.slow
def test_a_markdown_table_and_a_png_chart_are_written_next_to_the_report(quick_run, report):
    stdout, _ = quick_run
    assert "| variant |" in stdout and "| seed |" in stdout
    chart = Path(report["chart"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (chart.parent / "table.md").read_text().count("| variant |") == 1
