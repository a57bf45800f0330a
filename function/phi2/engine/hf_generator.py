"""Load a prepared model with transformers and generate with it: batching, stopping, deadlines, streaming.

Generation is transformers' own `generate` loop (its chunked prefill, cache and batching), steered through
its extension points: logits processors (penalties, per-row seeded sampling, log-probabilities: see
sampling.py), one stopping criterion that turns each step's tokens into text and events (detokenizer.py)
and ends rows, and forward hooks that time every pass for the planner and stop the prompt pass between
chunks when the rest can no longer finish before the deadline (planner.py).
"""

from __future__ import annotations

import os

# Serving never talks to a hub: everything comes from the prepared directory. Set before the
# Hugging Face libraries read their configuration at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import contextlib
import logging
import secrets
import time
from collections.abc import Hashable, Sequence
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from phi2.engine import cpu, formats, memory
from phi2.engine.constrained.grammar import Grammar
from phi2.engine.constrained.matcher import Constraint, GrammarCompiler
from phi2.engine.detokenizer import TextStream
from phi2.engine.generator import (
    Completion,
    GenerationParams,
    GenerationResult,
    Generator,
    ModelInfo,
    OnStep,
    TokenLogprob,
)
from phi2.engine.hooks import Passes, Row, Steps
from phi2.engine.lookup import DraftStats
from phi2.engine.lookup import drafting as lookup_drafting
from phi2.engine.memory import KvShape
from phi2.engine.model_files import read_manifest, verify
from phi2.engine.planner import MAX_CHUNK_ROWS, Calibration, CostModel, PassSample, Planner
from phi2.engine.prefix_cache import DEFAULT_TTL_S, PrefixCache, cache_rows
from phi2.engine.sampling import LogitBias, LogprobRecorder, PresenceFrequencyPenalty, SeededSampler
from phi2.errors import ContextLengthExceeded, ModelLoadError, PromptTooLongForDeadline

log = logging.getLogger(__name__)
# Progress bars are for terminals; in Lambda they are only noise in the logs.
transformers.utils.logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_cpus() -> int:
    """vCPUs this process may run on (Lambda: about one per 1,769 MB of memory)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(num_threads: int | None) -> int:
    """Size torch's pools once: intra-op to the vCPUs, inter-op to one (decode is one op stream)."""
    threads = num_threads or available_cpus()
    torch.set_num_threads(threads)
    # Only allowed once per process, before any parallel work: a second load keeps the first setting.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return threads


