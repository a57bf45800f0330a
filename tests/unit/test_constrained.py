"""Constrained decoding in the engine, on real models and the real library (llguidance): the mask on Phi-2's
vocabulary (padding ids never allowed, the end of text only where the grammar accepts), every row of a batch held
to the grammar with its own seed, finished rows skipped, greedy output unchanged under a grammar that permits any
text, cut-short outputs flagged incomplete, stop strings, streaming and logprobs alongside, and every kind of bad
grammar refused with InvalidGrammar naming its field (tiny Phi-2 with Phi-2's tokenizer, and SmolLM2-135M)."""

from __future__ import annotations

import dataclasses
import json
import time

import jsonschema
import pytest
import torch

from phi2.engine.constrained import grammar as grammar_module
from phi2.engine.constrained.grammar import ANY_TEXT, Grammar
from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.engine.sampling import apply_token_bitmask
from phi2.errors import InvalidGrammar

PHI2_TOKENIZER = 50295
"""Phi-2's tokenizer has 50,295 tokens; its model has 51,200 logits: the rest are padding ids."""

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def later(seconds: float = 3600.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture(scope="module")
def phi(tiny_phi_dir) -> TransformersGenerator:
    return TransformersGenerator.load(tiny_phi_dir, warmup=False)


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> TransformersGenerator:
    return TransformersGenerator.load(smollm2_dir, warmup=False)


def allowed(constraint, vocab: int) -> torch.Tensor:
    """The ids the constraint's mask allows for row 0 at this step."""
    scores = constraint(None, torch.zeros(len(constraint.matchers), vocab))
    return torch.isfinite(scores[0]).nonzero().flatten()


def test_the_mask_on_phi2s_vocabulary_never_allows_a_padding_id(phi):
    # GIVEN Phi-2's vocabulary (50,295 tokens in 51,200 logits) and a grammar that permits any text
    assert phi.vocab_size == 51200 and len(phi.tokenizer) == PHI2_TOKENIZER
    constraint = phi.grammars.constraint(Grammar.lark(ANY_TEXT, "grammar"), rows=1)
    # WHEN its first mask is computed
    ids = allowed(constraint, phi.vocab_size)
    # THEN nearly every token is allowed, the end of text too (the empty text is a sentence of it), but not
    # one id past the tokenizer
    assert len(ids) > 50_000 and phi.eos_ids[0] in ids.tolist()
    assert int(ids.max()) < PHI2_TOKENIZER


def test_the_end_of_text_is_allowed_only_where_the_grammar_accepts(phi):
    # GIVEN a schema whose answer is an object
    constraint = phi.grammars.constraint(Grammar.json_schema(PERSON, "json_schema"), rows=1)
    eos = phi.eos_ids[0]
    # THEN the first token must open it, and the end of text is not allowed yet
    first = allowed(constraint, phi.vocab_size).tolist()
    assert eos not in first
    assert all(phi.tokenizer.decode([t]).startswith("{") for t in first), first[:10]
    # WHEN a whole valid answer is consumed
    answer = '{"name": "Ada", "age": 36, "pets": ["cat"]}'
    *head, last = phi.tokenizer(answer, add_special_tokens=False)["input_ids"]
    for token in head:
        assert token in allowed(constraint, phi.vocab_size).tolist()
        assert not constraint.advance(0, token)
    # THEN the closing brace completes the grammar: nothing can follow it (the row ends there), and it accepts
    assert constraint.advance(0, last) and constraint.complete(0)


def test_the_numpy_and_torch_bitmask_paths_agree():
    # GIVEN random logits and a random mask (bit b of word w is token 32w + b), 51,200 logits in 1,600 words
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 51200, generator=generator)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 1600), dtype=torch.int32, generator=generator)
    # WHEN applied by the numpy path (float32) and the torch path (other dtypes)
    fast = apply_token_bitmask(scores, bitmask)
    slow = apply_token_bitmask(scores.double(), bitmask).float()
    # THEN they agree, and each allowed logit is kept exactly where its bit is set
    assert torch.equal(fast, slow)
    word, bit = divmod(12345, 32)
    assert torch.isfinite(fast[1, 12345]) == bool((int(bitmask[1, word]) >> bit) & 1)


