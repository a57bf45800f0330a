"""The prompt cache on real models (tiny Phi-2 with Phi-2's tokenizer, SmolLM2-135M; fp32 and int8): a request
reuses the longest prefix an earlier request of the same scope left, reads only the rest, and answers exactly
as it would have without it; memory stays inside the budget; nothing crosses scopes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from phi2.engine import prefix_cache
from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.engine.memory import MIB, KvShape
from phi2.engine.planner import Plan
from phi2.engine.prefix_cache import PrefixCache, cache_bytes
from phi2.errors import PromptTooLongForDeadline

TEXT = (Path(__file__).resolve().parents[2] / "infra" / "bench" / "quality_text.txt").read_text()
GREEDY = GenerationParams(max_new_tokens=12, do_sample=False, return_full_text=False)


def later(seconds: float = 3600.0) -> float:
    return time.monotonic() + seconds


def load(directory: Path) -> TransformersGenerator:
    generator = TransformersGenerator.load(directory, warmup=False, lookup_tokens=0)
    assert generator.prefix_cache is not None and generator.prefix_cache.enabled
    return generator


@pytest.fixture(scope="module")
def phi(tiny_phi_dir) -> TransformersGenerator:
    return load(tiny_phi_dir)


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> TransformersGenerator:
    return load(smollm2_dir)


@pytest.fixture(scope="module")
def phi_int8(tiny_phi_int8_dir) -> TransformersGenerator:
    return load(tiny_phi_int8_dir)


@pytest.fixture(scope="module")
def smol_int8(smollm2_int8_dir) -> TransformersGenerator:
    return load(smollm2_int8_dir)


@pytest.fixture
def fresh():
    """Each test starts with an empty cache and the generator's own policy (budget, TTL, lookup)."""
    touched: list[TransformersGenerator] = []

    def clear(generator: TransformersGenerator) -> TransformersGenerator:
        generator.prefix_cache.clear()
        touched.append(generator)
        return generator

    yield clear
    for generator in touched:
        generator.prefix_cache.clear()


def chunked_at(monkeypatch, generator: TransformersGenerator, tokens: int) -> None:
    """Force every prompt pass into chunks of `tokens` tokens, counted from where the pass starts."""

    def plan(batch: int, width: int, available_s: float, start: int = 0) -> Plan:
        return Plan(batch=batch, width=width, chunk_tokens=tokens, estimated_s=0.0, start=start)

    monkeypatch.setattr(generator.planner, "plan", plan)


def turn_two(generator: TransformersGenerator, first: str, params: GenerationParams = GREEDY) -> tuple[str, int]:
    """A chat's next turn: the first prompt, its answer (as the client shows it) and a new question."""
    answer = generator.generate([first], params, later(), cache_scope="alice").completions[0]
    return first + answer.text + "\nAnd what happened next? Tell me in detail.", answer.prompt_tokens


@pytest.mark.parametrize("name", ["phi", "smol"])
def test_fp32_greedy_next_turn_reuses_the_chat_and_answers_token_for_token_as_without_it(request, fresh, name):
    generator = fresh(request.getfixturevalue(name))
    # GIVEN a first turn served for a caller (its prompt and its answer are kept)
    second, first_tokens = turn_two(generator, TEXT[: TEXT.index("\n", 900) + 1])
    (kept,) = [entry.ids for entry in generator.prefix_cache.entries.values() if entry.scope == "alice"]
    assert kept.numel() > first_tokens  # the prompt and the answer's tokens that were fed back
    # WHEN the next turn (the whole chat again, plus a question) comes from the same caller
    cached = generator.generate([second], GREEDY, later(), cache_scope="alice")
    row = cached.completions[0]
    read = sum(s.tokens for s in generator.last_passes if s.start < row.prompt_tokens)
    # THEN it reused every token it shares with what was kept (the answer as far as it tokenizes the same way
    # again), the first prompt at least, and read only the rest
    shared = prefix_cache._common_prefix(kept, torch.tensor(row.prompt_token_ids))
    assert row.cached_tokens == shared >= first_tokens
    assert read == row.prompt_tokens - row.cached_tokens
    # AND its greedy tokens are exactly those of the same request without a cache
    plain = generator.generate([second], GREEDY, later())
    assert plain.completions[0].cached_tokens == 0
    assert row.token_ids == plain.completions[0].token_ids


