"""A stand-in Generator for handler tests: no model, deterministic output, records its calls."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from phi2.errors import ContextLengthExceeded
from phi2.generator import Completion, GenerationParams, GenerationResult, Generator, ModelInfo


@dataclass
class Call:
    prompts: list[str]
    params: GenerationParams
    deadline: float
    at: float


@dataclass
class FakeGenerator(Generator):
    """Continues every prompt with " ok" and counts one token per character of the prompt."""

    context_length: int = 2048
    fail_with: Exception | None = None
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.info = ModelInfo(
            model_id="fake/model",
            dtype="float32",
            context_length=self.context_length,
            load_seconds=0.5,
            manifest={"model_id": "fake/model", "source": "test", "revision": "r1", "dtype": "float32"},
        )

    def generate(self, prompts: list[str], params: GenerationParams, deadline: float) -> GenerationResult:
        self.calls.append(Call(prompts, params, deadline, time.monotonic()))
        if self.fail_with is not None:
            raise self.fail_with
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > self.context_length:
            raise ContextLengthExceeded(longest, params.max_new_tokens, self.context_length)
        completions = [
            Completion(
                text=(p if params.return_full_text else "") + " ok",
                finish_reason="length",
                prompt_tokens=len(p),
                generated_tokens=1,
            )
            for p in prompts
        ]
        seed = params.seed if params.seed is not None else 42
        return GenerationResult(completions, seed, time_to_first_token_s=0.01, total_s=0.02, tokens_per_second=100.0)
