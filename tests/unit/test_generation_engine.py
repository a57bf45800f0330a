"""The generation engine on real models: per-row seeds, log-probabilities, penalties, streaming events,
cancellation and the chunked prompt pass (tiny Phi-2 with Phi-2's tokenizer, and SmolLM2-135M)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from phi2.engine.formats import common, int8
from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.engine.planner import Plan

FAR = 3600.0


def later(seconds: float = FAR) -> float:
    return time.monotonic() + seconds


@pytest.fixture(scope="module")
def phi(tiny_phi_dir) -> TransformersGenerator:
    return TransformersGenerator.load(tiny_phi_dir, warmup=False)


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> TransformersGenerator:
    return TransformersGenerator.load(smollm2_dir, warmup=False)


@pytest.fixture
def chunked(monkeypatch):
    """Force the prompt pass into chunks of `tokens` tokens per row."""

    def force(generator: TransformersGenerator, tokens: int) -> None:
        def plan(batch: int, width: int, available_s: float, start: int = 0) -> Plan:
            return Plan(batch=batch, width=width, chunk_tokens=tokens, estimated_s=0.0, start=start)

        monkeypatch.setattr(generator.planner, "plan", plan)

    return force


def test_a_row_samples_the_same_text_alone_or_in_a_batch_with_its_seed(phi):
    # GIVEN sampling with per-row seeds
    params = GenerationParams(max_new_tokens=12, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    prompts = ["Once upon a time", "A much longer prompt, so that the first row is left-padded", "Hi"]
    # WHEN the rows run together, and each alone with its own seed
    batch = phi.generate(prompts, params, later(), seeds=[11, 22, 33])
    alone = [
        phi.generate([p], params, later(), seeds=[s]).completions[0] for p, s in zip(prompts, [11, 22, 33], strict=True)
    ]
    # THEN each row's text depends on its own seed only
    assert [c.token_ids for c in batch.completions] == [c.token_ids for c in alone]
    assert [c.seed for c in batch.completions] == [11, 22, 33]


def test_n_samples_of_one_prompt_with_distinct_seeds_differ_and_reproduce(phi):
    params = GenerationParams(max_new_tokens=16, do_sample=True, temperature=1.0, return_full_text=False)
    first = phi.generate(["Tell me"] * 3, params, later(), seeds=[5, 6, 7])
    second = phi.generate(["Tell me"] * 3, params, later(), seeds=[5, 6, 7])
    texts = [c.text for c in first.completions]
    assert len(set(texts)) == 3
    assert texts == [c.text for c in second.completions]


def _reference_logprobs(generator: TransformersGenerator, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's logits at every position, from one plain forward pass (teacher-forced)."""
    with torch.inference_mode():
        logits = generator.model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_are_the_models_own_distribution(smol):
    # GIVEN greedy generation asking for the chosen token's log-probability and 3 alternatives
    params = GenerationParams(max_new_tokens=6, do_sample=False, logprobs=3, prompt_logprobs=True)
    completion = smol.generate(["The capital of France is"], params, later()).completions[0]
    # WHEN the same tokens go through one plain forward pass
    ids = list(completion.prompt_token_ids) + list(completion.token_ids)
    reference = _reference_logprobs(smol, ids)
    # THEN every generated position's log-probability and top alternatives match it
    width = len(completion.prompt_token_ids)
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    for offset, entry in enumerate(completion.logprobs):
        row = reference[width - 1 + offset]
        assert entry.token_id == completion.token_ids[offset]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=1e-3)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
        # greedy: the chosen token is the most likely one
        assert entry.top[0][0] == entry.token_id
    # AND every prompt token after the first has its log-probability given what precedes it
    assert completion.prompt_logprobs[0] is None
    for position, entry in enumerate(completion.prompt_logprobs[1:], start=1):
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(reference[position - 1][ids[position]].item(), abs=1e-3)


def test_logit_bias_forces_and_bans_tokens(phi):
    forced = phi.tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    params = GenerationParams(max_new_tokens=4, do_sample=False, logit_bias=((forced, 100.0),))
    assert phi.generate(["Hello"], params, later()).completions[0].token_ids == (forced,) * 4
    # AND a ban removes the greedy choice from every position
    free = phi.generate(["Hello"], GenerationParams(max_new_tokens=4, do_sample=False), later()).completions[0]
    banned = GenerationParams(max_new_tokens=4, do_sample=False, logit_bias=((free.token_ids[0], -100.0),))
    assert free.token_ids[0] not in phi.generate(["Hello"], banned, later()).completions[0].token_ids


def test_frequency_penalty_discourages_repeating_generated_tokens(smol):
    # GIVEN greedy decoding of a prompt that invites repetition
    prompt = "one, two, one, two, one, two,"
    plain = smol.generate([prompt], GenerationParams(max_new_tokens=24, do_sample=False), later())
    penalised = smol.generate(
        [prompt], GenerationParams(max_new_tokens=24, do_sample=False, frequency_penalty=2.0), later()
    )

    # THEN the penalty leaves fewer repeated tokens
    def repeats(ids):
        return len(ids) - len(set(ids))

    assert repeats(plain.completions[0].token_ids) > 8
    assert repeats(penalised.completions[0].token_ids) < repeats(plain.completions[0].token_ids)


def test_presence_and_frequency_penalties_subtract_per_generated_occurrence():
    from phi2.engine.sampling import PresenceFrequencyPenalty

    # GIVEN a prompt of two tokens, then generated tokens 3, 3, 5
    penalty = PresenceFrequencyPenalty(presence=0.5, frequency=0.25, prompt_width=2, vocab_size=8)
    scores = penalty(torch.tensor([[3, 3, 3, 3, 5]]), torch.zeros(1, 8))
    # THEN token 3 (generated twice) loses 0.5 + 2 x 0.25, token 5 loses 0.75, prompt tokens count for nothing
    assert scores[0].tolist() == [0, 0, 0, -1.0, 0, -0.75, 0, 0]