def test_every_row_of_a_batch_follows_the_schema_with_its_own_seed_and_finished_rows_are_skipped(phi):
    # GIVEN a schema and four sampled rows with their own seeds
    params = GenerationParams(
        max_new_tokens=80,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        return_full_text=False,
        grammar=Grammar.json_schema(PERSON, "json_schema"),
    )
    seeds = [1, 2, 3, 4]
    # WHEN they are generated as one batch
    result = phi.generate(["Person:"] * 4, params, later(), seeds=seeds)
    # THEN every row is valid JSON for the schema, complete, ended by the grammar
    for completion in result.completions:
        jsonschema.validate(json.loads(completion.text), PERSON)
        assert completion.grammar_complete is True and completion.finish_reason == "eos_token"
    # AND the rows ended at different steps: a finished row's matcher was not fed the padding that follows it
    assert len({c.generated_tokens for c in result.completions}) > 1
    # AND a row samples the same text alone as in the batch
    alone = phi.generate(["Person:"], params, later(), seeds=[3]).completions[0]
    assert alone.token_ids == result.completions[2].token_ids


def test_greedy_under_a_grammar_that_permits_any_text_is_the_unconstrained_greedy_text(smol):
    # GIVEN SmolLM2 (a real model: it never chooses a token the grammar lacks) and a chat prompt
    prompt = smol.apply_chat_template([{"role": "user", "content": "Name three rivers of Europe."}])
    free = GenerationParams(max_new_tokens=40, do_sample=False, return_full_text=False)
    constrained = dataclasses.replace(free, grammar=Grammar.lark(ANY_TEXT, "grammar"))
    # WHEN it decodes greedily with and without the grammar
    a = smol.generate([prompt], free, later()).completions[0]
    b = smol.generate([prompt], constrained, later()).completions[0]
    # THEN the tokens are the same
    assert a.token_ids == b.token_ids and a.text == b.text and len(a.token_ids) > 5
    assert b.grammar_complete is True


def test_on_phi2s_vocabulary_any_text_matches_greedy_until_the_random_model_picks_a_padding_id(phi):
    # GIVEN the tiny random Phi-2, whose greedy choice may be a padding id (a real Phi-2 never picks one)
    free = GenerationParams(max_new_tokens=40, do_sample=False, return_full_text=False)
    constrained = dataclasses.replace(free, grammar=Grammar.lark(ANY_TEXT, "grammar"))
    a = phi.generate(["The capital of France is"], free, later()).completions[0].token_ids
    b = phi.generate(["The capital of France is"], constrained, later()).completions[0].token_ids
    # THEN the constrained tokens equal the free ones up to the first padding id, which the mask forbids
    cut = next((i for i, token in enumerate(a) if token >= PHI2_TOKENIZER), len(a))
    assert a[:cut] == b[:cut]
    assert all(token < PHI2_TOKENIZER for token in b)


def test_a_constrained_output_cut_by_max_new_tokens_ends_with_length_and_says_it_is_incomplete(phi):
    params = GenerationParams(
        max_new_tokens=4, do_sample=False, return_full_text=False, grammar=Grammar.json_schema(PERSON, "json_schema")
    )
    completion = phi.generate(["Person:"], params, later()).completions[0]
    assert completion.finish_reason == "length" and completion.generated_tokens == 4
    assert completion.grammar_complete is False and completion.text.startswith('{"')


def test_the_deadline_cuts_a_constrained_output_with_time_limit_and_the_partial_text(phi):
    # GIVEN a schema whose shortest answer is thousands of tokens, two seconds, and a model whose every pass
    # takes at least 10 ms by construction: 1,000 tokens need 10 s or more on any CPU (unslowed, a fast CPU
    # generated all of them inside the two seconds)
    long = Grammar.json_schema({"type": "string", "minLength": 20000}, "json_schema")
    params = GenerationParams(max_new_tokens=1000, do_sample=False, return_full_text=False, grammar=long)
    slowed = phi.model.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    # WHEN generated
    try:
        completion = phi.generate(["Text:"], params, later(2.0)).completions[0]
    finally:
        slowed.remove()
    # THEN the deadline ends it, with what was generated, flagged incomplete
    assert completion.finish_reason == "time_limit"
    assert completion.grammar_complete is False and completion.text.startswith('"') and completion.generated_tokens


