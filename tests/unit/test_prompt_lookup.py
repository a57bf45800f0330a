"""Prompt lookup decoding on real models (tiny Phi-2, SmolLM2; fp32 and int8): drafts copied from the sequence
are verified in one pass, and the answer is exactly plain greedy decoding's, with and without a cached prefix;
the engine's stopping criterion sees every accepted token once, in order; it stays off where it would not be
exact (sampling, log-probabilities, batches, stateful processors)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import DEFAULT_LOOKUP_TOKENS, TransformersGenerator
from phi2.engine.hooks import Passes
from phi2.engine.planner import CostModel, PassSample, Planner

TEXT = (Path(__file__).resolve().parents[2] / "infra" / "bench" / "quality_text.txt").read_text()


def later(seconds: float = 3600.0) -> float:
    return time.monotonic() + seconds


def greedy(tokens: int, **changes) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, do_sample=False, return_full_text=False, **changes)


@pytest.fixture(scope="module")
def models(tiny_phi_dir, tiny_phi_int8_dir, smollm2_dir, smollm2_int8_dir) -> dict[str, TransformersGenerator]:
    dirs = {"phi": tiny_phi_dir, "phi_int8": tiny_phi_int8_dir, "smol": smollm2_dir, "smol_int8": smollm2_int8_dir}
    return {name: TransformersGenerator.load(d, warmup=False) for name, d in dirs.items()}


def copying_prompt(generator: TransformersGenerator) -> str:
    """A prompt whose greedy answer copies from it: for SmolLM2 an instruction to copy a text; for the random tiny
    Phi-2, a text, its own greedy continuation and the text again (it then repeats part of that continuation)."""
    if generator.info.chat_template:
        return generator.apply_chat_template(
            [{"role": "user", "content": "Copy this text exactly, word for word:\n\n" + TEXT[:700]}]
        )
    head = TEXT[:300]
    with plain(generator):
        answer = generator.generate([head], greedy(40), later()).completions[0].text
    return head + answer + "\n\n" + head


class plain:
    """Prompt lookup off, for a reference run."""

    def __init__(self, generator: TransformersGenerator) -> None:
        self.generator = generator

    def __enter__(self) -> None:
        self.saved, self.generator.lookup_tokens = self.generator.lookup_tokens, 0

    def __exit__(self, *exc) -> None:
        self.generator.lookup_tokens = self.saved


@pytest.mark.parametrize("name", ["phi", "phi_int8", "smol", "smol_int8"])
def test_prompt_lookup_answers_exactly_as_plain_greedy_decoding_with_and_without_a_cached_prefix(models, name):
    generator = models[name]
    generator.prefix_cache.clear()
    assert generator.lookup_tokens == DEFAULT_LOOKUP_TOKENS > 0
    prompt = copying_prompt(generator)
    params = greedy(40)
    # GIVEN plain greedy decoding's answer
    with plain(generator):
        reference = generator.generate([prompt], params, later()).completions[0]
    # WHEN the same request runs with prompt lookup, and then again reusing its own cached prompt pass
    looked = generator.generate([prompt], params, later(), cache_scope="copy").completions[0]
    drafts = generator.last_drafts
    again = generator.generate([prompt], params, later(), cache_scope="copy").completions[0]
    # THEN drafts were verified, some of them accepted, and the answers are plain greedy's, token for token
    assert drafts is not None and drafts.passes > 0 and drafts.accepted > 0
    assert looked.token_ids == reference.token_ids
    assert again.cached_tokens > 0 and again.token_ids == reference.token_ids
    generator.prefix_cache.clear()


def test_every_accepted_token_reaches_the_stopping_criterion_once_and_in_order(models):
    generator = models["smol"]
    prompt = copying_prompt(generator)
    with plain(generator):
        reference = generator.generate([prompt], greedy(48), later()).completions[0]
    events = []

    def listener(step):
        events.append(list(step))
        return True

    looked = generator.generate([prompt], greedy(48), later(), on_step=listener)
    row = looked.completions[0]
    assert generator.last_drafts.accepted > 5  # several passes brought several tokens at once
    # THEN one on_step call per token (after the admission call), each with that token, in order
    steps = [step for step in events if step]
    assert [event.token_id for step in steps for event in step if event.token_id is not None] == list(row.token_ids)
    assert all(len(step) == 1 for step in steps)
    assert "".join(event.text for step in steps for event in step) == row.text
    assert row.token_ids == reference.token_ids and row.generated_tokens == 48


def test_a_stop_string_or_the_token_limit_inside_an_accepted_draft_ends_the_answer_there(models):
    generator = models["smol"]
    prompt = copying_prompt(generator)
    with plain(generator):
        full = generator.generate([prompt], greedy(60), later()).completions[0].text
    # GIVEN a stop string the copied text reaches after a few words
    stop = full.split()[6]
    for params in (greedy(60, stop=(stop,)), greedy(9)):
        with plain(generator):
            reference = generator.generate([prompt], params, later()).completions[0]
        looked = generator.generate([prompt], params, later()).completions[0]
        assert (looked.text, looked.finish_reason, looked.token_ids) == (
            reference.text,
            reference.finish_reason,
            reference.token_ids,
        )
    assert reference.generated_tokens == 9


def test_penalties_keep_prompt_lookup_exact(models):
    generator = models["smol"]
    prompt = copying_prompt(generator)
    params = greedy(32, repetition_penalty=1.1, presence_penalty=0.2, logit_bias=((13, -5.0),))
    with plain(generator):
        reference = generator.generate([prompt], params, later()).completions[0]
    looked = generator.generate([prompt], params, later()).completions[0]
    assert generator.last_drafts is not None
    assert looked.token_ids == reference.token_ids


@pytest.mark.parametrize(
    "params, rows",
    [
        (GenerationParams(max_new_tokens=8, do_sample=True, seed=3), 1),
        (greedy(8, logprobs=0), 1),
        (greedy(8), 2),
    ],
    ids=["sampling", "logprobs", "batch"],
)
def test_prompt_lookup_stays_off_where_it_would_not_be_exact(models, params, rows):
    generator = models["phi"]
    generator.generate([copying_prompt(generator)] * rows, params, later())
    assert generator.last_drafts is None


def test_the_deadline_check_estimates_a_verification_pass_not_a_decode_step(models):
    planner = models["smol"].planner
    assert planner.step_s(1, 1, 500) == planner.decode_step_s(1)
    assert planner.step_s(1, DEFAULT_LOOKUP_TOKENS + 1, 500) >= planner.decode_step_s(1)
    assert planner.step_s(1, 64, 500) > planner.decode_step_s(1)


def test_verification_passes_teach_the_step_estimate_not_the_prompt_speed():
    # GIVEN a planner that knows its prompt speed, and the hooks of a 10-token prompt already read
    cost = CostModel.fit([PassSample(1, 0, 1, 0.05), PassSample(1, 0, 16, 0.2), PassSample(1, 0, 64, 0.5)], 0.0)
    planner = Planner(2048, 0.0, cost=cost)
    width = 10
    passes = Passes(planner, planner.admit(1, width, 3600.0), later(), torch.zeros(1, width, dtype=torch.long), None)

    def timed_pass(tokens: int) -> None:  # a pass of `tokens` tokens that takes next to no time (~0.05x the model)
        passes.before(None, (), {"input_ids": torch.zeros(1, tokens, dtype=torch.long)})
        passes.after(None, (), {}, None)

    timed_pass(width)
    prompt_estimate, step_estimate = planner.prompt_seconds(1, 1000, admission=True), planner.step_s(1, 6, width)
    # WHEN decoding verifies drafted tokens (the last token and 5 drafts per pass), many times
    for _ in range(20):
        timed_pass(DEFAULT_LOOKUP_TOKENS + 1)
    # THEN the next request's admission estimate did not move (learned as prompt chunks, these passes, which
    # run 1.2-1.5x over the line through the calibrated passes, raised it), and the
    # estimate of a verification step learned their speed
    assert planner.prompt_seconds(1, 1000, admission=True) == prompt_estimate
    assert planner.step_s(1, 6, width) < step_estimate
    assert passes.samples[-1].tokens == DEFAULT_LOOKUP_TOKENS + 1 and not passes.in_prompt