@pytest.mark.parametrize("name", ["phi_int8", "smol_int8"])
def test_int8_reuse_equals_a_pass_chunked_at_the_same_boundary(request, fresh, monkeypatch, name):
    generator = fresh(request.getfixturevalue(name))
    # GIVEN an int8 model, whose kernels differ by row count, and a cached prompt of `boundary` tokens
    first = TEXT[: TEXT.index(" ", 600)]  # cut before a space: the longer prompt's tokens start with these
    boundary = len(generator.tokenizer(first)["input_ids"])
    chunked_at(monkeypatch, generator, boundary)
    primed = generator.generate([first], GenerationParams(max_new_tokens=1, do_sample=False), later(), cache_scope="a")
    assert primed.completions[0].prompt_tokens == boundary
    longer = first + TEXT[600:1500]
    params = GenerationParams(max_new_tokens=16, do_sample=False, logprobs=1)
    # WHEN a longer prompt that starts with it reuses it, and the same prompt is read without a cache, in chunks
    # of `boundary` tokens (so both passes cut the prompt at the same places)
    cached = generator.generate([longer], params, later(), cache_scope="a")
    plain = generator.generate([longer], params, later())
    # THEN the cache held the whole first prompt, and the answers are the same, token for token and in value
    assert cached.completions[0].cached_tokens == boundary
    assert cached.completions[0].token_ids == plain.completions[0].token_ids
    for a, b in zip(cached.completions[0].logprobs, plain.completions[0].logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_seeded_sampling_with_the_cache_samples_what_it_samples_without_it(phi, fresh):
    generator = fresh(phi)
    params = GenerationParams(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    second, _ = turn_two(generator, TEXT[:700])
    cached = generator.generate([second], params, later(), seeds=[7], cache_scope="alice")
    plain = generator.generate([second], params, later(), seeds=[7])
    assert cached.completions[0].cached_tokens > 0
    assert cached.completions[0].token_ids == plain.completions[0].token_ids


def test_n_rows_of_one_prompt_read_it_once_and_sample_as_they_would_apart(phi, fresh):
    generator = fresh(phi)
    prompt = TEXT[:800]
    params = GenerationParams(max_new_tokens=8, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    # GIVEN n = 3 rows of one prompt, each with its own seed
    together = generator.generate([prompt] * 3, params, later(), seeds=[1, 2, 3])
    prompt_tokens = together.completions[0].prompt_tokens
    # THEN the prompt was read by passes of one row, and only its last token by a pass of all three
    prompt_passes = [s for s in generator.last_passes if s.start < prompt_tokens]
    assert sum(s.tokens for s in prompt_passes if s.batch == 1) == prompt_tokens - 1
    assert [(s.batch, s.tokens) for s in prompt_passes if s.batch != 1] == [(3, 1)]
    # AND each row samples exactly what it samples alone with its seed
    alone = [generator.generate([prompt], params, later(), seeds=[s]).completions[0] for s in (1, 2, 3)]
    assert [c.token_ids for c in together.completions] == [c.token_ids for c in alone]
    # AND with a caller, n rows share a cached prefix too, and report it for every row
    generator.generate([prompt], GREEDY, later(), cache_scope="bob")
    shared = generator.generate([prompt] * 3, params, later(), seeds=[1, 2, 3], cache_scope="bob")
    assert [c.cached_tokens for c in shared.completions] == [prompt_tokens - 1] * 3
    assert [c.token_ids for c in shared.completions] == [c.token_ids for c in alone]


def test_a_left_padded_batch_neither_reuses_nor_keeps_anything(phi, fresh):
    generator = fresh(phi)
    generator.generate([TEXT[:500]], GREEDY, later(), cache_scope="carol")
    before = dict(generator.prefix_cache.entries)
    batch = generator.generate([TEXT[:500] + " more", "Short"], GREEDY, later(), cache_scope="carol")
    assert [c.cached_tokens for c in batch.completions] == [0, 0]
    assert dict(generator.prefix_cache.entries) == before


def test_nothing_crosses_scopes_and_no_scope_keeps_nothing(phi, fresh):
    generator = fresh(phi)
    prompt = TEXT[:600]
    # GIVEN a request without a scope: nothing is kept
    generator.generate([prompt], GREEDY, later())
    assert not generator.prefix_cache.entries
    # WHEN one caller's prompt is kept, another caller (or the same caller under another key) sends it again
    generator.generate([prompt], GREEDY, later(), cache_scope=("alice", ""))
    other = generator.generate([prompt], GREEDY, later(), cache_scope=("mallory", ""))
    narrowed = generator.generate([prompt], GREEDY, later(), cache_scope=("alice", "project-x"))
    same = generator.generate([prompt], GREEDY, later(), cache_scope=("alice", ""))
    # THEN only the same scope reuses it
    assert other.completions[0].cached_tokens == 0
    assert narrowed.completions[0].cached_tokens == 0
    assert same.completions[0].cached_tokens == same.completions[0].prompt_tokens - 1


def test_many_chats_under_a_tiny_budget_never_hold_more_than_the_budget(phi, fresh, monkeypatch):
    generator = fresh(phi)
    cache = generator.prefix_cache
    # GIVEN a budget of about three short chats
    budget = generator.kv.bytes(1, 3 * 160)
    monkeypatch.setattr(cache, "max_bytes", budget)
    evicted = cache.stats.evicted["memory"]
    # WHEN twelve callers chat, two turns each
    for turn in range(2):
        for caller in range(12):
            prompt = f"Caller {caller} says: " + TEXT[caller * 50 : caller * 50 + 400 + 200 * turn]
            generator.generate([prompt], GREEDY, later(), cache_scope=f"caller-{caller}")
            # THEN after every request the stored tensors, counted byte by byte, fit the budget
            counted = sum(cache_bytes(entry.cache) for entry in cache.entries.values())
            assert counted == cache.bytes <= budget
    assert cache.stats.evicted["memory"] > evicted and len(cache.entries) >= 1


def test_the_live_request_wins_entries_are_dropped_before_it_runs(phi, fresh, monkeypatch):
    generator = fresh(phi)
    cache = generator.prefix_cache
    for caller in range(4):
        generator.generate([TEXT[caller * 100 : caller * 100 + 500]], GREEDY, later(), cache_scope=caller)
    held = cache.bytes
    assert len(cache.entries) == 4
    # GIVEN a memory limit that leaves room for the entries, but not for them and a long request at once
    used = 10**9
    monkeypatch.setattr(cache, "limit_bytes", used + cache.reserve_bytes() + held + 10 * MIB)
    monkeypatch.setattr(cache, "used_bytes", lambda: used + cache.bytes)
    live = generator._working_set(1, 1000, 200)
    assert live > 10 * MIB
    seen = []
    real = cache.take

    def take(scope, ids):
        seen.append(cache.bytes)  # what the entries held when the live request started
        return real(scope, ids)

    monkeypatch.setattr(cache, "take", take)
    # WHEN a long request arrives
    generator.generate([TEXT[:4000]], GenerationParams(max_new_tokens=200, do_sample=False), later(), cache_scope=9)
    # THEN older entries were dropped before it ran, so entries and the live request fit the limit together
    assert seen and seen[0] + live <= cache.limit_bytes - used - cache.reserve_bytes()
    assert cache.stats.evicted["memory"] >= 1


def test_no_room_means_off(phi, monkeypatch):
    # GIVEN a 3,008 MB function (Lambda's variable) whose process holds 3.3 GiB once the model is loaded, as
    # int8 Phi-2 does
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "3008")
    monkeypatch.setattr(prefix_cache.memory, "rss_bytes", lambda: int(3.3 * 1024 * MIB))
    kv = KvShape.of(phi.model.config, bytes_per_value=4)
    # WHEN the cache is sized for it
    cache = PrefixCache.for_model(kv, phi.model.config, 2048)
    # THEN it is off, says why, and neither reuses nor keeps anything
    assert not cache.enabled and "no room" in cache.off_reason
    assert cache.take("x", torch.arange(10)) is None
    assert not cache.put("x", torch.arange(3), DynamicCache())
    # AND with 10,240 MB the same process has room
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "10240")
    assert PrefixCache.for_model(kv, phi.model.config, 2048).enabled


def test_expired_entries_are_never_reused(phi, fresh, monkeypatch):
    generator = fresh(phi)
    cache = generator.prefix_cache
    now = [1000.0]
    monkeypatch.setattr(cache, "clock", lambda: now[0])
    prompt = TEXT[:500]
    generator.generate([prompt], GREEDY, later(), cache_scope="dave")
    now[0] += cache.ttl_s - 1
    assert generator.generate([prompt], GREEDY, later(), cache_scope="dave").completions[0].cached_tokens > 0
    now[0] += cache.ttl_s + 1
    expired = cache.stats.evicted["ttl"]
    assert generator.generate([prompt], GREEDY, later(), cache_scope="dave").completions[0].cached_tokens == 0
    assert cache.stats.evicted["ttl"] == expired + 1


def test_a_short_shared_prefix_is_copied_and_the_conversation_it_came_from_stays(phi, fresh):
    generator = fresh(phi)
    cache = generator.prefix_cache
    system = TEXT[:300]
    long_chat = system + TEXT[1000:2500]
    generator.generate([long_chat], GREEDY, later(), cache_scope="erin")
    other_chat = system + " A different conversation about something else entirely."
    reused = generator.generate([other_chat], GREEDY, later(), cache_scope="erin").completions[0]
    assert 0 < reused.cached_tokens <= generator.count_tokens(system) + 1
    assert len(cache.entries) == 2  # the long chat was copied from, not taken over
    again = generator.generate([long_chat], GREEDY, later(), cache_scope="erin").completions[0]
    assert again.cached_tokens == again.prompt_tokens - 1


def test_a_prompt_refused_between_chunks_keeps_what_it_read_and_the_retry_starts_there(phi, fresh, monkeypatch):
    generator = fresh(phi)
    chunked_at(monkeypatch, generator, 64)
    prompt = TEXT[:3000]
    calls = {"n": 0}
    real = generator.planner.check_rest

    def give_up_after_two_chunks(plan, done, available_s, spent_s=0.0):
        calls["n"] += 1
        if calls["n"] == 2:
            raise PromptTooLongForDeadline(
                prompt_tokens=plan.width, batch=plan.batch, estimated_s=1.0, available_s=0.5, largest_prompt_tokens=100
            )
        return real(plan, done, available_s, spent_s)

    monkeypatch.setattr(generator.planner, "check_rest", give_up_after_two_chunks)
    with pytest.raises(PromptTooLongForDeadline):
        generator.generate([prompt], GREEDY, later(), cache_scope="frank")
    retry = generator.generate([prompt], GREEDY, later(), cache_scope="frank").completions[0]
    assert retry.cached_tokens == 128
    assert retry.token_ids == generator.generate([prompt], GREEDY, later()).completions[0].token_ids


def test_entries_extended_by_a_later_request_are_replaced_not_duplicated(phi, fresh):
    generator = fresh(phi)
    cache = generator.prefix_cache
    second, _ = turn_two(generator, TEXT[:400])
    generator.generate([second], GREEDY, later(), cache_scope="alice")
    assert len([e for e in cache.entries.values() if e.scope == "alice"]) == 1
