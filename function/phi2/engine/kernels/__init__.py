"""Our own kernels for weight-only quantized linear layers: a small C library, loaded with ctypes.

Why our own: decode reads every weight once per token, so its speed is the speed at which a kernel streams
weights from memory. torch's int8 and int4 kernels are compute-bound on two cores at half the memory's speed
or less, and so are onnxruntime's (the bake-off in docs/performance.md). The library does the one thing
they do not: few instructions per weight byte, with the activations quantized once per call (int16 per row
for int8 weights, int8 per 64-column block for 4-bit weights) so that every product is an exact integer
product (csrc/impl.c says how).

How it is built and found: `make kernels` (which `make test`, `make serve` and the image's build stage run)
compiles `csrc/` with the system C compiler into `libphi2kernels.so` beside this file. It is plain C with no
tie to torch's C++ ABI, so a library built once loads under any torch version. Where it is missing, cannot be
loaded, or the CPU has none of its ISAs, every layer falls back to torch's kernels (the formats say which);
`PHI2_KERNELS=off` forces that fallback, `PHI2_KERNELS=/path/to/lib.so` loads another build.

Which variant runs: the best one the CPU has *and* the caps allow (engine/cpu.py): with
ATEN_CPU_CAPABILITY=avx2 (or ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS capped to AVX2) it is the AVX2
one, as on an AVX2-only Lambda host; VNNI only where AVX-512 is allowed.

Threads: the library has no OpenMP runtime of its own. Before loading it, this module makes the runtime torch
already loaded (its bundled libgomp) global, so the library's parallel regions run on torch's own pool
with torch's thread count: one pool on the cores, not two spinning against each other (measured in
docs/performance.md). A torch without an OpenMP runtime gets the fallback.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phi2.engine import cpu

LIBRARY_NAME = "libphi2kernels.so"
LIBRARY_VARIABLE = "PHI2_KERNELS"
ABI_VERSION = 1
VARIANTS = ("avx2", "avx512", "avx512_vnni")
# Shapes the library takes: q8 needs K % 32 == 0, q4 K % group == 0 with groups of 64 or 128.
Q8_COLUMN_MULTIPLE = 32
Q4_GROUPS = (64, 128)
_ERRORS = {-1: "variant not supported by this CPU", -2: "unsupported shape", -3: "out of memory"}


class KernelError(RuntimeError):
    """The library refused a call (never expected: the formats check shapes before they call it)."""


@dataclass(frozen=True)
class Library:
    """The loaded library: where from, what this CPU can run, and what runs under the caps."""

    path: str
    handle: ctypes.CDLL = field(repr=False)
    supported: tuple[str, ...]
    variant: str | None
    openmp_runtime: str


def _openmp_runtime() -> str | None:
    """The path of the OpenMP runtime torch has loaded (libgomp, or an Intel/LLVM libomp), from our own maps."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
        name = Path(path).name
        if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name:
            return path
    return None


def _allowed_variant(supported: tuple[str, ...]) -> str | None:
    """The best variant the CPU runs that the caps allow."""
    level = cpu.effective_isa()
    if level == "avx512":
        wanted = ["avx512_vnni", "avx512", "avx2"] if cpu.usable()["avx512_vnni"] else ["avx512", "avx2"]
    elif level == "avx2":
        wanted = ["avx2"]
    else:
        wanted = []
    return next((v for v in wanted if v in supported), None)


def _bind(handle: ctypes.CDLL) -> None:
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    handle.phi2k_abi_version.restype = i
    handle.phi2k_supported.restype = ctypes.c_uint
    handle.phi2k_q8_linear.argtypes = [i, i, p, n, n, p, p, p, p, n]
    handle.phi2k_q8_linear.restype = i
    handle.phi2k_q4_linear.argtypes = [i, i, p, n, n, i, p, p, p, p, p, n]
    handle.phi2k_q4_linear.restype = i
    handle.phi2k_q4_widen.argtypes = [i, i, p, p, p, n, n, i, p, i, n, n]
    handle.phi2k_q4_widen.restype = i


_reason: str | None = None


