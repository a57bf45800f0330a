"""A stand-in Generator for handler tests: no model, deterministic output, records its calls."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from phi2.engine.generator import (
    Completion,
    GenerationParams,
    GenerationResult,
    Generator,
    ModelInfo,
    OnStep,
    StepEvent,
    TokenLogprob,
)
from phi2.errors import ContextLengthExceeded

FIRST_TOKEN_ID = 1000


@dataclass
class Call:
    prompts: list[str]
    params: GenerationParams
    deadline: float
    at: float
    seeds: Sequence[int] | None = None
    cache_scope: object = None


@dataclass
class FakeGenerator(Generator):
    """Continues every prompt with " ok" and counts one token per character of the prompt."""

    context_length: int = 2048
    fail_with: Exception | None = None
    calls: list[Call] = field(default_factory=list)
    # Streaming (on_step): the continuation as tokens, the time its prompt pass and each later step take, and
    # a failure after this many tokens. The defaults keep the one-token " ok" answer.
    tokens: tuple[str, ...] = (" ok",)
    prompt_pass_s: float = 0.0
    step_s: float = 0.0
    fail_after_tokens: int | None = None
    steps_taken: int = 0
    # A whole (non-streamed) answer: how long it takes, before it fails with `fail_with` if that is set.
    buffered_s: float = 0.0
    # The OpenAI routes: the served id, whether the tokenizer "ships" a chat template, the finish reason of a
    # buffered answer, and the log-probabilities reported (every token -0.5; alternatives -1, -2, ...).
    model_id: str = "fake/model"
    chat_template: bool = False
    finish_reason: str = "length"
    vocab_size: int = 51200  # Phi-2's: logit_bias ids past it are refused
    cached_tokens: int = 0  # reported as reused from the prompt cache for every row
    # Constrained decoding: what a request with a grammar reports (the fake does not constrain anything).
    grammar_complete: bool = True

    def __post_init__(self) -> None:
        self.info = ModelInfo(
            model_id=self.model_id,
            dtype="float32",
            context_length=self.context_length,
            load_seconds=0.5,
            manifest={"model_id": self.model_id, "source": "test", "revision": "r1", "dtype": "float32"},
            chat_template=self.chat_template,
            vocab_size=self.vocab_size,
        )

    def generate(
        self,
        prompts: list[str],
        params: GenerationParams,
        deadline: float,
        *,
        seeds: Sequence[int] | None = None,
        on_step: OnStep | None = None,
        cache_scope: object = None,
    ) -> GenerationResult:
        self.calls.append(Call(prompts, params, deadline, time.monotonic(), seeds, cache_scope))
        longest = max(len(p) for p in prompts)
        if longest + params.max_new_tokens > self.context_length:
            raise ContextLengthExceeded(longest, params.max_new_tokens, self.context_length)
        if on_step is None:
            time.sleep(self.buffered_s)
        if self.fail_with is not None:
            raise self.fail_with
        start = time.monotonic()
        if on_step is not None:
            finish, produced = self._stream(len(prompts), params, on_step)
        else:
            finish, produced = self.finish_reason, len(self.tokens)
        completions = [
            Completion(
                text=(p if params.return_full_text else "") + "".join(self.tokens[:produced]),
                finish_reason=finish,
                prompt_tokens=len(p),
                generated_tokens=produced,
                token_ids=tuple(FIRST_TOKEN_ID + i for i in range(produced)),
                logprobs=None if params.logprobs is None else self._logprobs(produced, params.logprobs),
                prompt_token_ids=tuple(ord(c) for c in p),
                prompt_logprobs=self._prompt_logprobs(p) if params.prompt_logprobs else None,
                seed=None if seeds is None else seeds[row],
                cached_tokens=self.cached_tokens,
                grammar_complete=self.grammar_complete if params.grammar is not None else None,
            )
            for row, p in enumerate(prompts)
        ]
        seed = params.seed if params.seed is not None else 42
        if on_step is None:
            return GenerationResult(
                completions, seed, time_to_first_token_s=0.01, total_s=0.02, tokens_per_second=100.0
            )
        total = time.monotonic() - start
        return GenerationResult(
            completions,
            seed,
            time_to_first_token_s=self.prompt_pass_s,
            total_s=total,
            tokens_per_second=1 / self.step_s if self.step_s else 100.0,
            prompt_pass_s=self.prompt_pass_s,
        )

    def _stream(self, rows: int, params: GenerationParams, on_step: OnStep) -> tuple[str, int]:
        """Admission (an empty step), the prompt pass, then one step per token; stops when on_step says so."""
        if not on_step([]):
            return "cancelled", 0
        time.sleep(self.prompt_pass_s)
        for i, text in enumerate(self.tokens):
            if i:
                time.sleep(self.step_s)
            if self.fail_after_tokens is not None and i == self.fail_after_tokens:
                raise RuntimeError("the fake generator failed mid-stream")
            last = i == len(self.tokens) - 1
            events = [
                StepEvent(
                    row=row,
                    token_id=FIRST_TOKEN_ID + i,
                    text=text,
                    logprob=None if params.logprobs is None else self._logprobs(i + 1, params.logprobs)[i],
                    finish_reason="length" if last else None,
                )
                for row in range(rows)
            ]
            self.steps_taken += 1
            if not on_step(events):
                return "cancelled", i + 1
        return "length", len(self.tokens)

    def _logprobs(self, produced: int, k: int) -> tuple[TokenLogprob, ...]:
        """Each generated token at -0.5, with k alternatives (ids 65, 66, ...: "A", "B", ...) at -1, -2, ..."""
        top = tuple((65 + j, -1.0 - j) for j in range(k))
        return tuple(TokenLogprob(FIRST_TOKEN_ID + i, -0.5, top) for i in range(produced))

    def _prompt_logprobs(self, prompt: str) -> tuple[TokenLogprob | None, ...]:
        return (None, *(TokenLogprob(ord(c), -1.5) for c in prompt[1:]))

    def count_tokens(self, text: str) -> int:
        return len(text)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]  # one token per character, as count_tokens counts

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in token_ids)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        # A generated token's text is its entry of `tokens`; any other id is a character (the prompt's).
        return [self._token(i) for i in token_ids]

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        return [self._token(i).encode() for i in token_ids]

    def _token(self, token_id: int) -> str:
        index = token_id - FIRST_TOKEN_ID
        return self.tokens[index] if 0 <= index < len(self.tokens) else chr(token_id)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not self.chat_template:
            return None
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
