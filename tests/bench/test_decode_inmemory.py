"""infra/bench/decode_inmemory.py (decode speed of a Phi-2 built in memory, for a machine where `make bench` does not
fit) on the tiny Phi-2's sizes, so it cannot rot. No timing asserts: only what its numbers are made of."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

DECODE = ROOT / "infra" / "bench" / "decode_inmemory.py"
VARIANTS = ("fp32", "int8", "int4-mixed", "int8+avx2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """GIVEN every kind of variant WHEN the script builds each in its own process and decodes 4 tokens."""
    out = tmp_path_factory.mktemp("decode")
    command = [sys.executable, str(DECODE), "--tiny", "--threads", "2", "--tokens", "4", "--warmup", "1"]
    command += ["--variants", ",".join(VARIANTS), "--timeout", "300", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout, json.loads((out / "decode.json").read_text()), (out / "decode.md").read_text()


@pytest.mark.slow
def test_every_variant_decoded_with_the_formats_own_layers_and_finite_logits(run):
    _, results, _ = run
    assert list(results) == list(VARIANTS)
    for name, result in results.items():
        assert result["tokens"] == 4 and result["threads"] == 2, name
        assert result["decode_tokens_per_s"] > 0 and math.isfinite(result["decode_tokens_per_s"]), name
        assert result["finite_logits"] is True, name
        assert result["weight_bytes"] > 0 and result["weights_gb_per_s"] > 0, name
    assert results["fp32"]["kernels"] is None
    # THEN the quantized variants ran the format's own modules (our kernels where the library loaded)
    for name in ("int8", "int4-mixed", "int8+avx2"):
        kernels = results[name]["kernels"]
        assert "int8_linears" in kernels and kernels["quantized_operands_64_byte_aligned"] is True, name
    assert "int4_linears" in results["int4-mixed"]["kernels"]
    # AND the 4-bit weights are smaller than the 8-bit ones, which are smaller than fp32's
    assert results["int4-mixed"]["weight_bytes"] < results["int8"]["weight_bytes"] < results["fp32"]["weight_bytes"]


@pytest.mark.slow
def test_the_capped_variant_ran_with_every_library_capped_to_avx2(run):
    _, results, _ = run
    capped, native = results["int8+avx2"], results["int8"]
    assert capped["cpu"]["effective_isa"] == "avx2" and capped["cpu"]["aten"] == "avx2"
    library = capped["kernels"]["kernel_library"]
    if library["loaded"]:
        assert library["variant"] == "avx2"
    assert native["cpu"]["caps"] != capped["cpu"]["caps"]


@pytest.mark.slow
def test_the_table_names_every_variant_with_its_ratio_to_fp32(run):
    stdout, _, table = run
    assert stdout.strip() == table.strip()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert set(rows) == set(VARIANTS)
    assert rows["fp32"].split("|")[4].strip() == "1.00"
