"""Our kernel library (engine/kernels): every ISA variant this CPU can run, against references computed the same
way in float64, and how it is loaded (which variant under the caps, one OpenMP runtime, the fallback).

The kernels define their numerics exactly (csrc/phi2k.h): activations quantized by a stated rule, exact integer
products, then fp32 scaling and accumulation. The reference applies the same rule with torch ops and sums in
float64, so the only difference allowed is fp32 rounding of partial sums: a relative bound of 1e-5 of the sum
of the products' magnitudes (measured: at most 3e-7), whatever the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from phi2.engine import cpu, kernels
from phi2.engine.formats import int4

LIBRARY = kernels.library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason=f"kernel library unavailable: {kernels.unavailable_reason()}")
RUNNABLE = list(LIBRARY.supported) if LIBRARY else []
# Every variant this CPU can run, whatever the caps choose by default.
variants = pytest.mark.parametrize("variant", RUNNABLE)
TOLERANCE = 1e-5
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def q8_reference(x, weight, scale, bias):
    """y and the sum of |products|, with x quantized per row to int16: round(x * (32767 / max|x|))."""
    amax = x.abs().amax(-1, keepdim=True)
    q = torch.round(x * (torch.tensor(32767.0) / amax))
    factor = (amax / 32767.0).double() * scale.float().double()
    y = (q.double() @ weight.double().T) * factor
    magnitude = (q.double().abs() @ weight.double().abs().T) * factor
    return y + (bias.double() if bias is not None else 0.0), magnitude


def q4_reference(x, packed, scales, mins, bias):
    """y and the sum of |products|, with x quantized per 64 columns to int8: round(x * (127 / max|x|))."""
    rows, columns = x.shape
    blocks = x.reshape(rows, columns // 64, 64)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * (torch.tensor(127.0) / amax))
    xq = (q.double() * (amax / 127.0).double()).reshape(rows, columns)
    w = int4.dequantize(packed, scales, mins).double()
    return xq @ w.T + (bias.double() if bias is not None else 0.0), xq.abs() @ w.abs().T


def random_q4(rows: int, columns: int, group: int, generator: torch.Generator):
    q = torch.randint(0, 16, (rows, columns), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(rows, columns // group, generator=generator) * 0.01).half()
    mins = (-torch.rand(rows, columns // group, generator=generator) * 0.08).half()
    return int4.pack(q), scales, mins


# (rows M, columns K, outputs N): decode, short prompts, a tail of outputs that is not a whole tile of 4,
# SmolLM2's odd number of 64-column units (576), Phi-2's shapes.
SHAPES = [(1, 64, 4), (3, 128, 7), (1, 576, 1536), (5, 2560, 2560), (17, 10240, 66), (2, 4096, 33)]


@variants
@pytest.mark.parametrize("shape", SHAPES)
def test_q8_linear_is_the_quantized_product_up_to_fp32_rounding(variant, shape):
    rows, columns, outputs = shape
    g = torch.Generator().manual_seed(rows * columns + outputs)
    # columns of very different ranges, as a transformer's activations have
    x = torch.randn(rows, columns, generator=g) * torch.rand(columns, generator=g) * 4
    weight = torch.randint(-127, 128, (outputs, columns), dtype=torch.int8, generator=g)
    scale = (torch.rand(outputs, generator=g) * 0.01).bfloat16()
    bias = torch.randn(outputs, generator=g)
    y = kernels.q8_linear(x, weight, scale, bias, variant=variant)
    expected, magnitude = q8_reference(x, weight, scale, bias)
    assert y.dtype == torch.float32 and y.shape == (rows, outputs)
    assert ((y.double() - expected).abs() <= TOLERANCE * magnitude + 1e-6).all()


@variants
@pytest.mark.parametrize(("shape", "group"), [(s, g) for s in SHAPES for g in int4.GROUPS if s[1] % g == 0])
def test_q4_linear_is_the_quantized_product_up_to_fp32_rounding(variant, shape, group):
    rows, columns, outputs = shape
    g = torch.Generator().manual_seed(rows * columns + outputs + group)
    x = torch.randn(rows, columns, generator=g) * torch.rand(columns, generator=g) * 4
    packed, scales, mins = random_q4(outputs, columns, group, g)
    bias = torch.randn(outputs, generator=g)
    y = kernels.q4_linear(x, packed, scales, mins, group, bias, variant=variant)
    expected, magnitude = q4_reference(x, packed, scales, mins, bias)
    assert ((y.double() - expected).abs() <= TOLERANCE * magnitude + 1e-6).all()


@variants
@pytest.mark.parametrize("group", int4.GROUPS)
def test_q4_widen_gives_the_dequantized_weight_in_fp32_and_bf16(variant, group):
    g = torch.Generator().manual_seed(group)
    packed, scales, mins = random_q4(37, 640, group, g)
    expected = int4.dequantize(packed, scales, mins)
    # rows 5..29 only: the out buffer holds a block of rows, as the prompt path widens them
    fp32 = kernels.q4_widen(packed, scales, mins, group, torch.empty(25, 640), 5, variant=variant)
    assert torch.allclose(fp32, expected[5:30], rtol=1e-6, atol=1e-7)
    bf16 = kernels.q4_widen(packed, scales, mins, group, torch.empty(25, 640, dtype=torch.bfloat16), 5, variant=variant)
    assert torch.equal(bf16, fp32.bfloat16())  # round to nearest even, as torch rounds


@variants
def test_a_row_gets_the_same_bits_whatever_the_threads(variant):
    # Each output row is computed by one thread with the same instructions: threads split rows, never a sum
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2560, generator=g)
    weight = torch.randint(-127, 128, (1030, 2560), dtype=torch.int8, generator=g)
    scale = torch.rand(1030, generator=g).bfloat16()
    packed, scales, mins = random_q4(1030, 2560, 128, g)
    for threads in (2, 3):
        assert torch.equal(
            kernels.q8_linear(x, weight, scale, variant=variant, threads=1),
            kernels.q8_linear(x, weight, scale, variant=variant, threads=threads),
        )
        assert torch.equal(
            kernels.q4_linear(x, packed, scales, mins, 128, variant=variant, threads=1),
            kernels.q4_linear(x, packed, scales, mins, 128, variant=variant, threads=threads),
        )


def test_all_zero_activations_give_the_bias():
    weight = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    bias = torch.arange(8.0)
    assert torch.equal(kernels.q8_linear(torch.zeros(2, 64), weight, torch.ones(8).bfloat16(), bias), bias.expand(2, 8))


def test_shapes_the_kernels_do_not_take_are_refused_not_computed():
    with pytest.raises(kernels.KernelError, match="shape"):
        kernels.q8_linear(torch.randn(1, 48), torch.zeros(4, 48, dtype=torch.int8), torch.ones(4).bfloat16())
    with pytest.raises(kernels.KernelError, match="shape"):
        packed, scales, mins = random_q4(4, 192, 64, torch.Generator().manual_seed(0))
        kernels.q4_linear(torch.randn(1, 192), packed, scales[:, :1], mins[:, :1], 128)


def test_the_library_shares_torchs_openmp_runtime_and_loads_no_other():
    # GIVEN the library loaded and a parallel call made
    weight = torch.randint(-127, 128, (4096, 1024), dtype=torch.int8)
    kernels.q8_linear(torch.randn(1, 1024), weight, torch.ones(4096).bfloat16(), threads=2)
    # THEN the only OpenMP runtime in the process is the one torch loaded
    maps = Path("/proc/self/maps").read_text()
    runtimes = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line or "libiomp" in line}
    assert runtimes == {LIBRARY.openmp_runtime}
    assert "torch" in LIBRARY.openmp_runtime


def loaded_in_a_fresh_process(**env: str) -> dict:
    """kernels.describe() in a new interpreter, with `env` (caps are read when torch loads)."""
    clean = {k: v for k, v in os.environ.items() if k not in (*cpu.CAPS, kernels.LIBRARY_VARIABLE)}
    code = "import json; from phi2.engine import kernels; print(json.dumps(kernels.describe()))"
    completed = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env, "PYTHONPATH": str(ROOT / "function")},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(completed.stdout)


def test_the_best_variant_runs_uncapped_and_the_avx2_one_when_every_library_is_capped_to_avx2():
    uncapped = loaded_in_a_fresh_process()
    best = RUNNABLE[-1] if cpu.hardware_isa() == "avx512" else "avx2"
    assert uncapped["loaded"] and uncapped["variant"] == best
    capped = loaded_in_a_fresh_process(**AVX2_CAPS)
    assert capped["variant"] == "avx2"


def test_without_the_library_the_formats_say_why_and_fall_back():
    off = loaded_in_a_fresh_process(PHI2_KERNELS="off")
    assert off == {"loaded": False, "reason": "disabled (PHI2_KERNELS=off)"}
    missing = loaded_in_a_fresh_process(PHI2_KERNELS=str(ROOT / "no-such-library.so"))
    assert not missing["loaded"] and "is not built" in missing["reason"]
