"""The planner's arithmetic (no model), then its decisions on a real model whose speed it measured."""

from __future__ import annotations

import time

import pytest

from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.engine.planner import CHUNK_SLOWDOWN, WORST_VS_BEST, Calibration, CostModel, PassSample, Planner
from phi2.errors import PromptTooLongForDeadline

# A model that reads 100 prompt tokens a second and takes 50 ms per pass, attention not counted.
COST = CostModel.linear(fixed_s=0.05, per_row_s=0.01, per_row_ctx_s=0.0)


def planner(chunk_seconds: float = 1.0) -> Planner:
    return Planner(context_length=2048, attention_ratio=0.0, chunk_seconds=chunk_seconds, cost=COST)


def test_cost_model_fits_timed_passes_exactly_where_they_were_timed():
    truth = CostModel.linear(fixed_s=0.2, per_row_s=0.003, per_row_ctx_s=0.003 * 1e-4)
    samples = [PassSample(1, 0, 1, truth.seconds(1, 0, 1))]
    samples += [PassSample(b, s, t, truth.seconds(b, s, t)) for b, s, t in [(1, 0, 64), (1, 0, 256), (4, 64, 128)]]
    fitted = CostModel.fit(samples, attention_ratio=1e-4)
    for shape in [(1, 0, 32), (1, 0, 200), (2, 512, 128)]:
        assert fitted.seconds(*shape) == pytest.approx(truth.seconds(*shape), rel=1e-6)
    # AND beyond the largest timed pass it errs on the slow side, at that pass's own cost per row
    assert truth.seconds(8, 0, 1024) < fitted.seconds(8, 0, 1024) < 1.25 * truth.seconds(8, 0, 1024)


def test_chunks_take_about_the_chunk_time_in_whole_rows():
    # 1 s of work at 10 ms per row, less the 50 ms per pass: 95 rows
    assert planner().chunk_tokens(batch=1) == 95
    assert planner().chunk_tokens(batch=4) == 95 // 4


def test_admission_refuses_what_cannot_be_read_in_time_and_names_what_would_fit():
    # GIVEN 3 s left and a prompt of 500 tokens (about 5.3 s with its chunks)
    with pytest.raises(PromptTooLongForDeadline) as refused:
        planner().admit(batch=1, width=500, available_s=3.0)
    error = refused.value
    # THEN it is refused naming the largest prompt that is admitted in 3 s
    largest = error.largest_prompt_tokens
    assert error.status_code == 422 and f"{largest} tokens" in error.message
    assert planner().admit(batch=1, width=largest, available_s=3.0).estimated_s <= 3.0
    with pytest.raises(PromptTooLongForDeadline):
        planner().admit(batch=1, width=largest + 1, available_s=3.0)


def test_a_batch_shrinks_the_largest_prompt():
    assert planner().largest_prompt(batch=8, available_s=5.0) < planner().largest_prompt(batch=1, available_s=5.0) / 4


def test_admission_does_not_refuse_a_prompt_that_takes_half_the_time():
    p = planner()
    for width in (10, 100, 1000):
        p.admit(batch=1, width=width, available_s=2 * p.prompt_seconds(1, width))


def test_a_burst_of_slow_passes_does_not_make_admission_refuse_what_fits_at_the_best_speed():
    # GIVEN a planner that has just seen ten passes 10x slower than its best
    p = planner()
    for _ in range(10):
        p.learn(PassSample(1, 0, 64, 10 * COST.seconds(1, 0, 64)))
    assert p.estimate_pass(1, 0, 64) > 5 * COST.seconds(1, 0, 64)  # the current estimate follows the noise
    # THEN a prompt taking half the time left at the best speed seen (in the chunks it would now use) is admitted
    best = planner().prompt_seconds(1, 500, chunk=p.chunk_tokens(1))
    p.admit(batch=1, width=500, available_s=WORST_VS_BEST * best)
    # AND one that cannot make it even at the best speed is refused
    with pytest.raises(PromptTooLongForDeadline):
        p.admit(batch=1, width=500, available_s=0.9 * best)


