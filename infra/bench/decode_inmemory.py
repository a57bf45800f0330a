#!/usr/bin/env python3
"""Decode speed of full-size Phi-2 built in memory: no files, no preparation, no calibration.

    decode_inmemory.py --threads 6 --variants fp32,int8,int8+avx2,int4-mixed --out DIR
    decode_inmemory.py --layers 4 --tokens 8                    Phi-2's widths, 4 layers: a minute
    decode_inmemory.py --tiny                                   the tiny Phi-2 (tests/bench): seconds

For a machine where `make bench` does not fit (preparing random-phi2 writes ~17 GB and takes minutes): each
variant runs in a fresh process (the ISA caps are read when torch loads) that builds the model on the meta
device and gives every tensor fresh memory filled from a random pool (distinct memory, so every decode step
streams every weight from DRAM as a served model does), then decodes greedily one token per pass with
transformers' DynamicCache, as the function does. Variants: fp32 (the seed's precision and transformers' own
layers), the quantized formats (engine/formats: their own modules, kernels and thresholds), and any of them
with every library capped to AVX2 (`+avx2`). Decode speed does not depend on the weights' values, so they are
not quantized from anything: the quality of a format is the quality gate's business (bench.py, quality.py).

Writes decode.json and decode.md to --out; the table also goes to stdout.
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
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "infra"))

from bench import AVX2_CAPS  # noqa: E402 - the benchmark's own caps

POOL_BYTES = 64 * 2**20


def _fill(torch, tensor, pools: dict) -> None:
    """Fill `tensor` from a random pool of its dtype: every page written (untouched pages would all map the zero
    page, which a kernel reads from cache), values in a harmless range (no denormals, no infinities)."""
    dtype = tensor.dtype
    if dtype not in pools:
        count = POOL_BYTES // tensor.element_size()
        if dtype == torch.int8:
            pools[dtype] = torch.randint(-127, 128, (count,), dtype=dtype)
        elif dtype == torch.uint8:
            pools[dtype] = torch.randint(0, 256, (count,), dtype=dtype)
        elif dtype in (torch.float16, torch.bfloat16):
            # scales and minimums of quantized layers: what Phi-2's init (normal, std 0.02) quantizes to, about;
            # larger ones blow the activations up to infinities and NaNs, which some kernels take slower
            pools[dtype] = (torch.rand(count) * 0.0003 + 0.0001).to(dtype)
        else:
            pools[dtype] = (torch.randn(count) * 0.02).to(dtype)
    flat, pool = tensor.view(-1), pools[dtype]
    for start in range(0, flat.numel(), pool.numel()):
        part = flat[start : start + pool.numel()]
        part.copy_(pool[: part.numel()])


def _model(torch, fmt: str, layers: int | None, tiny: bool = False):
    from prepare_model import PHI2_SIZES, TINY_SIZES
    from transformers import PhiConfig, PhiForCausalLM

    from phi2.engine.formats import common, int4, int8

    sizes = dict(TINY_SIZES if tiny else PHI2_SIZES)
    if layers:
        sizes["num_hidden_layers"] = layers
    config = PhiConfig(
        vocab_size=51200, max_position_embeddings=2048, partial_rotary_factor=0.4, tie_word_embeddings=False, **sizes
    )
    if fmt == "fp32":
        with torch.device("meta"):
            model = PhiForCausalLM(config)
    else:
        with torch.device("meta"):
            plain = PhiForCausalLM(config)
        if fmt == "int8":
            factories = {name: int8.Int8Linear.like for name in common.linear_names(plain)}
        else:

            def four(lin):
                return int4.Int4Linear(
                    lin.in_features, lin.out_features, lin.bias is not None, int4.group_of(lin.in_features)
                )

            factories = {
                name: int8.Int8Linear.like if precision == "int8" else four
                for name, precision in int4.plan(plain, fmt).items()
            }
        model = common.build_skeleton(config, factories)
    pools: dict = {}
    tensors = {}
    for name, meta in model.state_dict(keep_vars=True).items():
        if not meta.is_meta or name.endswith("inv_freq"):
            continue
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        _fill(torch, tensor, pools)
        tensors[name] = tensor
    return common.adopt(model, tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def worker(args: argparse.Namespace) -> dict:
    began = time.monotonic()
    sys.path.insert(0, str(ROOT / "function"))
    import torch

    torch.manual_seed(0)
    from transformers import DynamicCache

    from phi2.engine import cpu, formats

    torch.set_num_threads(args.threads)
    model, weight_bytes = _model(torch, args.format, args.layers, args.tiny)
    built_s = time.monotonic() - began
    ids = torch.randint(0, 50000, (1, args.prompt))
    steps = []
    with torch.inference_mode():
        try:
            cache = DynamicCache(config=model.config)
        except TypeError:  # transformers releases whose DynamicCache takes no config
            cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(args.warmup + args.tokens):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if step >= args.warmup:
                steps.append(time.perf_counter() - start)
        finite = bool(torch.isfinite(out.logits).all())
    median = statistics.median(steps)
    return {
        "format": args.format,
        "threads": torch.get_num_threads(),
        "layers": model.config.num_hidden_layers,
        "tokens": len(steps),
        "decode_tokens_per_s": len(steps) / sum(steps),
        "median_step_ms": median * 1e3,
        "weight_bytes": weight_bytes,
        # every weight is read once per step (the embedding but one row: a slight overstatement)
        "weights_gb_per_s": weight_bytes / median / 1e9,
        "build_s": built_s,
        "finite_logits": finite,
        "cpu": cpu.describe(),
        "kernels": formats.kernels_in_use(model) if args.format != "fp32" else None,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }


def table(results: dict) -> str:
    base = results.get("fp32", {}).get("decode_tokens_per_s")
    lines = [
        "| variant | threads | decode tok/s | x fp32 | ms/token | weights GB/s | kernel |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | | error: {r['error'][:80]} | | | | |")
            continue
        kernel = "fp32 F.linear"
        if r.get("kernels"):
            kinds = [v.get("up_to_threshold") for k, v in r["kernels"].items() if k.endswith("_linears")]
            kernel = "; ".join(str(k) for k in kinds if k)
        ratio = f"{r['decode_tokens_per_s'] / base:.2f}" if base else "-"
        lines.append(
            f"| {name} | {r['threads']} | {r['decode_tokens_per_s']:.2f} | {ratio} | {r['median_step_ms']:.1f} "
            f"| {r['weights_gb_per_s']:.1f} | {kernel} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="fp32,int8,int8+avx2,int4-mixed")
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--layers", type=int, help="Phi-2 has 32 (the default); fewer for a quick check")
    parser.add_argument("--tiny", action="store_true", help="the tiny Phi-2's sizes (tests: the code, not a speed)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--tokens", type=int, default=32, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per variant's process")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--format", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.format:
        print(json.dumps(worker(args)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    passed = ["--threads", str(args.threads), "--prompt", str(args.prompt)]
    passed += ["--tokens", str(args.tokens), "--warmup", str(args.warmup)]
    passed += (["--layers", str(args.layers)] if args.layers else []) + (["--tiny"] if args.tiny else [])
    for name in args.variants.split(","):
        fmt, _, cap = name.partition("+")
        env = {k: v for k, v in os.environ.items() if k not in AVX2_CAPS}
        env.update({"OMP_NUM_THREADS": str(args.threads), **(AVX2_CAPS if cap == "avx2" else {})})
        command = [sys.executable, __file__, "--format", fmt, *passed]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after {args.timeout:.0f} s"}
        else:
            if done.returncode == 0:
                results[name] = {**json.loads(done.stdout.strip().splitlines()[-1]), "env_caps": cap == "avx2"}
            else:
                results[name] = {"error": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}
        print(f"[decode_inmemory] {name}: {json.dumps(results[name])[:300]}", file=sys.stderr, flush=True)
        # after every variant: a run stopped early keeps what it measured
        (args.out / "decode.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "decode.md").write_text(table(results) + "\n")
    print(table(results))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
