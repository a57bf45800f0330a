#!/usr/bin/env python3
"""How our kernel library should get its threads: measured on a decode step of Phi-2's shapes.

    threads.py                    the vCPUs this process may use (run it under `taskset -c 0,1` for 2 cores)
    threads.py --layers 8 --reps 9

A decode step of Phi-2's architecture: per block a layer norm, q/k/v, attention over a 64-token cache, the
dense projection, fc1, GELU, fc2 and the residual adds (torch's ops, on torch's thread pool), the six linears
int8 (distinct weights per block, so they stream from memory). The linears run in turn:
  shared         our library bound to the OpenMP runtime torch loaded: one pool for both (what the function does)
  own runtime    the same code linked to its own copy of libgomp (loaded into a new link-map namespace with
                 dlmopen): two pools of spinning workers on the same cores
  one thread     our library on the calling thread only
  torch int8     torch's _weight_int8pack_mm (bf16 activations), on torch's pool
The medians of interleaved repetitions, in ms per step. Needs a C compiler for the "own runtime" build.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "function"))
KERNELS = ROOT / "function" / "phi2" / "engine" / "kernels"
HIDDEN, INNER, HEADS, CONTEXT = 2560, 10240, 32, 64


def own_runtime_library(tmp: Path) -> ctypes.CFUNCTYPE:
    """phi2k_q8_linear from a build linked to libgomp itself, loaded with its own libgomp in a new namespace."""
    build = (
        (KERNELS / "build.sh")
        .read_text()
        .replace('$CC -shared -o "$TMP/lib.so"', '$CC -shared -fopenmp -o "$TMP/lib.so"')
    )
    script = tmp / "build-own.sh"
    script.write_text(build.replace('SRC="$(cd "$(dirname "$0")/csrc" && pwd)"', f'SRC="{KERNELS / "csrc"}"'))
    library = tmp / "libphi2kernels-own.so"
    subprocess.run(["sh", str(script), str(library)], check=True)
    libc = ctypes.CDLL(None)
    libc.dlmopen.restype = ctypes.c_void_p
    libc.dlmopen.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_int]
    libc.dlsym.restype = ctypes.c_void_p
    libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    handle = libc.dlmopen(-1, str(library).encode(), os.RTLD_NOW)  # LM_ID_NEWLM: its own libgomp
    if not handle:
        raise SystemExit("dlmopen failed")
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    prototype = ctypes.CFUNCTYPE(i, i, i, p, n, n, p, p, p, p, n)
    return prototype(libc.dlsym(handle, b"phi2k_q8_linear"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (distinct weights)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from phi2.engine import kernels

    torch.set_num_threads(args.threads)
    lib = kernels.library()
    if lib is None:
        raise SystemExit(f"kernel library unavailable: {kernels.unavailable_reason()}")
    variant = kernels.VARIANTS.index(lib.variant)
    shapes = [(HIDDEN, HIDDEN)] * 4 + [(INNER, HIDDEN), (HIDDEN, INNER)]  # q, k, v, dense, fc1, fc2
    blocks = [
        [
            (torch.randint(-127, 128, s, dtype=torch.int8), (torch.rand(s[0]) * 0.01).bfloat16(), torch.randn(s[0]))
            for s in shapes
        ]
        for _ in range(args.layers)
    ]
    cache = [(torch.randn(1, HEADS, CONTEXT, HIDDEN // HEADS), torch.randn(1, HEADS, CONTEXT, HIDDEN // HEADS))] * 2
    with tempfile.TemporaryDirectory() as tmp:
        own = own_runtime_library(Path(tmp))

        def own_linear(x, w, s, b):
            y = torch.empty(1, w.shape[0])
            code = own(
                variant,
                args.threads,
                x.data_ptr(),
                1,
                w.shape[1],
                w.data_ptr(),
                s.data_ptr(),
                b.data_ptr(),
                y.data_ptr(),
                w.shape[0],
            )
            assert code == 0
            return y

        linears = {
            "shared": lambda x, w, s, b: kernels.q8_linear(x, w, s, b),
            "own runtime": own_linear,
            "one thread": lambda x, w, s, b: kernels.q8_linear(x, w, s, b, threads=1),
            "torch int8": lambda x, w, s, b: torch._weight_int8pack_mm(x.bfloat16(), w, s).float() + b,
        }

        def step(linear) -> None:
            x = torch.randn(1, HIDDEN)
            for q, k, v, dense, fc1, fc2 in blocks:
                h = F.layer_norm(x, (HIDDEN,))
                qh = linear(h, *q).view(1, HEADS, 1, -1)
                linear(h, *k)
                linear(h, *v)
                keys, values = cache[0]
                attn = F.scaled_dot_product_attention(qh, keys, values).reshape(1, HIDDEN)
                x = x + linear(attn, *dense) + linear(F.gelu(linear(h, *fc1)), *fc2)

        times = {name: [] for name in linears}
        with torch.inference_mode():
            for linear in linears.values():
                step(linear)
            for _ in range(args.reps):
                for name, linear in linears.items():
                    began = time.perf_counter()
                    step(linear)
                    times[name].append((time.perf_counter() - began) * 1e3)
    print(f"{args.layers} blocks of Phi-2's decode step, {args.threads} threads, {lib.variant}; ms per step (median):")
    for name, values in times.items():
        print(f"  {name:12s} {statistics.median(values):8.2f}   (min {min(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
