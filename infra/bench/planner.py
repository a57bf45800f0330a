#!/usr/bin/env python3
"""What the planner admits on this machine, for prepared models: the table in docs/limits.md.

    planner.py .bench/models/smollm2-fp32 .bench/models/random-phi2-int8

Each model is loaded as the function loads it (warm-up check included); the planner is asked for the
largest prompt it admits with API Gateway's default budget (29 s less the 1.5 s margin) for each batch
size, then a 512-token prompt is estimated and read for real. Run it on a quiet machine: the planner
measures what it sees.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "function"))
BUDGET_S = 29.0 - 1.5
# The 512-token pass is timed with time to spare, so that it runs as one pass on any machine.
LONG_BUDGET_S = 600.0
BATCHES = (1, 2, 4, 8)


def row(model_dir: Path, chunk_seconds: float) -> str:
    from bench import prompt_of

    from phi2.engine.generator import GenerationParams
    from phi2.engine.hf_generator import TransformersGenerator

    generator = TransformersGenerator.load(model_dir, chunk_seconds=chunk_seconds)
    planner = generator.planner
    # Before any request: what the warm-up check alone tells the planner
    speeds = planner.describe()
    largest = " / ".join(f"{planner.largest_prompt(b, BUDGET_S):,}" for b in BATCHES)
    prompt = prompt_of(generator.tokenizer, 512)
    plan = planner.admit(1, generator.count_tokens(prompt), LONG_BUDGET_S)
    params = GenerationParams(max_new_tokens=1, do_sample=False)
    result = generator.generate([prompt], params, time.monotonic() + LONG_BUDGET_S)
    return (
        f"| {generator.info.model_id} ({generator.info.dtype}) | {speeds['prompt_tokens_per_second']} "
        f"| {plan.estimated_s:.1f} s / {result.prompt_pass_s:.1f} s ({result.prompt_chunks} chunk(s)) "
        f"| {largest} tokens |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="+", type=Path)
    parser.add_argument("--chunk-seconds", type=float, default=1.0, help="PROMPT_CHUNK_SECONDS (default 1)")
    args = parser.parse_args()
    print(
        "| model | prompt tokens/s (planner, 256-token pass) | a 512-token prompt, estimated / measured "
        f"| largest admitted prompt in {BUDGET_S} s, batch {' / '.join(map(str, BATCHES))} |"
    )
    print("|---|---|---|---|")
    for model_dir in args.model_dirs:
        print(row(model_dir, args.chunk_seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
