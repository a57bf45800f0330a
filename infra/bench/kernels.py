#!/usr/bin/env python3
"""Kernel bake-off: one linear layer of Phi-2's shapes, weights streamed from DRAM, per kernel and thread count.

    kernels.py                                   decode (1 row), 1 and 2 threads, this CPU's ISA and AVX2-capped
    kernels.py --threads 1,2,6 --rows 1,16,64    more threads, short prompts
    kernels.py --quick                           tiny shapes, seconds (make test runs it)

Every kernel multiplies one activation row (or --rows rows) by distinct copies of the layer's weight, cycled, so
that the copies together are many times the L3 cache (a microbenchmark that reuses one weight reads it from L3
and overstates every kernel 2-3x). A row reports the median over sweeps of the mean time per call, and the
weight bytes (scales included) it streamed per second. Each ISA setting runs in a fresh process (the caps are
read when torch loads): the CPU's own, and every library capped to AVX2 (Lambda promises only AVX2).

Kernels: the seed's fp32 `F.linear`, a bf16 `F.linear`, torch's `_weight_int8pack_mm` (bf16 activations) and
`_weight_int4pack_mm_for_cpu` (groups of 128), torchao's CPU configurations and onnxruntime's `MatMulNBits`
(4- and 8-bit, blocks of 128, int8 activations: accuracy_level 4, spinning off) when those packages are
installed (infra/bench/requirements-bakeoff.txt), and ours (engine/kernels): q8 (int8 weights, int16
activations) and q4 (4-bit groups of 128, int8 activations).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
# Phi-2's linear layers: (outputs N, inputs K)
SHAPES = {"qkv/dense": (2560, 2560), "fc1": (10240, 2560), "fc2": (2560, 10240), "head": (51200, 2560)}
QUICK_SHAPES = {"small": (256, 512)}
# The copies of a weight cycled per measurement add up to at least this many bytes (the L3 is 32 MB here)
STREAM_BYTES = 320 * 2**20
GROUP = 128


# ---------------------------------------------------------------------------------------------------
# Worker: imports torch; one ISA setting.


def _kernels(torch, F):
    """name -> (make(N, K) -> weight object, call(x, obj) -> y, bytes(N, K)); None entries explain a gap."""
    sys.path.insert(0, str(ROOT / "function"))
    from phi2.engine import kernels as ours
    from phi2.engine.formats import int4

    found: dict[str, object] = {}

    def int8(n, k):
        return torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) * 0.01).bfloat16()

    def nibbles(n, k):
        return torch.randint(0, 16, (n, k), dtype=torch.uint8)

    found["fp32 F.linear (seed)"] = (
        lambda n, k: torch.randn(n, k),
        lambda x, w: F.linear(x, w),
        lambda n, k: 4 * n * k,
    )
    found["bf16 F.linear"] = (
        lambda n, k: torch.randn(n, k).bfloat16(),
        lambda x, w: F.linear(x.bfloat16(), w),
        lambda n, k: 2 * n * k,
    )
    found["torch _weight_int8pack_mm, bf16 act"] = (
        int8,
        lambda x, o: torch._weight_int8pack_mm(x.bfloat16(), o[0], o[1]),
        lambda n, k: n * k + 2 * n,
    )

    def int4pack(n, k):
        packed = torch._convert_weight_to_int4pack_for_cpu(nibbles(n, k).int(), 2)
        return packed, (torch.rand(k // GROUP, n, 2) * 0.01).bfloat16()

    found[f"torch _weight_int4pack_mm_for_cpu g{GROUP}, bf16 act"] = (
        int4pack,
        lambda x, o: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), o[0], GROUP, o[1]),
        lambda n, k: n * k // 2 + 4 * n * k // GROUP,
    )
    if ours.library() is not None:
        variant = ours.library().variant
        found[f"phi2 q8 ({variant}), int16 act"] = (
            int8,
            lambda x, o: ours.q8_linear(x, o[0], o[1]),
            lambda n, k: n * k + 2 * n,
        )

        def q4(n, k):
            return (
                int4.pack(nibbles(n, k)),
                (torch.rand(n, k // GROUP) * 0.01).half(),
                (torch.rand(n, k // GROUP) * -0.08).half(),
            )

        found[f"phi2 q4 g{GROUP} ({variant}), int8 act"] = (
            q4,
            lambda x, o: ours.q4_linear(x, o[0], o[1], o[2], GROUP),
            lambda n, k: n * k // 2 + 4 * n * k // GROUP,
        )
    else:
        found["phi2 q8/q4 (ours)"] = f"not available: {ours.unavailable_reason()}"
    found.update(_torchao(torch))
    found.update(_onnxruntime(torch))
    return found


def _torchao(torch):
    try:
        import torchao  # noqa: F401
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return {"torchao": f"not available: {type(exc).__name__}: {exc}"[:160]}
    out: dict[str, object] = {}
    configs = {
        "torchao Int8WeightOnly": lambda: Int8WeightOnlyConfig(),
        # torchao's CPU int4 layout wraps torch's _weight_int4pack_mm_for_cpu (measured above as torch's own) and
        # is gone from torchao 0.18, whose int4 formats are CUDA's: measured where it runs
        f"torchao Int4WeightOnly g{GROUP}": lambda: Int4WeightOnlyConfig(group_size=GROUP),
    }
    for name, config in configs.items():

        def make(n, k, config=config):
            layer = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
            quantize_(layer, config())
            return layer

        try:
            probe = make(256, 512)
            probe(torch.randn(1, 512).bfloat16())
        except Exception as exc:  # noqa: BLE001
            out[name] = f"not available: {type(exc).__name__}: {exc}"[:160]
            continue
        out[name] = (make, lambda x, layer: layer(x.bfloat16()), None)
    return out


def _onnxruntime(torch):
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except Exception as exc:  # noqa: BLE001
        return {"onnxruntime MatMulNBits": f"not available: {type(exc).__name__}: {exc}"[:160]}

    def make_session(n, k, bits, threads):
        blob = GROUP * bits // 8
        weight = torch.randint(0, 256, (n, k // GROUP, blob), dtype=torch.uint8).numpy()
        scales = (torch.rand(n * (k // GROUP)) * 0.01).numpy()
        node = helper.make_node(
            "MatMulNBits",
            ["A", "B", "scales"],
            ["Y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=GROUP,
            accuracy_level=4,
        )
        graph = helper.make_graph(
            [node],
            "layer",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])],
            [
                helper.make_tensor("B", TensorProto.UINT8, weight.shape, weight.tobytes(), raw=True),
                helper.make_tensor("scales", TensorProto.FLOAT, scales.shape, scales.tobytes(), raw=True),
            ],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        model.ir_version = 10  # what onnxruntime 1.2x-1.3x reads (newer onnx writes a newer one by default)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    out: dict[str, object] = {}
    for bits in (4, 8):
        name = f"onnxruntime MatMulNBits {bits}-bit g{GROUP}, int8 act"

        def make(n, k, bits=bits):
            return make_session(n, k, bits, torch.get_num_threads())

        def call(x, session):
            return session.run(None, {"A": x.numpy()})[0]

        try:
            call(torch.randn(1, 512), make(256, 512))
        except Exception as exc:  # noqa: BLE001
            out[name] = f"not available: {type(exc).__name__}: {exc}"[:160]
            continue
        out[name] = (make, call, lambda n, k, bits=bits: n * k * bits // 8 + 4 * n * k // GROUP)
    _ = onnx
    return out


def _weight_bytes(obj, torch) -> int:
    """Bytes of a kernel's weight object, where `bytes(N, K)` is not given (torchao's tensor subclasses)."""

    def size(tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__"):
            names, _ = tensor.__tensor_flatten__()
            return sum(size(getattr(tensor, name)) for name in names)
        return tensor.untyped_storage().nbytes()

    return sum(size(tensor) for tensor in obj.state_dict().values())


def worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes and not args.quick:
        shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    stream = 4 * 2**20 if args.quick else STREAM_BYTES
    results = []
    kernels = _kernels(torch, F)
    gaps = {name: entry for name, entry in kernels.items() if isinstance(entry, str)}
    # Each kernel's copies are made once per shape and measured at every thread count (making them is most of
    # the time), except onnxruntime's sessions, whose thread pool is fixed when they are made.
    for shape_name, (n, k) in shapes.items():
        for name, entry in kernels.items():
            if isinstance(entry, str):
                continue
            make, call, size = entry
            copies: list = []
            for threads in args.threads:
                torch.set_num_threads(threads)
                try:
                    if not copies or name.startswith("onnxruntime"):
                        copies = [make(n, k)]
                        nbytes = size(n, k) if size else _weight_bytes(copies[0], torch)
                        copies += [make(n, k) for _ in range(max(1, -(-stream // nbytes)) - 1)]
                    for rows in args.rows:
                        x = torch.randn(rows, k)
                        call(x, copies[0])
                        sweeps = []
                        for _ in range(args.sweeps):
                            began = time.perf_counter()
                            for obj in copies:
                                call(x, obj)
                            sweeps.append((time.perf_counter() - began) / len(copies))
                        seconds = statistics.median(sweeps)
                        results.append(
                            {
                                "kernel": name,
                                "shape": shape_name,
                                "n": n,
                                "k": k,
                                "rows": rows,
                                "threads": threads,
                                "ms": seconds * 1e3,
                                "gb_per_s": nbytes / seconds / 1e9,
                                "weight_bytes": nbytes,
                            }
                        )
                        print(f"[kernels] {results[-1]}", file=sys.stderr, flush=True)
                except Exception as exc:  # noqa: BLE001
                    gaps[name] = f"failed on {shape_name}: {type(exc).__name__}: {exc}"[:160]
                    break
            del copies
    sys.path.insert(0, str(ROOT / "function"))
    from phi2.engine import cpu

    return {"results": results, "gaps": gaps, "cpu": cpu.describe(), "torch": torch.__version__}


# ---------------------------------------------------------------------------------------------------
# Parent: one worker per ISA setting, then the table.


def run_setting(name: str, env: dict[str, str], args, argv: list[str]) -> dict:
    out = Path(args.out) / f"kernels-{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), *argv]
    completed = subprocess.run(command, env={**os.environ, **env}, cwd=ROOT, timeout=args.timeout)
    if completed.returncode != 0:
        return {"error": f"worker exited with {completed.returncode}"}
    return json.loads(out.read_text())


def table(settings: dict[str, dict]) -> str:
    lines = ["| ISA | kernel | layer | rows | threads | ms | GB/s |", "|---|---|---|---|---|---|---|"]
    for setting, data in settings.items():
        ordered = sorted(data.get("results", []), key=lambda r: (r["threads"], r["rows"], r["n"] * r["k"], r["shape"]))
        for r in ordered:
            lines.append(
                f"| {setting} | {r['kernel']} | {r['shape']} {r['n']}x{r['k']} | {r['rows']} | {r['threads']} "
                f"| {r['ms']:.3f} | {r['gb_per_s']:.1f} |"
            )
    for setting, data in settings.items():
        if "error" in data:
            lines.append(f"\n{setting}: {data['error']}")
        for name, why in data.get("gaps", {}).items():
            lines.append(f"\n{setting}: {name}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rows", default="1", help="comma-separated activation rows (1: decode)")
    parser.add_argument("--sweeps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds")
    parser.add_argument("--shapes", help=f"comma-separated layers (default all: {', '.join(SHAPES)})")
    parser.add_argument("--no-avx2", action="store_true", help="skip the AVX2-capped setting")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "kernels"), help="results go here")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in str(args.threads).split(",")]
    args.rows = [int(r) for r in str(args.rows).split(",")]
    if args.worker:
        Path(args.worker).write_text(json.dumps(worker(args), indent=1))
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    settings = {"native": {}}
    if not args.no_avx2:
        settings["avx2-capped"] = AVX2_CAPS
    results = {name: run_setting(name, env, args, argv) for name, env in settings.items()}
    text = table(results)
    (Path(args.out) / "table.md").write_text(text + "\n")
    (Path(args.out) / "kernels.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