def test_stop_strings_streaming_and_raw_logprobs_work_under_a_grammar(phi):
    # GIVEN a grammar with a single sentence, a stop string inside it, streaming and logprobs with alternatives
    grammar = Grammar.choice(["alpha beta gamma"], "choice")
    params = GenerationParams(
        max_new_tokens=20, do_sample=False, return_full_text=False, stop=(" beta",), logprobs=3, grammar=grammar
    )
    streamed: list[str] = []

    def on_step(events):
        streamed.extend(event.text for event in events)
        return True

    completion = phi.generate(["Say it:"], params, later(), on_step=on_step).completions[0]
    # THEN the stop string ends it before the grammar does: the output is incomplete
    assert completion.text == "alpha" and completion.finish_reason == "stop_sequence"
    assert completion.grammar_complete is False
    # AND the stream carried exactly that text
    assert "".join(streamed) == "alpha"
    # AND the logprobs are the model's own distribution: its top alternatives are mostly tokens the grammar
    # forbade (a random model's favourites), and the chosen token is not its most likely one
    first = completion.logprobs[0]
    assert first.token_id != first.top[0][0] and first.logprob < first.top[0][1]


def test_min_p_and_typical_p_sample_reproducibly(phi):
    base = GenerationParams(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    plain = phi.generate(["Once"], base, later(), seeds=[5]).completions[0].token_ids
    for change in ({"min_p": 0.5}, {"typical_p": 0.2}):
        params = dataclasses.replace(base, **change)
        first = phi.generate(["Once"], params, later(), seeds=[5]).completions[0].token_ids
        again = phi.generate(["Once"], params, later(), seeds=[5]).completions[0].token_ids
        assert first == again and first != plain, change


@pytest.mark.parametrize(
    ("grammar", "code", "mentions"),
    [
        (lambda: Grammar.json_schema({"type": "strng"}, "response_format"), "invalid_json_schema", "strng"),
        (
            lambda: Grammar.json_schema({"type": "array", "uniqueItems": True}, "s"),
            "invalid_json_schema",
            "uniqueItems",
        ),
        (lambda: Grammar.json_schema({"$ref": "#/$defs/missing"}, "s"), "invalid_json_schema", "missing"),
        (lambda: Grammar.json_schema({"type": "string", "pattern": "([a-z"}, "s"), "invalid_json_schema", "regex"),
        (lambda: Grammar.json_schema({"type": "string", "format": "ipv7"}, "s"), "invalid_json_schema", "ipv7"),
        (lambda: Grammar.lark("start: foo", "grammar"), "invalid_grammar", "foo"),
        (lambda: Grammar.regex("[0-9", "regex"), "invalid_grammar", "regex"),
    ],
    ids=["unknown-type", "unsupported-keyword", "missing-ref", "bad-pattern", "unknown-format", "lark", "regex"],
)
def test_a_grammar_the_library_refuses_is_invalid_grammar_naming_the_field(phi, grammar, code, mentions):
    spec = grammar()
    with pytest.raises(InvalidGrammar) as raised:
        phi.check_grammar(spec)
    assert raised.value.code == code and raised.value.param == spec.origin
    assert raised.value.message.startswith(spec.origin + ": ") and mentions in raised.value.message
    assert len(raised.value.message) < 400 and "<state>" not in raised.value.message


def nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


@pytest.mark.parametrize(
    ("schema", "mentions"),
    [
        (nested(40), "nested more than 48 levels"),
        ({"enum": list(range(1001))}, "1,001 enum and const values"),
        ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1001)}}, "1,001 object"),
        ({"const": "x" * 100_001}, "characters"),
        ([1, 2], "not an array"),
        (False, "allows no value"),
    ],
    ids=["deep", "huge-enum", "too-many-properties", "too-long", "not-a-schema", "false"],
)
def test_a_schema_past_a_bound_is_refused_before_the_library_sees_it(schema, mentions):
    with pytest.raises(InvalidGrammar) as raised:
        Grammar.json_schema(schema, "json_schema")
    assert mentions in raised.value.message and raised.value.code == "invalid_json_schema"