def test_streamed_events_add_up_to_the_buffered_text(smol):
    # GIVEN a greedy request with a stop string taken from what the model says
    free = smol.generate(["The capital of France is"], GenerationParams(max_new_tokens=24, do_sample=False), later())
    text = free.completions[0].text.removeprefix("The capital of France is")
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    params = GenerationParams(max_new_tokens=24, do_sample=False, stop=(stop,), return_full_text=False)
    events = []
    # WHEN it is generated with an on_step listener
    result = smol.generate(["The capital of France is"], params, later(), on_step=lambda e: events.extend(e) or True)
    # THEN the events' text is exactly the buffered text, never shows the stop string, and ends with the reason
    completion = result.completions[0]
    streamed = "".join(e.text for e in events)
    assert streamed == completion.text == text[: text.index(stop)]
    assert events[-1].finish_reason == "stop_sequence" == completion.finish_reason
    assert [e.token_id for e in events if e.token_id is not None] == list(completion.token_ids)


def test_returning_false_from_on_step_cancels_generation(phi):
    calls = []

    def listener(events):
        if events:  # the first call, with no events, says the request was admitted
            calls.append(events)
        return len(calls) < 3

    result = phi.generate(["Hello"], GenerationParams(max_new_tokens=50, do_sample=False), later(), on_step=listener)
    assert result.completions[0].finish_reason == "cancelled"
    assert result.completions[0].generated_tokens == 3


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prompt_pass_gives_the_same_greedy_tokens(smol, chunked, chunk):
    # GIVEN a left-padded batch, read in one pass
    prompts = ["The capital of France is", "Once upon a time, in a land far away, there lived an old king who"]
    params = GenerationParams(max_new_tokens=8, do_sample=False, logprobs=0)
    chunked(smol, 4096)
    whole = smol.generate(prompts, params, later())
    # WHEN the prompt pass is cut into chunks that reuse the KV cache
    chunked(smol, chunk)
    pieces = smol.generate(prompts, params, later())
    # THEN the tokens are the same, and the chunks were really used
    assert whole.prompt_chunks == 1 and pieces.prompt_chunks > 1
    assert [c.token_ids for c in pieces.completions] == [c.token_ids for c in whole.completions]
    for a, b in zip(whole.completions, pieces.completions, strict=True):
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-3


@pytest.fixture(scope="module")
def smol_int8(smollm2_int8_dir) -> TransformersGenerator:
    return TransformersGenerator.load(smollm2_int8_dir, warmup=False)


@pytest.mark.parametrize("path", ["kernel", "fp32 gemm"])
def test_int8_chunked_prompt_pass_agrees_with_the_whole_pass_teacher_forced(smol_int8, chunked, monkeypatch, path):
    # GIVEN SmolLM2 in the int8 format, a prompt longer than the kernel's row threshold, and every pass made to
    # take one path whatever its rows: our kernel (rows quantized one by one: a row's outputs do not depend on
    # the other rows of its pass) or an fp32 GEMM of the widened weight, on any CPU. (Left to the thresholds, the
    # whole pass and 32-token chunks would take different paths, whose numerics differ by the activations'
    # rounding, and a bf16 GEMM rounds activations and outputs to 8 bits: each path is bounded against the
    # de-quantized layer in test_quantization.py, and the model's quality on each in the bench's gate.)
    text = (Path(__file__).resolve().parents[2] / "infra" / "bench" / "quality_text.txt").read_text()
    params = GenerationParams(max_new_tokens=1, do_sample=False, logprobs=2, prompt_logprobs=True)
    monkeypatch.setenv(common.KERNEL_ROWS_VARIABLE, "100000" if path == "kernel" else "0")
    monkeypatch.setattr(common, "prompt_dtype", lambda: torch.float32)
    chunk = 32
    chunked(smol_int8, 4096)
    whole = smol_int8.generate([text], params, later())
    prompt_tokens = whole.completions[0].prompt_tokens
    assert prompt_tokens > max(int8.KERNEL_ROWS.values()) >= chunk, "unforced, the passes would take different paths"
    # WHEN the same prompt is read in chunks that reuse the KV cache
    chunked(smol_int8, chunk)
    pieces = smol_int8.generate([text], params, later())
    assert whole.prompt_chunks == 1 and pieces.prompt_chunks == -(-prompt_tokens // chunk)
    # THEN every prompt token's log-probability is the same up to what rounding can change: the chunks attend
    # over a cache instead of the whole prompt, which moves activations by fp32 rounding; the GEMM passes that on
    # as it is (1e-3, as with full-precision weights), the kernel re-quantizes every layer's input, where a value
    # on a rounding boundary moves by a whole int16 step (2^-15 of its row's largest value: measured 5.6e-3 on
    # SmolLM2's log-probabilities, bounded at 2e-2)
    a, b = (r.completions[0].prompt_logprobs[1:] for r in (whole, pieces))
    assert len(a) == prompt_tokens - 1
    bound = 2e-2 if path == "kernel" else 1e-3
    assert max(abs(x.logprob - y.logprob) for x, y in zip(a, b, strict=True)) < bound
    # AND the most likely next token is the same wherever it leads the second by more than that rounding can move
    for x, y in zip(a, b, strict=True):
        if x.top[0][1] - x.top[1][1] > 2 * bound:
            assert x.top[0][0] == y.top[0][0]