def _loading(what: str, model_dir: Path, load, **kwargs):
    """Call a transformers loader on the prepared directory, offline and without remote code; any failure
    becomes a ModelLoadError that names the part that failed."""
    try:
        return load(model_dir, local_files_only=True, trust_remote_code=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the part is unusable
        raise ModelLoadError(f"{what} in {model_dir.name} failed to load: {type(exc).__name__}: {exc}") from None


# The warm-up check times a pass of this many prompt tokens and a few decode steps: long enough to be
# measured (a calibrated shape), short enough for the init phase.
CHECK_PROMPT_TOKENS = 16
CHECK_DECODE_STEPS = 4
# What preparation times: a decode-sized pass, prompt passes of growing size, the largest as a batch.
# Up to 1,024 rows: the lengths that API Gateway's 29 s allow on 6 vCPUs are measured, not extrapolated.
CALIBRATION_SHAPES = ((1, 1), (1, 16), (1, 64), (1, 256), (2, 512))
# Prompt lookup: drafted tokens verified per pass (transformers' `prompt_lookup_num_tokens`).
DEFAULT_LOOKUP_TOKENS = 5
# Processors that are functions of the sequence alone, so calling them for drafted tokens that are then
# rejected changes nothing (prompt lookup calls them so): the penalties and logit bias. Log-probabilities,
# sampling and anything else (a grammar) keep prompt lookup off.
STATELESS_PROCESSORS = (RepetitionPenaltyLogitsProcessor, PresenceFrequencyPenalty, LogitBias)


class TransformersGenerator(Generator):
    """A causal LM served with transformers on the CPU."""

    def __init__(self, model, tokenizer, info: ModelInfo, planner: Planner | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        # Padding is a batching concept the model never sees (the attention mask hides it), so any
        # id works; the end-of-text token is the conventional choice when there is no pad token.
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # Left padding keeps every prompt's last token in the final column, where generation continues.
        tokenizer.padding_side = "left"
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.planner = planner or Planner(info.context_length, attention_ratio(model))
        self.last_passes: list[PassSample] = []
        # What one token of context costs in the KV cache (the compute dtype: load() sets it for int8 weights)
        self.kv = KvShape.of(model.config, bytes_per_value=model.dtype.itemsize)
        self.prefix_cache: PrefixCache | None = None
        """Earlier requests' prompt passes, per caller (load() sets it up after the warm-up); None: off."""
        self.lookup_tokens = 0
        """Drafted tokens per verification pass of prompt lookup; 0: off."""
        self.last_drafts: DraftStats | None = None
        self._byte_decoder = _byte_decoder(tokenizer)
        self.grammars = GrammarCompiler(tokenizer, self.vocab_size, self.eos_ids)
        """Constrained decoding: grammars compiled against this vocabulary (llguidance's view of it: on first use)."""

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        dtype: str = "auto",
        num_threads: int | None = None,
        warmup: bool = True,
        verify_checksums: bool = False,
        chunk_seconds: float = 1.0,
        prompt_cache: bool = True,
        prompt_cache_mb: int | None = None,
        prompt_cache_ttl_s: float = DEFAULT_TTL_S,
        lookup_tokens: int | None = None,
    ):
        """Load the model and tokenizer prepared in `model_dir`; raise ModelLoadError naming the problem.

        With `warmup`, a short generation pays the kernels' one-time set-up, and a timed pass checks the
        calibrated speeds on this CPU (see planner.py). Then the prompt cache is sized from the memory the
        loaded model leaves (prefix_cache.py; `prompt_cache_mb` caps it) and prompt lookup is switched on
        (`lookup_tokens` drafted tokens per pass, default DEFAULT_LOOKUP_TOKENS; 0: off).
        """
        started = time.monotonic()
        manifest = read_manifest(model_dir)
        verify(model_dir, manifest, checksums=verify_checksums)
        quantized = formats.is_quantized(manifest.format)
        # The quantized formats fix their own precisions (int8/4-bit weights, fp32 compute): MODEL_DTYPE does not
        # apply.
        dtype_name = manifest.dtype if dtype == "auto" or quantized else dtype
        if dtype_name not in DTYPES:
            raise ModelLoadError(f"unsupported dtype {dtype_name!r}; use one of {sorted(DTYPES)}")
        threads = configure_threads(num_threads)
        config = _loading("config.json", model_dir, AutoConfig.from_pretrained)
        tokenizer = _loading("the tokenizer", model_dir, AutoTokenizer.from_pretrained)
        if quantized:
            try:
                model = formats.load(model_dir, config, manifest.format)
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(
                    f"the {manifest.format} weights in {model_dir.name} failed to load: {type(exc).__name__}: {exc}"
                ) from None
        else:
            model = _loading(
                "the weights",
                model_dir,
                AutoModelForCausalLM.from_pretrained,
                config=config,
                dtype=DTYPES[dtype_name],
                use_safetensors=True,
            )
        model.eval()
        vocab = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            raise ModelLoadError(
                f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab} rows: "
                "they belong to different models"
            )
        context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        info = ModelInfo(
            model_id=manifest.model_id,
            dtype=f"{manifest.format} weights, {dtype_name} compute" if quantized else dtype_name,
            context_length=context,
            load_seconds=0.0,
            manifest=manifest.summary(),
            cpu=cpu.describe(),
            kernels=formats.kernels_in_use(model),
            chat_template=bool(getattr(tokenizer, "chat_template", None)),
            vocab_size=model.get_output_embeddings().weight.shape[0],
        )
        ratio = attention_ratio(model)
        calibration = Calibration.read(model_dir)
        cost = CostModel.fit(calibration.samples, ratio) if calibration and calibration.samples else None
        planner = Planner(context, ratio, chunk_seconds=chunk_seconds, cost=cost)
        generator = cls(model, tokenizer, info, planner)
        if quantized:
            generator.kv = KvShape.of(model.config, bytes_per_value=4)  # int8 weights, fp32 activations and cache
        if warmup:
            generator.check_speed()
        generator.lookup_tokens = DEFAULT_LOOKUP_TOKENS if lookup_tokens is None else max(0, lookup_tokens)
        if prompt_cache:
            generator.prefix_cache = PrefixCache.for_model(
                generator.kv, model.config, context, max_mb=prompt_cache_mb, ttl_s=prompt_cache_ttl_s
            )
            if not generator.prefix_cache.enabled:
                log.warning("prompt cache off", extra={"reason": generator.prefix_cache.off_reason})
        info.load_seconds = time.monotonic() - started
        log.info(
            "model loaded",
            extra={"model_id": info.model_id, "dtype": dtype_name, "threads": threads, "cpu": info.cpu},
        )
        return generator

    def check_speed(self) -> None:
        """Pay the kernels' one-time set-up, then time a short prompt pass and a few decode steps and move
        the planner's speeds to this CPU."""
        far = time.monotonic() + 3600
        prompt = self.tokenizer.decode(list(range(1000, 1000 + CHECK_PROMPT_TOKENS)))
        # The first pass of each shape pays one-time set-up (oneDNN primitives, allocator pools) and, at a
        # cold start, the first read of every weight: an untimed run of the same shapes, then one timed run
        # (a second timed run moved the estimate by under 10 % and cost 3.5 s of cold start on int8 Phi-2).
        self.generate([prompt], GenerationParams(max_new_tokens=2, do_sample=False), far)
        self.generate([prompt], GenerationParams(max_new_tokens=CHECK_DECODE_STEPS + 1, do_sample=False), far)
        prompt_passes = [s for s in self.last_passes if s.tokens > 1]
        steps = [s.seconds for s in self.last_passes if s.tokens == 1]
        decode_step = sorted(steps)[len(steps) // 2] if steps else None
        if prompt_passes:
            self.planner.rescale(min(prompt_passes, key=lambda s: s.seconds), decode_step)
        elif decode_step:
            self.planner.set_decode_step(decode_step)

    def calibrate(self, shapes: Sequence[tuple[int, int]] = CALIBRATION_SHAPES) -> Calibration:
        """Time one forward pass per (batch, tokens) shape, after an untimed one, in two rounds: the speeds that
        preparation stores beside the model (`calibration.json`) for the planner, which keeps the fastest of
        each shape (a burst of other work on the preparing machine rarely hits both rounds)."""
        generator = torch.Generator().manual_seed(0)
        low, high = 1000, min(self.vocab_size, len(self.tokenizer))

        def run(batch: int, tokens: int) -> float:
            ids = torch.randint(low, high, (batch, tokens), generator=generator)
            began = time.monotonic()
            with torch.inference_mode():
                self.model(input_ids=ids, logits_to_keep=1)
            return time.monotonic() - began

        run(1, 8)
        samples = [PassSample(batch, 0, tokens, run(batch, tokens)) for _ in range(2) for batch, tokens in shapes]
        return Calibration(samples=samples, threads=torch.get_num_threads())

    def check_grammar(self, grammar: Grammar) -> None:
        self.grammars.compile(grammar)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def speeds(self) -> dict[str, object]:
        return self.planner.describe()

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        return [self._decode([token]) for token in token_ids]

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        pieces = self.tokenizer.convert_ids_to_tokens(list(token_ids))
        out = []
        for token, piece in zip(token_ids, pieces, strict=True):
            if self._byte_decoder and piece is not None and all(c in self._byte_decoder for c in piece):
                out.append(bytes(self._byte_decoder[c] for c in piece))
            else:
                out.append(self._decode([token]).encode("utf-8"))
        return out

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not self.info.chat_template:
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def generate(
        self,
        prompts: list[str],
        params: GenerationParams,
        deadline: float,
        *,
        seeds: Sequence[int] | None = None,
        on_step: OnStep | None = None,
        cache_scope: Hashable | None = None,
    ) -> GenerationResult:
        start = time.monotonic()
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        prompt_lengths = attention_mask.sum(dim=1).tolist()
        batch, width = input_ids.shape
        if width + params.max_new_tokens > self.info.context_length:
            raise ContextLengthExceeded(width, params.max_new_tokens, self.info.context_length)

        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        row_seeds = list(seeds) if seeds is not None else [seed] * batch
        if len(row_seeds) != batch:
            raise ValueError(f"{len(row_seeds)} seeds for {batch} prompts")
        recorder = LogprobRecorder() if params.logprobs is not None else None
        # A grammar is compiled (or taken from the cache) before admission: its time counts against the deadline
        constraint = self.grammars.constraint(params.grammar, batch) if params.grammar is not None else None
        processors = self._processors(params, width, row_seeds, recorder, constraint)
        # One prompt, alone or as `n` rows (no padding, every row at the same positions): its rows share one
        # prompt pass, and a known caller's earlier passes. Prompt log-probabilities need every position read.
        one_prompt = not params.prompt_logprobs and bool((input_ids == input_ids[:1]).all())
        shared = one_prompt and batch > 1
        lookup = self._lookup_tokens(params, batch, processors)
        prefix = self.prefix_cache
        if prefix is not None:
            prefix.make_room(self._working_set(batch, width, params.max_new_tokens))  # the live request wins
        # Memory admission: refused with a 4xx now rather than killed by Lambda's memory limit mid-request
        memory.check_fits(
            self._request_bytes(batch, width, params.max_new_tokens, params.prompt_logprobs),
            evictable=prefix.bytes if prefix is not None else 0,
        )
        scope = cache_scope if prefix is not None and prefix.enabled and one_prompt else None
        reuse = prefix.take(scope, input_ids[0]) if scope is not None else None
        cached = reuse.tokens if reuse is not None else 0
        try:
            plan = self.planner.admit(1 if shared else batch, width, deadline - time.monotonic(), start=cached)
        except PromptTooLongForDeadline:
            if reuse is not None and reuse.moved:
                prefix.put(scope, input_ids[0, :cached], reuse.cache)
            raise
        if on_step is not None and not on_step([]):
            # Admitted: a stream sends its first bytes now, before the prompt pass. A caller already gone
            # costs nothing more.
            if reuse is not None and reuse.moved:
                prefix.put(scope, input_ids[0, :cached], reuse.cache)
            return self._nothing(prompts, prompt_lengths, input_ids, start)

        rows = [Row(TextStream(self.tokenizer, params.stop)) for _ in prompts]
        steps = Steps(
            self.planner,
            self.eos_ids,
            rows,
            params,
            deadline,
            start,
            recorder,
            on_step,
            width=width,
            step_tokens=lookup + 1 if lookup else 1,
            constraint=constraint,
        )
        passes = Passes(self.planner, plan, deadline, input_ids, params.logprobs if params.prompt_logprobs else None)
        # Our own cache object when it is read before `generate` (shared rows, prompt lookup) or kept after it
        past = reuse.cache if reuse is not None else None
        if past is None and (scope is not None or shared or lookup):
            past = DynamicCache(config=self.model.config)
        read_first = shared or bool(lookup)
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            # Sampling, when asked for, is done by SeededSampler, which leaves one candidate per row.
            do_sample=False,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            prefill_chunk_size=plan.chunk_tokens if plan.chunks > 1 and not read_first else None,
            prompt_lookup_num_tokens=lookup or None,
        )
        extra = {"logits_to_keep": 0} if params.prompt_logprobs else {}
        if past is not None:
            extra["cache"] = past
        hooks = [
            self.model.register_forward_pre_hook(passes.before, with_kwargs=True),
            self.model.register_forward_hook(passes.after, with_kwargs=True),
        ]
        sequences, drafts = None, []
        drafting = lookup_drafting(self.model, lookup) if lookup else contextlib.nullcontext([])
        try:
            with torch.inference_mode(), drafting as drafts:
                if read_first:
                    # All but the last prompt token, once for every row; `generate` reads the last one (per row,
                    # or with prompt lookup's first drafted tokens, whose pass must not read the rest again).
                    self._read(past, input_ids[:1], cached, width - 1, plan.chunk_tokens)
                    if shared:
                        past.batch_repeat_interleave(batch)
                    passes.skip_cached = bool(lookup)
                sequences = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=processors,
                    stopping_criteria=StoppingCriteriaList([steps]),
                    **extra,
                )
        except PromptTooLongForDeadline:
            # Between chunks: what was read is kept, so the same prompt sent again starts after it.
            if scope is not None and cache_rows(past) == 1:
                prefix.put(scope, input_ids[0, : past.get_seq_length()], past)
            raise
        finally:
            for hook in hooks:
                hook.remove()
            self.last_passes = passes.samples
            self.last_drafts = drafts[0].stats if lookup and drafts else None
            if constraint is not None and constraint.seconds_per_row_mask is not None:
                self.planner.learn_mask(constraint.seconds_per_row_mask)
        if scope is not None:
            self._keep(scope, sequences, past)
        end = time.monotonic()

        completions = []
        for index, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
            if row.finish is None:  # generate ended without our criterion ending the row (max length)
                row.finish = "length"
                row.stream.finish()
            prompt_ids = input_ids[index, width - prompt_lengths[index] :].tolist()
            completions.append(
                Completion(
                    text=(prompt if params.return_full_text else "") + row.stream.text,
                    finish_reason=row.finish,
                    prompt_tokens=prompt_lengths[index],
                    generated_tokens=len(row.ids),
                    token_ids=tuple(row.ids),
                    logprobs=tuple(row.logprobs) if recorder is not None else None,
                    prompt_token_ids=tuple(prompt_ids),
                    prompt_logprobs=self._prompt_logprobs(passes, index, prompt_lengths[index])
                    if params.prompt_logprobs
                    else None,
                    seed=row_seeds[index],
                    grammar_complete=constraint.complete(index) if constraint is not None else None,
                    cached_tokens=cached,
                )
            )
        first = steps.first_token_at or end
        decode_tokens = max(0, steps.tokens - steps.first_tokens)
        decode_time = steps.last_token_at - first
        return GenerationResult(
            completions=completions,
            seed=seed,
            time_to_first_token_s=first - start,
            total_s=end - start,
            tokens_per_second=(decode_tokens / decode_time) if decode_time > 0 else 0.0,
            prompt_pass_s=passes.prefill_s,
            prompt_chunks=passes.chunks,
        )

    def _read(self, cache: DynamicCache, ids: torch.Tensor, begin: int, end: int, chunk: int) -> None:
        """The prompt pass over tokens `begin`..`end` of one row into `cache`, in the plan's chunks (the hooks
        time each and stop between them when the rest cannot make the deadline)."""
        for position in range(begin, end, chunk):
            self.model(input_ids=ids[:, position : min(position + chunk, end)], cache=cache, logits_to_keep=1)

    def _keep(self, scope: Hashable, sequences: torch.Tensor, past: DynamicCache) -> None:
        """Keep this request's KV cache for its caller: one row (all rows hold the same prompt), keyed by the
        tokens it holds (the prompt and the generated tokens fed back; never the last one)."""
        held = past.get_seq_length()
        if held == 0 or held > sequences.shape[1]:
            return
        if cache_rows(past) > 1:
            past.batch_select_indices(torch.tensor([0]))
        self.prefix_cache.put(scope, sequences[0, :held], past)

    def _working_set(self, batch: int, width: int, new_tokens: int) -> int:
        """Bytes a request may need besides the model: its KV cache at full length, and the largest pass's
        activations (a layer's attention scores over the context, the MLP, the residual stream)."""
        return self._request_bytes(batch, width, new_tokens).total

    def _request_bytes(self, batch: int, width: int, new_tokens: int, all_logits: bool = False) -> memory.RequestBytes:
        rows = batch * min(width, MAX_CHUNK_ROWS // batch or 1)
        return memory.request_bytes(self.kv, self.model.config, batch, width, new_tokens, rows, all_logits)

    def _lookup_tokens(self, params: GenerationParams, batch: int, processors: LogitsProcessorList) -> int:
        """Drafted tokens per verification pass for prompt lookup, or 0 where it would not be exact: it needs
        greedy decoding of one row, and processors that are functions of the sequence alone (transformers calls
        them for drafted tokens it then rejects, and for a draft's tokens several at a time)."""
        if not self.lookup_tokens or batch != 1 or params.do_sample or params.logprobs is not None:
            return 0
        if params.prompt_logprobs or not all(type(p) in STATELESS_PROCESSORS for p in processors):
            return 0
        return self.lookup_tokens

    def _nothing(self, prompts: list[str], prompt_lengths: list[int], input_ids, start: float) -> GenerationResult:
        """The result of a generation cancelled before it started."""
        width = input_ids.shape[1]
        completions = [
            Completion(
                text="",
                finish_reason="cancelled",
                prompt_tokens=length,
                generated_tokens=0,
                prompt_token_ids=tuple(input_ids[row, width - length :].tolist()),
            )
            for row, length in enumerate(prompt_lengths)
        ]
        elapsed = time.monotonic() - start
        return GenerationResult(
            completions, seed=0, time_to_first_token_s=elapsed, total_s=elapsed, tokens_per_second=0.0
        )

    def _processors(
        self,
        params: GenerationParams,
        width: int,
        seeds: list[int],
        recorder: LogprobRecorder | None,
        constraint: Constraint | None = None,
    ) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if recorder is not None:
            processors.append(recorder)  # first: log-probabilities of the model's own distribution
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if params.presence_penalty or params.frequency_penalty:
            processors.append(
                PresenceFrequencyPenalty(params.presence_penalty, params.frequency_penalty, width, self.vocab_size)
            )
        if params.logit_bias:
            processors.append(LogitBias(params.logit_bias))
        if constraint is not None:
            # Before every sampling control: top-k/top-p/min-p then choose among allowed tokens only (after them,
            # top-p could keep no allowed token at all); after the recorder: logprobs stay the model's own.
            processors.append(constraint)
        if params.do_sample:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            if params.min_p > 0.0:
                processors.append(MinPLogitsWarper(params.min_p))
            if params.typical_p < 1.0:
                processors.append(TypicalLogitsWarper(params.typical_p))
            processors.append(SeededSampler(seeds))
        return processors

    def _prompt_logprobs(self, passes: Passes, row: int, length: int) -> tuple[TokenLogprob | None, ...]:
        width = passes.plan.width
        ids = passes.input_ids[row]
        out: list[TokenLogprob | None] = [None]
        for column in range(width - length + 1, width):
            top = passes.prompt_top[row][column] if passes.prompt_top else ()
            out.append(TokenLogprob(int(ids[column]), float(passes.prompt_logprobs[row, column]), top))
        return tuple(out)


def attention_ratio(model) -> float:
    """Attention's FLOPs per context position relative to a token's matmul FLOPs (see planner.CostModel)."""
    config = model.config
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    hidden = int(getattr(config, "hidden_size", 1) or 1)
    linear = sum(
        module.in_features * module.out_features
        for module in model.modules()
        if hasattr(module, "in_features") and hasattr(module, "out_features")
    )
    return (4 * layers * hidden) / (2 * max(1, linear))


def _byte_decoder(tokenizer) -> dict[str, int] | None:
    """Byte-level BPE's map from a token's characters back to its bytes (GPT-2, CodeGen, SmolLM2), if used."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = tokenizer.get_vocab()
    decoder = {char: byte for byte, char in bytes_to_unicode().items()}
    # A byte-level vocabulary spells a leading space as "Ġ"; others do not use this alphabet throughout.
    if any(token.startswith("\u0120") for token in list(vocab)[:5000]):
        return decoder
    return None