def test_chunks_stay_small_when_time_is_short_and_grow_while_each_could_run_twice_as_slow():
    p = planner()
    # GIVEN little time to spare (400 tokens, about 4.3 s in 1 s chunks, with 4.4 s left): 1 s chunks
    assert p.admit(batch=1, width=400, available_s=4.4).chunk_tokens == p.chunk_tokens(1) == 95
    # GIVEN plenty: the whole prompt in one pass (every chunk reads every weight once more)
    assert p.admit(batch=1, width=400, available_s=100.0).chunks == 1
    # GIVEN some: equal chunks larger than 1 s, fewer than 1 s chunks would take
    plan = p.admit(batch=1, width=1000, available_s=18.0)
    assert 1 < plan.chunks < 1000 / p.chunk_tokens(1) and plan.estimated_s < p.prompt_seconds(1, 1000)
    # THEN every chunk starts with at least twice its estimate left: it could run twice as slow and end in time
    costs = p.chunk_costs(1, 1000, chunk=plan.chunk_tokens)
    assert sum(costs) == pytest.approx(plan.estimated_s)
    for i, cost in enumerate(costs):
        assert sum(costs[:i]) + CHUNK_SLOWDOWN * cost <= 18.0
    # AND one chunk fewer would not have left that much time for one of them
    fewer = p.chunk_costs(1, 1000, chunk=-(-1000 // (plan.chunks - 1)))
    assert any(sum(fewer[:i]) + CHUNK_SLOWDOWN * cost > 18.0 for i, cost in enumerate(fewer))


def test_a_prompt_is_not_refused_for_the_cost_of_chunks_smaller_than_its_time_allows():
    # GIVEN a model whose every pass costs 0.2 s before its rows (so 0.25 s chunks hold 20 rows, and 1,000
    # tokens in them take 12.5 s), and 6.5 s left for a prompt whose one pass takes 2.7 s
    cost = CostModel.linear(fixed_s=0.2, per_row_s=0.0025, per_row_ctx_s=0.0)
    p = Planner(2048, 0.0, chunk_seconds=0.25, cost=cost)
    assert p.prompt_seconds(1, 1000) > 12 and p.estimate_pass(1, 0, 1000) == pytest.approx(2.7)
    # WHEN it is asked for
    plan = p.admit(batch=1, width=1000, available_s=6.5)
    # THEN it is admitted, in chunks whose sum fits and the last of which could run twice as slow
    assert plan.estimated_s <= 6.5
    assert plan.estimated_s + (CHUNK_SLOWDOWN - 1) * p.estimate_pass(1, 0, plan.chunk_tokens) <= 6.5


def test_the_cost_model_follows_a_kernel_switch_that_one_line_cannot():
    # GIVEN passes timed on a model whose kernel costs 90 ms per row up to 64 rows, and 50 ms per row beyond
    # (as the int8 format's two kernels do), plus 0.25 s per pass
    def truth(rows: int) -> float:
        return 0.25 + 0.09 * min(rows, 64) + 0.05 * max(rows - 64, 0)

    samples = [PassSample(1, 0, t, truth(t)) for t in (1, 16, 64, 256)] + [PassSample(4, 0, 64, truth(256))]
    # WHEN a cost model is fitted through them
    fitted = CostModel.fit(samples, attention_ratio=0.0)
    # THEN it predicts passes on both sides of the switch
    for rows in (1, 8, 32, 64, 128, 256):
        assert fitted.seconds(1, 0, rows) == pytest.approx(truth(rows), rel=1e-9)
    # AND far beyond the largest timed one it stays close, on the slow side
    assert truth(2048) < fitted.seconds(1, 0, 2048) < 1.25 * truth(2048)


def test_the_fastest_timing_of_a_shape_is_the_one_kept():
    # GIVEN calibration rounds in which a burst of other work made some passes ten times slower
    clean = [PassSample(1, 0, t, COST.seconds(1, 0, t)) for t in (1, 16, 64, 256)]
    skewed = [PassSample(s.batch, s.start, s.tokens, 10 * s.seconds) for s in clean[1:3]]
    # WHEN both rounds are fitted
    fitted = CostModel.fit(skewed + clean, attention_ratio=0.0)
    # THEN the model is the clean one
    for tokens in (8, 100, 250):
        assert fitted.seconds(1, 0, tokens) == pytest.approx(COST.seconds(1, 0, tokens))


def test_between_chunks_a_slower_than_estimated_pass_gives_up_early():
    # GIVEN an admitted plan, then chunks that run 3x slower than estimated
    p = planner()
    plan = p.admit(batch=1, width=400, available_s=6.0)
    for _ in range(2):
        p.learn(PassSample(1, 0, plan.chunk_tokens, 3 * COST.seconds(1, 0, plan.chunk_tokens)))
    # WHEN the rest is checked with the time that is left
    with pytest.raises(PromptTooLongForDeadline):
        p.check_rest(plan, done=2 * plan.chunk_tokens, available_s=6.0 - 2 * 3 * 0.95)


def test_between_chunks_this_requests_own_slowness_counts_before_the_average_learns_it():
    # GIVEN a plan of a few chunks, whose first chunk ran 1.5x slower than estimated (the moving average
    # moves only part of the way towards it)
    p = planner()
    plan = p.admit(batch=1, width=400, available_s=6.0)
    assert plan.chunks > 1
    spent = 1.5 * p.estimate_pass(1, 0, plan.chunk_tokens)
    p.learn(PassSample(1, 0, plan.chunk_tokens, spent))
    assert p.prompt_seconds(1, 400, start=plan.chunk_tokens, chunk=plan.chunk_tokens) < 6.0 - spent
    # WHEN the rest is checked with this request's time so far
    # THEN it gives up: at this request's speed the rest cannot fit
    with pytest.raises(PromptTooLongForDeadline):
        p.check_rest(plan, done=plan.chunk_tokens, available_s=6.0 - spent, spent_s=spent)


def test_warm_up_rescales_the_calibrated_speeds_to_this_cpu():
    p = planner()
    p.rescale(PassSample(1, 0, 32, 2 * COST.seconds(1, 0, 32)))
    assert p.estimate_pass(1, 0, 100) == pytest.approx(2 * COST.seconds(1, 0, 100))


def test_warm_up_moves_the_cost_of_reading_weights_and_of_rows_separately():
    # GIVEN speeds calibrated on a machine with fast memory and slow arithmetic, and a CPU the other way round
    # (a decode step 4x slower, every row 3x faster)
    here = CostModel.linear(fixed_s=0.2, per_row_s=0.001, per_row_ctx_s=0.0)
    p = planner()
    # WHEN warm-up times a decode step and a short prompt pass there
    p.rescale(PassSample(1, 0, 32, here.seconds(1, 0, 32)), decode_step_s=here.seconds(1, 0, 1))
    # THEN prompts of every length are estimated at that CPU's speeds, and a decode step too
    for tokens in (1, 64, 512, 2048):
        assert p.estimate_pass(1, 0, tokens) == pytest.approx(here.seconds(1, 0, tokens))
    assert p.decode_step_s(1) == pytest.approx(here.seconds(1, 0, 1))


def test_calibration_round_trips_and_a_foreign_file_is_ignored(tmp_path):
    calibration = Calibration(samples=[PassSample(1, 0, 32, 0.5)], threads=2, cpu={"isa": "avx2"})
    calibration.save(tmp_path)
    assert Calibration.read(tmp_path) == calibration
    (tmp_path / "calibration.json").write_text('{"version": 99}')
    assert Calibration.read(tmp_path) is None


# -- on a real model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir) -> TransformersGenerator:
    # warmup=True: the generator times a short pass, as it does at every cold start
    return TransformersGenerator.load(smollm2_dir, warmup=True, chunk_seconds=0.25)


def test_warm_up_measures_speeds_on_this_cpu(smol):
    speeds = smol.planner.describe()
    assert speeds["calibrated"] is True
    assert speeds["prompt_tokens_per_second"] > 0 and speeds["decode_step_seconds"] > 0


def test_a_prompt_that_cannot_be_read_in_time_is_refused_before_any_compute(smol):
    # GIVEN a prompt the measured speed says takes several times the time left
    prompt = "word " * 1500
    available = smol.planner.prompt_seconds(1, 1500) / 4
    smol.last_passes = []
    # WHEN it is asked for
    started = time.monotonic()
    with pytest.raises(PromptTooLongForDeadline) as refused:
        smol.generate([prompt], GenerationParams(max_new_tokens=4), time.monotonic() + available)
    # THEN it is refused at once: no forward pass ran, and the answer names a smaller prompt that fits
    assert smol.last_passes == []
    assert time.monotonic() - started < available
    assert 0 < refused.value.largest_prompt_tokens < 1500


def test_a_prompt_pass_that_turns_out_slower_stops_between_chunks(smol):
    # GIVEN a request admitted on the measured speed with too little time for one pass (1.9x its estimate:
    # one pass needs twice, so it is read in chunks), then a CPU that is 4x slower than measured and estimated
    prompt = "word " * 1200
    tokens = smol.count_tokens(prompt)
    # (at the admission speed, which earlier tests' requests may have left below the current one)
    budget = 1.9 * smol.planner.estimate_pass(1, 0, tokens, admission=True)
    plan = smol.planner.plan(1, tokens, budget)
    assert plan is not None and plan.chunks > 1
    chunk_s = smol.planner.estimate_pass(1, 0, plan.chunk_tokens)
    slow = {"on": False}

    def slower(module, args, kwargs, output):
        # 4x this pass, and 4x its estimate (on a busy machine the estimate may be well above the pass)
        if slow["on"]:
            took = time.monotonic() - began[0]
            time.sleep(max(3 * took, 4 * chunk_s - took))

    began = [0.0]
    pre = smol.model.register_forward_pre_hook(lambda *a, **k: began.__setitem__(0, time.monotonic()))
    post = smol.model.register_forward_hook(slower, with_kwargs=True)
    try:
        slow["on"] = True
        started = time.monotonic()
        # WHEN it runs
        with pytest.raises(PromptTooLongForDeadline):
            smol.generate([prompt], GenerationParams(max_new_tokens=4), started + budget)
        elapsed = time.monotonic() - started
    finally:
        slow["on"] = False
        pre.remove()
        post.remove()
    # THEN it gave up between chunks, as soon as this request's own chunks showed the rest could not fit:
    # after the first, before the deadline plus one (slowed) chunk
    assert len([s for s in smol.last_passes if s.tokens > 1]) == 1
    assert elapsed < budget + 4 * chunk_s + 0.5


def test_a_cached_prefix_is_not_counted_admission_and_chunks_cover_only_the_rest():
    p = planner()
    # GIVEN 1,000 prompt tokens, 900 of them cached (about 1 s of reading left, instead of 10)
    assert p.plan(batch=1, width=1000, available_s=3.0) is None
    # WHEN admitted with its cached prefix
    plan = p.admit(batch=1, width=1000, available_s=3.0, start=900)
    # THEN the plan reads tokens 900..1000 only, and its estimate is theirs
    assert plan.start == 900 and plan.chunks == -(-100 // plan.chunk_tokens)
    assert plan.estimated_s == pytest.approx(p.prompt_seconds(1, 1000, start=900, chunk=plan.chunk_tokens))
    # AND between chunks this request's speed is judged on what it read, not on the cached part
    spent = p.prompt_seconds(1, 900 + plan.chunk_tokens, start=900, chunk=plan.chunk_tokens)
    p.check_rest(plan, done=900 + plan.chunk_tokens, available_s=3.0 - spent, spent_s=spent)


def test_with_time_to_spare_the_prompt_is_read_in_one_pass_even_where_chunks_look_a_little_cheaper():
    # GIVEN a cost model from noisy timings, in which 256 rows cost less than half of 512 (two 256-token chunks
    # are estimated 10 % cheaper than one 512-token pass, though each chunk reads every weight again)
    cost = CostModel(rows=(1, 256, 512), matmul_s=(0.2, 4.5, 10.0), tail_per_row_s=0.02, per_row_ctx_s=0.0)
    p = Planner(2048, 0.0, chunk_seconds=1.0, cost=cost)
    assert 2 * p.estimate_pass(1, 0, 256) < p.estimate_pass(1, 0, 512)
    # WHEN a 512-token prompt has a far deadline THEN it is one pass: chunks only where the deadline needs them
    assert p.admit(batch=1, width=512, available_s=600.0).chunks == 1
    # AND with less time than one pass could take twice, it is cut into the fewest chunks that fit
    tight = p.admit(batch=1, width=512, available_s=15.0)
    assert tight.chunks == 2