@functools.cache
def library() -> Library | None:
    """The library, loaded once; None when it is disabled, missing, refused or of no use on this CPU
    (`unavailable_reason()` says which)."""
    global _reason
    setting = os.environ.get(LIBRARY_VARIABLE, "").strip()
    if setting.lower() in ("off", "0", "false", "no"):
        _reason = f"disabled ({LIBRARY_VARIABLE}={setting})"
        return None
    path = Path(setting) if setting else Path(__file__).with_name(LIBRARY_NAME)
    if not path.is_file():
        _reason = f"{path} is not built (make kernels)"
        return None
    runtime = _openmp_runtime()
    if runtime is None:
        _reason = "torch has no OpenMP runtime loaded for the library to share"
        return None
    try:
        # Already loaded by torch: RTLD_NOLOAD only makes its symbols global, so the library binds to it.
        ctypes.CDLL(runtime, mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
        handle = ctypes.CDLL(str(path))
        _bind(handle)
    except (OSError, AttributeError) as exc:
        _reason = f"{path.name} failed to load: {exc}"
        return None
    if handle.phi2k_abi_version() != ABI_VERSION:
        _reason = f"{path.name} has ABI {handle.phi2k_abi_version()}, this code needs {ABI_VERSION}: rebuild it"
        return None
    mask = handle.phi2k_supported()
    supported = tuple(v for bit, v in enumerate(VARIANTS) if mask & (1 << bit))
    variant = _allowed_variant(supported)
    if variant is None:
        _reason = f"no variant for this CPU under its caps (CPU runs {list(supported) or 'none'})"
        return None
    _reason = None
    return Library(str(path), handle, supported, variant, runtime)


def unavailable_reason() -> str | None:
    """Why `library()` is None (None when it is loaded)."""
    library()
    return _reason


def describe() -> dict[str, object]:
    """For /health and the init log line."""
    lib = library()
    if lib is None:
        return {"loaded": False, "reason": unavailable_reason()}
    return {
        "loaded": True,
        "variant": lib.variant,
        "cpu_runs": list(lib.supported),
        "openmp_runtime": Path(lib.openmp_runtime).name,
    }


def _variant_index(lib: Library, variant: str | None) -> int:
    name = variant or lib.variant
    if name not in lib.supported:
        raise KernelError(f"variant {name} cannot run on this CPU (it runs {list(lib.supported)})")
    return VARIANTS.index(name)


def _check(code: int) -> None:
    if code:
        raise KernelError(_ERRORS.get(code, f"error {code}"))


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def q8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    variant: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """`x @ (weight x scale).T + bias` for an int8 `weight` [N, K] with bf16 per-row `scale`, fp32 `x` and
    `bias`: x quantized per row to int16, exact integer products, fp32 out."""
    lib = library()
    if lib is None:
        raise KernelError(f"the kernel library is unavailable: {unavailable_reason()}")
    rows, (out_features, in_features) = x.numel() // x.shape[-1], weight.shape
    flat = x.reshape(rows, in_features).float().contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    _check(
        lib.handle.phi2k_q8_linear(
            _variant_index(lib, variant),
            threads or torch.get_num_threads(),
            flat.data_ptr(),
            rows,
            in_features,
            weight.data_ptr(),
            scale.data_ptr(),
            _ptr(bias),
            y.data_ptr(),
            out_features,
        )
    )
    return y.reshape(*x.shape[:-1], out_features)


def q4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    *,
    variant: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for a 4-bit `packed` weight [N, K / 2] (see formats/int4.py for the packing) with fp16
    `scales` and `mins` [N, K / group]: x quantized to int8 per 64 columns, exact integer products, fp32 out."""
    lib = library()
    if lib is None:
        raise KernelError(f"the kernel library is unavailable: {unavailable_reason()}")
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    rows = x.numel() // in_features
    flat = x.reshape(rows, in_features).float().contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    _check(
        lib.handle.phi2k_q4_linear(
            _variant_index(lib, variant),
            threads or torch.get_num_threads(),
            flat.data_ptr(),
            rows,
            in_features,
            group,
            packed.data_ptr(),
            scales.data_ptr(),
            mins.data_ptr(),
            _ptr(bias),
            y.data_ptr(),
            out_features,
        )
    )
    return y.reshape(*x.shape[:-1], out_features)


def q4_widen(
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group: int,
    out: torch.Tensor,
    first: int = 0,
    *,
    variant: str | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Rows `first`.. `first + out.shape[0]` of a 4-bit weight de-quantized into `out` (fp32 or bf16, rounded to
    nearest even), which is returned."""
    lib = library()
    if lib is None:
        raise KernelError(f"the kernel library is unavailable: {unavailable_reason()}")
    if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
        raise KernelError("out must be a contiguous fp32 or bf16 tensor")
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    _check(
        lib.handle.phi2k_q4_widen(
            _variant_index(lib, variant),
            threads or torch.get_num_threads(),
            packed.data_ptr(),
            scales.data_ptr(),
            mins.data_ptr(),
            out_features,
            in_features,
            group,
            out.data_ptr(),
            int(out.dtype == torch.bfloat16),
            first,
            first + out.shape[0],
        )
    )
    return out
