"""Compare the constrained-decoding libraries on this project's vocabularies (issue 19): llguidance, xgrammar and
outlines-core, each on Phi-2's tokenizer (50,295 tokens in 51,200 logits) and SmolLM2's (49,152).

Per library and vocabulary: the one-time vocabulary preparation, each schema's compile time, the mask time per
token while walking a valid answer token by token (median and 95th percentile, with `--threads` torch threads),
and JSON Schema coverage: for each feature, whether the schema compiles, a valid instance is accepted and an
invalid one refused. The answer is docs/constrained-decoding.md's table.

Only llguidance is a dependency of the function. To rerun the comparison, put the other two beside it in a
scratch folder (not the project's venv: xgrammar pulls in triton), e.g.

    .venv/bin/pip install --target /tmp/cmp --no-deps llguidance xgrammar outlines-core apache-tvm-ffi
    PYTHONPATH=/tmp/cmp .venv/bin/python infra/compare_constrained.py --json /tmp/cmp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"phi-2": ("tiny-phi-auto", 51200), "smollm2": ("smollm2-auto", 49152)}

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": ["string", "null"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"enum": ["FR", "DE", "GB", "US"]}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
PERSON_VALID = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": None,
    "tags": ["math", "poetry"],
    "address": {"city": "London", "country": "GB"},
}

# (feature, schema, a valid instance, an invalid instance)
FEATURES: list[tuple[str, dict, object, object]] = [
    ("object, required, additionalProperties: false", PERSON, PERSON_VALID, {**PERSON_VALID, "extra": 1}),
    ("enum / const", {"enum": ["red", "green", 3]}, "green", "blue"),
    ("string minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    ("string pattern", {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "AB-123", "ab-123"),
    ("format: date-time", {"type": "string", "format": "date-time"}, "2024-05-01T12:00:00Z", "yesterday"),
    ("format: email", {"type": "string", "format": "email"}, "a@b.co", "not an email"),
    ("format: uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    ("integer minimum/maximum", {"type": "integer", "minimum": 10, "maximum": 99}, 42, 100),
    ("exclusiveMinimum (number)", {"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7),
    ("array minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, [1], []),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    (
        "prefixItems (tuple)",
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        ["a", 1],
        [1, "a"],
    ),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}, "ab", "abc"),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    (
        "allOf",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]},
            ]
        },
        {"a": 1, "b": "x"},
        {"a": 1},
    ),
    (
        "$ref / $defs",
        {
            "$defs": {
                "p": {
                    "type": "object",
                    "properties": {"x": {"type": "integer"}},
                    "required": ["x"],
                    "additionalProperties": False,
                }
            },
            "type": "array",
            "items": {"$ref": "#/$defs/p"},
        },
        [{"x": 1}],
        [{"y": 1}],
    ),
    (
        "recursive $ref",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["v", "children"],
                    "additionalProperties": False,
                }
            },
            "$ref": "#/$defs/node",
        },
        {"v": 1, "children": [{"v": 2, "children": []}]},
        {"v": 1, "children": [{"v": "x", "children": []}]},
    ),
    (
        "additionalProperties: schema (a map)",
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"a": 1, "b": 2},
        {"a": "x"},
    ),
    (
        "minProperties/maxProperties",
        {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1, "maxProperties": 2},
        {"a": 1},
        {},
    ),
    (
        "propertyNames",
        {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}, "additionalProperties": {"type": "integer"}},
        {"ab": 1},
        {"A1": 1},
    ),
    (
        "if/then/else",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "if": {"properties": {"a": {"const": 1}}},
            "then": {"required": ["b"]},
        },
        {"a": 2},
        {"a": 1},
    ),
    ("not", {"not": {"type": "string"}}, 1, "x"),
]

# Schemas timed for compilation (besides the features above): pydantic-like, wide, a large enum.
WIDE = {
    "type": "object",
    "properties": {f"field_{i}": {"type": ["string", "integer", "null"]} for i in range(100)},
    "required": [f"field_{i}" for i in range(100)],
    "additionalProperties": False,
}
BIG_ENUM = {
    "type": "object",
    "properties": {"city": {"enum": [f"City number {i}" for i in range(1000)]}},
    "required": ["city"],
}
COMPILE_SCHEMAS = {"person (nested, pydantic-like)": PERSON, "100 properties": WIDE, "enum of 1,000 strings": BIG_ENUM}


@dataclass
class LibraryResult:
    name: str
    version: str
    vocab: dict[str, float] = field(default_factory=dict)  # model -> seconds to prepare the vocabulary
    compile_s: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> schema -> seconds
    mask_us: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> {median, p95, first}
    coverage: dict[str, str] = field(default_factory=dict)  # feature -> "yes" | "compiles, not enforced" | error
    error: str | None = None


def compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


class Candidate:
    """One library behind the same four calls."""

    name = ""

    def prepare(self, tokenizer, vocab_size: int) -> None: ...
    def compile(self, schema: dict) -> object: ...
    def matcher(self, compiled: object) -> object: ...
    def fill(self, matcher: object, mask) -> None: ...
    def consume(self, matcher: object, token: int) -> bool: ...
    def accepting(self, matcher: object) -> bool: ...


class LLGuidance(Candidate):
    name = "llguidance"

    def prepare(self, tokenizer, vocab_size):
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.version = metadata.version("llguidance")

    def compile(self, schema):
        options = {"whitespace_flexible": False}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, mask):
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)

    def consume(self, matcher, token):
        return matcher.consume_token(token)

    def accepting(self, matcher):
        return matcher.is_accepting()


class XGrammar(Candidate):
    name = "xgrammar"

    def prepare(self, tokenizer, vocab_size):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.version = metadata.version("xgrammar")

    def compile(self, schema):
        return self.compiler.compile_json_schema(compact(schema), any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, mask):
        matcher.fill_next_token_bitmask(mask)

    def consume(self, matcher, token):
        return matcher.accept_token(token)

    def accepting(self, matcher):
        return matcher.is_completed() if hasattr(matcher, "is_completed") else matcher.is_terminated()


class OutlinesCore(Candidate):
    name = "outlines-core"

    def prepare(self, tokenizer, vocab_size):
        import outlines_core
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = outlines_core
        decoder = {char: byte for byte, char in bytes_to_unicode().items()}
        eos = tokenizer.eos_token_id
        tokens: dict[bytes, list[int]] = {}
        specials = set(tokenizer.all_special_ids)
        for piece, token in tokenizer.get_vocab().items():
            if token == eos or token in specials:
                continue
            raw = bytes(decoder[c] for c in piece) if all(c in decoder for c in piece) else piece.encode()
            tokens.setdefault(raw, []).append(token)
        self.vocabulary = outlines_core.Vocabulary(eos, tokens)
        self.version = metadata.version("outlines_core")

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(compact(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, mask):
        matcher.write_mask_into(mask.data_ptr(), mask.numel(), 4)

    def consume(self, matcher, token):
        try:
            matcher.advance(token)
            return True
        except Exception:  # noqa: BLE001 - a refused token raises
            return False

    def accepting(self, matcher):
        return matcher.is_finished()


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    began = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - began


def walk(candidate: Candidate, compiled, token_ids: list[int], mask) -> tuple[list[float], bool]:
    """Mask then consume each token of a valid answer; the mask times and whether every token was allowed."""
    matcher = candidate.matcher(compiled)
    times, allowed = [], True
    for token in token_ids:
        _, seconds = timed(lambda: candidate.fill(matcher, mask))
        times.append(seconds)
        word, bit = divmod(token, 32)
        allowed &= bool((int(mask[0, word]) >> bit) & 1)
        if not candidate.consume(matcher, token):
            return times, False
    return times, allowed and candidate.accepting(matcher)


def feature_support(candidate: Candidate, tokenizer, schema, valid, invalid, mask) -> str:
    try:
        compiled = candidate.compile(schema)
    except Exception as exc:  # noqa: BLE001 - the library's refusal is the answer
        return "refused: " + str(exc).splitlines()[0][:80]
    _, ok = walk(candidate, compiled, tokenizer(compact_spaced(valid), add_special_tokens=False)["input_ids"], mask)
    if not ok:
        return "valid instance refused"
    _, bad_ok = walk(
        candidate, compiled, tokenizer(compact_spaced(invalid), add_special_tokens=False)["input_ids"], mask
    )
    return "compiles, not enforced" if bad_ok else "yes"


def compact_spaced(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def run(candidate: Candidate, threads: int) -> LibraryResult:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    result = LibraryResult(candidate.name, "?")
    for model, (directory, vocab_size) in MODELS.items():
        tokenizer = AutoTokenizer.from_pretrained(ROOT / ".cache" / "models" / directory)
        _, seconds = timed(lambda tokenizer=tokenizer, vocab_size=vocab_size: candidate.prepare(tokenizer, vocab_size))
        result.version = candidate.version
        result.vocab[model] = round(seconds, 3)
        mask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)
        result.compile_s[model] = {}
        for name, schema in COMPILE_SCHEMAS.items():
            try:
                _, seconds = timed(lambda schema=schema: candidate.compile(schema))
                result.compile_s[model][name] = round(seconds, 4)
            except Exception as exc:  # noqa: BLE001
                result.compile_s[model][name] = float("nan")
                result.error = f"{name}: {exc}"
        compiled = candidate.compile(PERSON)
        answer = tokenizer(compact_spaced(PERSON_VALID), add_special_tokens=False)["input_ids"]
        times = []
        for _ in range(20):  # 20 walks of the answer: ~600 masks
            step_times, ok = walk(candidate, compiled, answer, mask)
            assert ok, f"{candidate.name} refused a valid answer on {model}"
            times += step_times[1:]
        first, _ = walk(candidate, candidate.compile(PERSON), answer[:1], mask)
        times.sort()
        result.mask_us[model] = {
            "median": round(statistics.median(times) * 1e6, 1),
            "p95": round(times[int(len(times) * 0.95)] * 1e6, 1),
            "first": round(first[0] * 1e6, 1),
            "tokens": len(answer),
        }
        if model == "phi-2":
            for feature, schema, valid, invalid in FEATURES:
                result.coverage[feature] = feature_support(candidate, tokenizer, schema, valid, invalid, mask)
    return result


CANDIDATES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=sorted(CANDIDATES), action="append")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    for name in args.only or list(CANDIDATES):
        try:
            results.append(run(CANDIDATES[name](), args.threads))
        except ImportError as exc:
            results.append(LibraryResult(name, "not installed", error=str(exc)))
        print(json.dumps(results[-1].__dict__, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))


if __name__ == "__main__":
    sys.exit(main())
