"""The CPU's instruction sets: what the CPU has, and what each library is allowed to use on it.

`/proc/cpuinfo` says what the CPU has. What runs is capped per library by the environment, and a CPU
with AVX-512 stands in for an AVX2-only one (Lambda promises AVX2 only) only when every library is capped:
- ATen, torch's own kernels (`_weight_int8pack_mm` among them): `ATEN_CPU_CAPABILITY` (default, avx2,
  avx512); torch reports what it chose in `torch.backends.cpu.get_cpu_capability()`;
- oneDNN (bf16 GEMMs): `ONEDNN_MAX_CPU_ISA` (AVX2, AVX2_VNNI, AVX512_CORE, AVX512_CORE_VNNI, AVX512_CORE_BF16,
  AVX512_CORE_AMX, ALL, ...);
- MKL (fp32 GEMMs): `MKL_ENABLE_INSTRUCTIONS` (AVX2, AVX512, AVX512_E1, ...).
So any ISA-dependent choice reads `effective_isa()` (or `aten_isa()` for an ATen kernel), never the flags
alone. torch is imported lazily, on the first question only ATen can answer.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

Level = Literal["baseline", "avx2", "avx512"]
_ORDER: tuple[Level, ...] = ("baseline", "avx2", "avx512")
CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# The flags an operator asks about (lscpu names): AVX2, AVX-512 (foundation, byte/word, VNNI, bf16),
# AVX-VNNI (the VEX-encoded VNNI of AVX2-class cores) and AMX.
FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
# oneDNN's ISA names, lowest to highest; a cap allows every ISA up to and including itself.
_ONEDNN_ORDER = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
    "ALL",
)


def _min(*levels: Level) -> Level:
    return min(levels, key=_ORDER.index)


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "unknown", frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:  # pragma: no cover - not Linux
        pass
    return model, flags


def cpu_flags() -> frozenset[str]:
    """Every flag /proc/cpuinfo lists for the first CPU (empty off Linux)."""
    return _cpuinfo()[1]


def hardware_isa(flags: frozenset[str] | None = None) -> Level:
    """The highest vector ISA level the CPU itself has, ignoring every cap."""
    flags = cpu_flags() if flags is None else flags
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "baseline"


def _cap_level(name: str, value: str | None) -> Level | None:
    """The level an environment cap allows, or None when it does not cap (unset or unknown)."""
    if not value:
        return None
    value = value.strip().upper()
    if name == "ONEDNN_MAX_CPU_ISA":
        if value not in _ONEDNN_ORDER:
            return None  # oneDNN ignores a value it does not know
        index = _ONEDNN_ORDER.index(value)
        return "avx512" if index >= _ONEDNN_ORDER.index("AVX512_CORE") else "avx2" if index >= 2 else "baseline"
    if name == "MKL_ENABLE_INSTRUCTIONS":
        return "avx512" if value.startswith("AVX512") else "avx2" if value.startswith("AVX2") else "baseline"
    return {"DEFAULT": "baseline", "AVX2": "avx2", "AVX512": "avx512"}.get(value)


def caps() -> dict[str, str | None]:
    """The environment caps as set (None: not set)."""
    return {name: os.environ.get(name) or None for name in CAPS}


def aten_isa() -> str:
    """The capability torch's own kernels dispatch to ("avx2", "avx512", "default", ...), as torch reports it.

    Honours ATEN_CPU_CAPABILITY, and is what decides which `_weight_int8pack_mm` runs. Note that torch trusts
    the variable: ATEN_CPU_CAPABILITY=avx512 on an AVX2-only CPU reports avx512 (and its kernels then fault).
    """
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


def _aten_level() -> Level:
    return {"avx2": "avx2", "avx512": "avx512"}.get(aten_isa(), "baseline")


def onednn_isa() -> Level:
    """The level oneDNN may use: the CPU's, lowered by ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA)."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    cap = _cap_level("ONEDNN_MAX_CPU_ISA", value)
    return _min(hardware_isa(), cap) if cap else hardware_isa()


def mkl_isa() -> Level:
    """The level MKL may use: the CPU's, lowered by MKL_ENABLE_INSTRUCTIONS."""
    cap = _cap_level("MKL_ENABLE_INSTRUCTIONS", os.environ.get("MKL_ENABLE_INSTRUCTIONS"))
    return _min(hardware_isa(), cap) if cap else hardware_isa()


def effective_isa() -> Level:
    """The lowest level any of ATen, oneDNN and MKL will use here: what an ISA-dependent choice must assume.

    With ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 an AVX-512 host
    answers "avx2", as an AVX2-only host does.
    """
    return _min(_min(_aten_level(), hardware_isa()), onednn_isa(), mkl_isa())


def onednn_allows(isa: str) -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (if set) allows oneDNN's ISA `isa` (e.g. "AVX512_CORE_AMX")."""
    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").strip().upper()
    if value not in _ONEDNN_ORDER:
        return True
    return _ONEDNN_ORDER.index(isa.upper()) <= _ONEDNN_ORDER.index(value)


def usable() -> dict[str, bool]:
    """The features that may actually run: present in the CPU and allowed by the caps of the library using them.

    AVX-512 and VNNI-512 count for every library (the lowest level of ATen, oneDNN and MKL); AVX-VNNI and AMX
    are used by oneDNN only, so its cap decides.
    """
    flags = cpu_flags()
    avx512 = effective_isa() == "avx512"
    return {
        "avx2": effective_isa() in ("avx2", "avx512"),
        "avx512": avx512,
        "avx512_vnni": avx512 and "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags and onednn_allows("AVX2_VNNI"),
        "amx": {"amx_tile", "amx_int8", "amx_bf16"} <= flags and onednn_allows("AVX512_CORE_AMX"),
    }


def bf16_gemm() -> bool:
    """Whether oneDNN runs a bf16 GEMM on native bf16 units here: AMX, or AVX512-BF16, present and allowed by
    ONEDNN_MAX_CPU_ISA (without them it emulates bf16 and is slower than fp32). The quantized formats' prompt
    pass uses a bf16 GEMM only then."""
    flags = cpu_flags()
    amx = {"amx_tile", "amx_bf16"} <= flags and onednn_allows("AVX512_CORE_AMX")
    avx512_bf16 = "avx512_bf16" in flags and onednn_isa() == "avx512" and onednn_allows("AVX512_CORE_BF16")
    return amx or avx512_bf16


def describe() -> dict[str, object]:
    """The CPU for /health and the init log line: model, flags present, caps set, what each library uses."""
    model, flags = _cpuinfo()
    return {
        "model": model,
        "vcpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "flags": sorted(flag for flag in FLAGS if flag in flags),
        "hardware_isa": hardware_isa(),
        "caps": caps(),
        "aten": aten_isa(),
        "onednn": onednn_isa(),
        "mkl": mkl_isa(),
        "effective_isa": effective_isa(),
        "usable": usable(),
        "bf16_gemm": bf16_gemm(),
    }
