"""The transformers generator on the Phi-2 code path: a tiny random PhiForCausalLM with Phi-2's real
tokenizer (GPT-2 BPE + 38 whitespace tokens), loaded from a directory made by prepare_model."""

from __future__ import annotations

import time

import pytest
import torch

from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.errors import ContextLengthExceeded

GREEDY = GenerationParams(max_new_tokens=12, do_sample=False)
FAR = 3600.0


@pytest.fixture(scope="module")
def phi(tiny_phi_dir) -> TransformersGenerator:
    return TransformersGenerator.load(tiny_phi_dir, warmup=False)


def later(seconds: float = FAR) -> float:
    return time.monotonic() + seconds


def test_tokenizer_is_phi2s(phi):
    tokenizer = phi.tokenizer
    assert len(tokenizer) == 50295
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's ids
    # Runs of spaces and tabs are single added tokens, as in Phi-2 (code indentation).
    assert tokenizer("    ")["input_ids"] == [50284]
    assert tokenizer("\t\t")["input_ids"] == [50294]
    assert phi.info.context_length == 2048


def test_batch_is_left_padded_with_a_mask_and_matches_single_prompts(phi):
    # GIVEN prompts of different lengths
    prompts = ["Hi", "A considerably longer prompt than the first one", "def f(x):\n    return"]
    # WHEN they are tokenized as a batch
    encoded = phi.tokenizer(prompts, return_tensors="pt", padding=True)
    # THEN padding is on the left and masked out, so every prompt ends in the last column
    mask = encoded["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert encoded["input_ids"][0, 0] == phi.tokenizer.pad_token_id
    # AND greedy generation in the batch equals generating each prompt alone
    batch = phi.generate(prompts, GREEDY, later())
    alone = [phi.generate([p], GREEDY, later()).completions[0] for p in prompts]
    assert [c.text for c in batch.completions] == [c.text for c in alone]
    assert [c.prompt_tokens for c in batch.completions] == [c.prompt_tokens for c in alone]


def test_same_seed_same_text_and_the_seed_is_reported(phi):
    params = GenerationParams(max_new_tokens=16, seed=1234)
    first, second = phi.generate(["Once upon"], params, later()), phi.generate(["Once upon"], params, later())
    assert first.completions[0].text == second.completions[0].text
    assert first.seed == 1234
    other = phi.generate(["Once upon"], GenerationParams(max_new_tokens=16, seed=4321), later())
    assert other.completions[0].text != first.completions[0].text


def test_unseeded_requests_report_the_seed_that_reproduces_them(phi):
    params = GenerationParams(max_new_tokens=16)
    first = phi.generate(["Once upon"], params, later())
    replay = phi.generate(["Once upon"], GenerationParams(max_new_tokens=16, seed=first.seed), later())
    assert replay.completions[0].text == first.completions[0].text


def test_stop_sequence_ends_generation_and_is_not_included(phi):
    # GIVEN the text the model generates greedily, and a stop string taken from its middle
    free = phi.generate(["The weather today"], GenerationParams(max_new_tokens=20, do_sample=False), later())
    generated = free.completions[0].text.removeprefix("The weather today")
    stop = generated[len(generated) // 2 : len(generated) // 2 + 3]
    assert stop.strip(), "the tiny model generated whitespace only"
    # WHEN generating again with that stop string
    params = GenerationParams(max_new_tokens=20, do_sample=False, stop=(stop,), return_full_text=False)
    result = phi.generate(["The weather today"], params, later()).completions[0]
    # THEN the text ends right before the stop string, which is not included
    assert result.finish_reason == "stop_sequence"
    assert result.text == generated[: generated.index(stop)]
    assert result.generated_tokens < 20


def test_end_of_text_token_ends_generation(tiny_phi_dir):
    # GIVEN a model that always predicts <|endoftext|> first
    generator = TransformersGenerator.load(tiny_phi_dir, warmup=False)
    with torch.no_grad():
        generator.model.lm_head.bias[50256] = 1e4
    # WHEN it generates
    result = generator.generate(["Hello"], GREEDY, later()).completions[0]
    # THEN it stops at once and reports eos_token; the special token is not in the text
    assert result.finish_reason == "eos_token"
    assert result.generated_tokens == 0
    assert result.text == "Hello"


def test_length_finish_and_return_full_text(phi):
    full = phi.generate(["Hello"], GREEDY, later()).completions[0]
    bare = phi.generate(
        ["Hello"], GenerationParams(max_new_tokens=12, do_sample=False, return_full_text=False), later()
    )
    assert full.finish_reason == "length" and full.generated_tokens == 12
    assert full.text == "Hello" + bare.completions[0].text


def test_prompt_past_the_context_is_refused_with_the_numbers(phi):
    prompt = "word " * 2100
    tokens = len(phi.tokenizer(prompt)["input_ids"])
    with pytest.raises(ContextLengthExceeded) as caught:
        phi.generate([prompt], GenerationParams(max_new_tokens=16), later())
    assert f"prompt has {tokens} tokens" in caught.value.message
    assert f"{tokens + 16} exceeds the model's context of 2048" in caught.value.message


def test_slow_model_returns_partial_text_before_the_deadline(tiny_phi_dir):
    # GIVEN a deliberately slow model: every forward pass takes 50 ms more
    generator = TransformersGenerator.load(tiny_phi_dir, warmup=False)
    generator.model.register_forward_hook(lambda *_: time.sleep(0.05))
    budget = 0.6
    # WHEN asked for far more tokens than fit the budget
    started = time.monotonic()
    result = generator.generate(["Tell me"], GenerationParams(max_new_tokens=500, do_sample=False), started + budget)
    elapsed = time.monotonic() - started
    # THEN it ends at the deadline with what it has, marked time_limit: no more tokens than fit the
    # budget at 50 ms each, and nowhere near the 25 s that 500 tokens take (the margin absorbs a loaded CI)
    completion = result.completions[0]
    assert completion.finish_reason == "time_limit"
    assert 0 < completion.generated_tokens <= budget / 0.05
    assert elapsed < budget + 1.0


def test_timings_are_reported(phi):
    result = phi.generate(["Hello"], GREEDY, later())
    assert 0 < result.time_to_first_token_s <= result.total_s
    assert result.tokens_per_second > 0
