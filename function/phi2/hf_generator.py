"""Load a prepared model with transformers and generate with it: batching, stopping, deadlines."""

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
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
)

from . import quantization
from .errors import ContextLengthExceeded, ModelLoadError
from .generator import Completion, GenerationParams, GenerationResult, Generator, ModelInfo
from .model_files import read_manifest, verify

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


class _Monitor(StoppingCriteria):
    """Called by `generate` after every new token: records timings, ends rows that hit a stop string,
    and ends the whole batch when the next token would miss the deadline."""

    def __init__(self, tokenizer, prompt_width: int, stop: tuple[str, ...], deadline: float, start: float):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stop = stop
        # Enough trailing tokens to contain the longest stop string (a token is at least one byte).
        self.tail = max((len(s.encode()) for s in stop), default=0) + 2
        self.deadline = deadline
        self.start = start
        self.first_token_at: float | None = None
        self.last_token_at = start
        self.steps = 0
        self.timed_out = False
        self.stopped: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        now = time.monotonic()
        self.steps += 1
        self.last_token_at = now
        if self.first_token_at is None:
            self.first_token_at = now
        batch = input_ids.shape[0]
        if self.stopped is None:
            self.stopped = torch.zeros(batch, dtype=torch.bool)
        if self.stop:
            new = input_ids[:, self.prompt_width :]
            for row in range(batch):
                if not self.stopped[row]:
                    text = self.tokenizer.decode(new[row, -self.tail :], skip_special_tokens=True)
                    self.stopped[row] = any(s in text for s in self.stop)
        # Decode steps take about the same time each: stop if the next one would end past the deadline.
        per_token = (now - self.first_token_at) / (self.steps - 1) if self.steps > 1 else 0.0
        if now + per_token >= self.deadline:
            self.timed_out = True
            return torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        return self.stopped.clone().to(input_ids.device)


class TransformersGenerator(Generator):
    """A causal LM served with transformers on the CPU."""

    def __init__(self, model, tokenizer, info: ModelInfo) -> None:
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

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        dtype: str = "auto",
        num_threads: int | None = None,
        warmup: bool = True,
        verify_checksums: bool = False,
    ):
        """Load the model and tokenizer prepared in `model_dir`; raise ModelLoadError naming the problem."""
        started = time.monotonic()
        manifest = read_manifest(model_dir)
        verify(model_dir, manifest, checksums=verify_checksums)
        quantized = manifest.format == quantization.FORMAT
        # The int8 format fixes its own precisions (int8 weights, fp32 compute): MODEL_DTYPE does not apply.
        dtype_name = manifest.dtype if dtype == "auto" or quantized else dtype
        if dtype_name not in DTYPES:
            raise ModelLoadError(f"unsupported dtype {dtype_name!r}; use one of {sorted(DTYPES)}")
        threads = configure_threads(num_threads)
        config = _loading("config.json", model_dir, AutoConfig.from_pretrained)
        tokenizer = _loading("the tokenizer", model_dir, AutoTokenizer.from_pretrained)
        if quantized:
            try:
                model = quantization.load(model_dir, config)
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(
                    f"the int8 weights in {model_dir.name} failed to load: {type(exc).__name__}: {exc}"
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
            dtype=f"int8 weights, {dtype_name} compute" if quantized else dtype_name,
            context_length=context,
            load_seconds=0.0,
            manifest=manifest.summary(),
        )
        generator = cls(model, tokenizer, info)
        if warmup:
            # The first forward pass initialises oneDNN kernels and allocator pools; pay it at init.
            generator.generate(["Hello"], GenerationParams(max_new_tokens=2, do_sample=False), time.monotonic() + 60)
        info.load_seconds = time.monotonic() - started
        log.info("model loaded", extra={"model_id": info.model_id, "dtype": dtype_name, "threads": threads})
        return generator

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, prompts: list[str], params: GenerationParams, deadline: float) -> GenerationResult:
        start = time.monotonic()
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True)
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        prompt_lengths = attention_mask.sum(dim=1).tolist()
        width = input_ids.shape[1]
        if width + params.max_new_tokens > self.info.context_length:
            raise ContextLengthExceeded(width, params.max_new_tokens, self.info.context_length)

        seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
        torch.manual_seed(seed)
        monitor = _Monitor(self.tokenizer, width, params.stop, deadline, start)
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=params.do_sample,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            **(
                {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
                if params.do_sample
                else {}
            ),
        )
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([monitor]),
            )
        end = time.monotonic()

        completions = [
            self._completion(prompt, output[row, width:], prompt_lengths[row], params, monitor.timed_out)
            for row, prompt in enumerate(prompts)
        ]
        first = monitor.first_token_at or end
        decode_steps = max(0, monitor.steps - 1)
        decode_time = monitor.last_token_at - first
        return GenerationResult(
            completions=completions,
            seed=seed,
            time_to_first_token_s=first - start,
            total_s=end - start,
            tokens_per_second=(decode_steps / decode_time) if decode_time > 0 else 0.0,
        )

    def _completion(
        self, prompt: str, new_ids: torch.Tensor, prompt_tokens: int, params: GenerationParams, timed_out: bool
    ) -> Completion:
        ids = new_ids.tolist()
        finish: str = "length"
        eos_at = next((i for i, token in enumerate(ids) if token in self.eos_ids), None)
        if eos_at is not None:
            # Rows that finished early are filled with pad tokens after their end-of-text.
            ids, finish = ids[:eos_at], "eos_token"
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop_sequence"
            ids = ids[: self._tokens_until_stop(ids, params.stop)]
        elif finish == "length" and timed_out and len(ids) < params.max_new_tokens:
            finish = "time_limit"
        if params.return_full_text:
            text = prompt + text
        return Completion(text=text, finish_reason=finish, prompt_tokens=prompt_tokens, generated_tokens=len(ids))

    def _tokens_until_stop(self, ids: list[int], stop: tuple[str, ...]) -> int:
        """The fewest leading tokens whose text contains a stop string (containment only grows)."""
        low, high = 1, len(ids)
        while low < high:
            mid = (low + high) // 2
            text = self.tokenizer.decode(ids[:mid], skip_special_tokens=True)
            if any(s in text for s in stop):
                high = mid
            else:
                low = mid + 1
        return low
