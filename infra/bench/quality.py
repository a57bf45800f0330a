#!/usr/bin/env python3
"""Every quantized format against the model's own weights: `make quality MODEL_ID=microsoft/phi-2`.

    quality.py microsoft/phi-2                   Phi-2 from the Hub at its pinned revision (needs Hub access)
    quality.py smollm2 --formats int8,int4       any model infra/prepare_model.py prepares

The reference is the checkpoint's own values computed in fp32 (Phi-2's fp16 weights widened exactly: no
rounding of its own); each format is prepared from the same checkpoint by infra/prepare_model.py (everything
cached in --cache-dir). The measure is the benchmark's quality gate (infra/bench/bench.py): teacher-forced greedy
agreement over infra/bench/prompts.json and the perplexity ratio on infra/bench/quality_text.txt, once per path a
format's layers take (the decode kernel over whole sequences, and the prompt path's GEMM), the worse of the two
kept. The gate a format passes: agreement >= 0.95, perplexity ratio <= 1.02.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402 - the benchmark's own preparation and quality gate

DEFAULT_FORMATS = bench.QUANTIZED


def prepare(model: str, fmt: str, cache: Path, revision: str | None) -> Path:
    out = cache / f"{model.replace('/', '--')}-{fmt}"
    args = ("--dtype", "float32") if fmt == "fp32" else bench.FORMATS[fmt].prepare_args
    command = [sys.executable, str(bench.PREPARE), model, *args, "--out", str(out), "--no-calibrate"]
    command += ["--revision", revision] if revision else []
    bench.log(f"preparing {model} as {fmt} in {out} (cached)")
    subprocess.run(command, check=True, cwd=bench.ROOT, stdout=2)
    return out


def table(result: dict) -> str:
    compared = next(iter(result["by_format"].values()))["compared_tokens"]
    lines = [
        f"{result['model']} vs its own weights in fp32 ({result['model_id']}): {compared} "
        f"teacher-forced tokens over {result['prompts']} prompts, perplexity over {result['text_tokens']} tokens",
        "",
        "| format | path | greedy agreement | perplexity ratio | perplexity (reference) | gate |",
        "|---|---|---|---|---|---|",
    ]
    for name, q in result["by_format"].items():
        for path, n in q["numerics"].items():
            lines.append(
                f"| {name} | {path} | {n['greedy_agreement']:.4f} | {n['perplexity_ratio']:.4f} "
                f"| {n['perplexity']:.3f} ({n['reference_perplexity']:.3f}) | |"
            )
        verdict = "passes" if q["passes"] else "fails"
        lines.append(
            f"| {name} | worse of both | {q['greedy_agreement']:.4f} | {q['perplexity_ratio']:.4f} | | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2", help="what infra/prepare_model.py prepares")
    parser.add_argument("--revision", help="hub commit (default: prepare_model.py's pinned one)")
    parser.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="comma-separated quantized formats")
    parser.add_argument("--cache-dir", type=Path, default=bench.ROOT / ".bench" / "models", help="prepared models")
    parser.add_argument("--out-dir", type=Path, default=bench.ROOT / ".bench" / "quality", help="reports go here")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per quality worker")
    args = parser.parse_args(argv)
    formats = args.formats.split(",")
    unknown = [f for f in formats if f not in bench.QUANTIZED]
    if unknown:
        parser.error(f"unknown formats {unknown}: choose from {', '.join(bench.QUANTIZED)}")
    reference = prepare(args.model, "fp32", args.cache_dir, args.revision)
    candidates = [f"{f}={prepare(args.model, f, args.cache_dir, args.revision)}" for f in formats]
    extra = [arg for c in candidates for arg in ("--candidate", c)]
    result = bench.quality_gate(reference, extra, args.timeout)
    if "error" in result:
        print(f"quality gate failed: {result['error']}")
        return 1
    agreement, ratio = bench.TARGETS["greedy_agreement"][1], bench.TARGETS["perplexity_ratio"][1]
    for q in result["by_format"].values():
        q["passes"] = q["greedy_agreement"] >= agreement and q["perplexity_ratio"] <= ratio
    result["model"] = args.model
    out = args.out_dir / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "quality.md").write_text(text + "\n")
    print(text)
    print(out / "quality.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
