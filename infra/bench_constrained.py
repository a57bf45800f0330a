"""What constrained decoding costs a generation (issue 19): decode tokens/s with and without a JSON Schema, and
the grammar mask's time per token (llguidance's mask plus applying it), on a prepared model.

Rounds alternate free and constrained generations of the same prompt (greedy, `--tokens` new tokens), so that a
burst of other work on the machine hits both alike; the report is each side's median and their ratio. The free
side bans the end of text (logit bias) and the constrained side's schema cannot end early (an array of strings
of at least `--tokens` items), so both decode the same number of tokens.

    flock /tmp/work/fullsize.lock .venv/bin/python infra/bench_constrained.py .bench/models/random-phi2-int8
    .venv/bin/python infra/bench_constrained.py .cache/models/smollm2-auto --rounds 6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "function"))

PROMPT = "List the names of the planets of the solar system as a JSON array of strings."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from phi2.engine.constrained.grammar import Grammar
    from phi2.engine.generator import GenerationParams
    from phi2.engine.hf_generator import TransformersGenerator

    generator = TransformersGenerator.load(args.model_dir, num_threads=args.threads)
    # One token per pass on both sides: prompt lookup (several per pass) is off under a grammar, so it would
    # measure drafting, not the mask. The prompt cache is off too: every round reads its prompt.
    generator.lookup_tokens = 0
    generator.prefix_cache = None
    prompt = generator.apply_chat_template([{"role": "user", "content": PROMPT}]) or f"Instruct: {PROMPT}\nOutput:"
    schema = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": args.tokens}
    constrained = GenerationParams(
        max_new_tokens=args.tokens, do_sample=False, grammar=Grammar.json_schema(schema, "bench")
    )
    free = GenerationParams(
        max_new_tokens=args.tokens, do_sample=False, logit_bias=tuple((eos, -100.0) for eos in generator.eos_ids)
    )
    constraints = []
    build = generator.grammars.constraint

    def recording(grammar, rows):
        constraint = build(grammar, rows)
        constraints.append(constraint)
        return constraint

    generator.grammars.constraint = recording
    generator.generate([prompt], constrained, time.monotonic() + 3600)  # compiles, and builds llguidance's vocabulary
    constraints.clear()
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    mask_ms: list[float] = []
    for _ in range(args.rounds):
        for side, params in (("free", free), ("constrained", constrained)):
            result = generator.generate([prompt], params, time.monotonic() + 3600)
            assert result.completions[0].generated_tokens == args.tokens, result.completions[0]
            rates[side].append(result.tokens_per_second)
        mask_ms.append(constraints[-1].seconds / constraints[-1].row_masks * 1000)
    report = {
        "model": generator.info.model_id,
        "dtype": generator.info.dtype,
        "threads": args.threads,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "cpu": generator.info.cpu,
        "free_tok_s": round(statistics.median(rates["free"]), 3),
        "constrained_tok_s": round(statistics.median(rates["constrained"]), 3),
        "ratio": round(statistics.median(rates["constrained"]) / statistics.median(rates["free"]), 4),
        "mask_ms_per_token": round(statistics.median(mask_ms), 4),
        "per_round": {"free": rates["free"], "constrained": rates["constrained"], "mask_ms": mask_ms},
    }
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
