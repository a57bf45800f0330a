"""The CPU's ISA as the libraries use it: flags from /proc/cpuinfo, lowered by every library's cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from phi2.engine import cpu

AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def describe_in_a_fresh_process(**env: str) -> dict:
    """cpu.describe() in a new interpreter (the caps are read when torch and its libraries load)."""
    clean = {k: v for k, v in os.environ.items() if k not in (*cpu.CAPS, "DNNL_MAX_CPU_ISA")}
    code = "import json; from phi2.engine import cpu; print(json.dumps(cpu.describe()))"
    completed = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env, "PYTHONPATH": str(ROOT / "function")},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout)


def test_describe_reports_the_flags_the_cpu_has_and_is_json():
    described = json.loads(json.dumps(cpu.describe()))
    flags = cpu.cpu_flags()
    assert set(described["flags"]) == {f for f in cpu.FLAGS if f in flags}
    assert described["hardware_isa"] == cpu.hardware_isa()
    assert {"aten", "onednn", "mkl", "effective_isa", "usable", "caps"} <= set(described)


@pytest.mark.skipif("avx2" not in cpu.cpu_flags(), reason="needs an AVX2 CPU (every Lambda x86 host has one)")
def test_capping_every_library_to_avx2_makes_any_avx2_host_look_avx2_only():
    # GIVEN this host (AVX2 only here; AVX-512/AMX elsewhere) WHEN every library is capped to AVX2
    described = describe_in_a_fresh_process(**AVX2_CAPS)
    # THEN each library and the effective ISA say avx2, and nothing above it counts as usable
    assert described["aten"] == "avx2" and described["onednn"] == "avx2" and described["mkl"] == "avx2"
    assert described["effective_isa"] == "avx2"
    assert described["usable"]["avx512"] is False and described["usable"]["amx"] is False
    assert described["usable"]["avx512_vnni"] is False
    assert described["caps"] == AVX2_CAPS


@pytest.mark.skipif("avx2" not in cpu.cpu_flags(), reason="needs an AVX2 CPU")
def test_capping_aten_alone_lowers_the_effective_isa():
    described = describe_in_a_fresh_process(ATEN_CPU_CAPABILITY="default")
    assert described["aten"] == "default"
    assert described["effective_isa"] == "baseline"


def test_uncapped_the_effective_isa_is_never_above_what_the_cpu_has():
    described = describe_in_a_fresh_process()
    order = ["baseline", "avx2", "avx512"]
    assert order.index(described["effective_isa"]) <= order.index(described["hardware_isa"])
    assert described["onednn"] == described["mkl"] == described["hardware_isa"]


def test_onednn_caps_are_read_in_onednns_own_order(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert cpu.onednn_allows("AVX512_CORE") and cpu.onednn_allows("AVX2_VNNI")
    assert not cpu.onednn_allows("AVX512_CORE_AMX")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu.onednn_allows("AVX512_CORE") and cpu.onednn_isa() in ("baseline", "avx2")


def test_the_module_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; from phi2.engine import cpu; "
        "print(cpu.hardware_isa(), cpu.onednn_isa())"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT / "function")},
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