def test_the_bounds_hold_within_them(phi):
    # The largest schemas within the bounds compile (and quickly: the bounds exist to keep them so)
    wide = {
        "type": "object",
        "properties": {f"p{i}": {"type": "integer"} for i in range(grammar_module.MAX_PROPERTIES)},
    }
    began = time.monotonic()
    for schema in (nested(23), {"enum": [f"v{i}" for i in range(grammar_module.MAX_ENUM_VALUES)]}, wide):
        phi.check_grammar(Grammar.json_schema(schema, "json_schema"))
    assert time.monotonic() - began < 30  # a bound, not a benchmark: 1,000 properties compile in ~0.2 s here


def test_a_pattern_that_explodes_while_generating_ends_the_request_as_grammar_too_complex(phi):
    # GIVEN a pattern whose automaton grows with every character (an unbounded `.*` under a counted repeat)
    grammar = Grammar.json_schema({"type": "string", "pattern": "^(.*(a.{30}|b.{30})){20}$"}, "response_format")
    params = GenerationParams(max_new_tokens=200, do_sample=False, grammar=grammar)
    # WHEN generated, twice
    for _ in range(2):
        with pytest.raises(InvalidGrammar) as raised:
            phi.generate(["Q:"], params, later())
        # THEN the library's per-token limit stops it with an error naming the field, not a crash or a hang
        assert raised.value.code == "grammar_too_complex" and raised.value.param == "response_format"
        assert "simplify" in raised.value.message
        # AND (the second time) it was compiled afresh: the first one's exhausted lexer was not reused
        assert "after 0 generated tokens" not in raised.value.message
    # AND the model keeps serving
    assert phi.generate(["Q:"], GenerationParams(max_new_tokens=3), later()).completions[0].generated_tokens == 3


def test_compiled_grammars_and_refusals_are_cached(phi):
    grammar = Grammar.json_schema({"type": "object", "properties": {"z": {"type": "integer"}}}, "json_schema")
    assert phi.grammars.compile(grammar) is phi.grammars.compile(grammar)
    bad = Grammar.json_schema({"type": "nope"}, "json_schema")
    for _ in range(2):
        with pytest.raises(InvalidGrammar):
            phi.grammars.compile(bad)
    assert isinstance(phi.grammars._cache[bad], str)


def test_the_planner_learns_what_a_mask_costs_per_row(phi):
    # GIVEN the planner's prior for a row's mask
    before = phi.planner.describe()["grammar_mask_seconds_per_row"]
    # WHEN a constrained batch is generated
    params = GenerationParams(max_new_tokens=10, do_sample=False, grammar=Grammar.lark(ANY_TEXT, "grammar"))
    phi.generate(["a", "b"], params, later())
    # THEN its measured cost moved the estimate, and a constrained step is estimated longer than a free one
    after = phi.planner.describe()["grammar_mask_seconds_per_row"]
    assert after != before and after > 0
    assert phi.planner.mask_step_s(2) == pytest.approx(2 * after, abs=1e-5)


def test_a_grammar_thousands_of_rules_deep_compiles_on_the_worker_instead_of_overflowing_the_stack(phi):
    # GIVEN 6,000 chained rules and a 3,000-long $ref chain (each overflowed the main thread's 8 MB stack inside
    # llguidance: SIGSEGV, the process and its warm model gone; this test's process would die the same way)
    chain = "\n".join(["start: r0"] + [f"r{i}: r{i + 1}" for i in range(6000)] + ['r6000: "z"'])
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(3000)} | {"d3000": {"enum": ["z"]}}
    for grammar in (Grammar.lark(chain, "grammar"), Grammar.json_schema({"$defs": defs, "$ref": "#/$defs/d0"}, "s")):
        # WHEN used to generate
        params = GenerationParams(max_new_tokens=5, do_sample=False, return_full_text=False, grammar=grammar)
        completion = phi.generate(["Say z:"], params, later()).completions[0]
        # THEN it compiles (on the worker) and constrains
        assert completion.text in ("z", '"z"') and completion.grammar_complete is True
