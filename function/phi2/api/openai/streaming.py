"""`stream: true` on `/chat/completions` and `/completions`, served on the streaming surface (issue 12).

A request is checked and translated exactly as a buffered one (`serving.plan_chat` / `plan_completion` with
`streaming=True`, which lets `stream` and `stream_options` through), generated through `phi2.api.streaming`
(the first bytes at admission, generation stopped when the client goes away, errors found before the first
byte answered as the normal OpenAI-shaped error responses), and written as OpenAI streams it:
`chat.completion.chunk` objects (the first carries the assistant's role), or `text_completion` chunks; with
`stream_options.include_usage` one last chunk with no choices and the usage; then `data: [DONE]`. A failure
after the first byte is sent as OpenAI sends it, `data: {"error": {...}}`, which the SDK raises as APIError.
"""

from __future__ import annotations

from collections.abc import Sequence

from aws_lambda_powertools.event_handler import Response
from pydantic import BaseModel

from phi2 import errors
from phi2.api import serving as core
from phi2.api import streaming, streams
from phi2.api.openai import protocol as p
from phi2.api.openai import serving
from phi2.api.openai.errors import UnsupportedValue, render
from phi2.engine.generator import Generator, StepEvent

DONE = b"data: [DONE]\n\n"


def _data(chunk: BaseModel) -> bytes:
    return streams.sse_data(chunk.model_dump(mode="json"))


def chat(request: p.ChatCompletionRequest) -> Response:
    """Stream a chat completion (the route calls this when `stream` is true on the streaming surface)."""
    generator = core.model()
    plan = serving.plan_chat(request, generator, streaming=True)
    return streaming.generate(
        plan.rows,
        plan.params,
        ChatEvents(plan, generator),
        seeds=plan.seeds,
        protocol="openai_stream",
        cache_key=plan.cache_key,
    )


def completions(request: p.CompletionRequest) -> Response:
    """Stream a text completion (the route calls this when `stream` is true on the streaming surface)."""
    generator = core.model()
    plan = serving.plan_completion(request, generator, streaming=True)
    if plan.rows_per_prompt != plan.n:
        # best_of keeps the n most likely of its samples: known only once all of them are complete.
        raise UnsupportedValue("best_of", "best_of cannot be streamed: send stream: false, or best_of equal to n")
    if plan.echo and plan.logprobs is not None:
        # The prompt's log-probabilities exist only after its pass, but an echoed prompt is streamed first.
        raise UnsupportedValue("echo", "echo with logprobs cannot be streamed: send stream: false for both")
    return streaming.generate(
        plan.rows,
        plan.params,
        CompletionEvents(plan, generator),
        seeds=plan.seeds,
        protocol="openai_stream",
        cache_key=plan.cache_key,
    )


class ChatEvents:
    """A chat generation as `chat.completion.chunk` events (built by `serving.ChatChunker`)."""

    path = "/chat/completions"

    def __init__(self, plan: serving.Plan, generator: Generator) -> None:
        self.plan = plan
        self.chunker = serving.ChatChunker(plan, generator)

    def opening(self) -> bytes:
        return _data(self.chunker.first())

    def steps(self, events: list[StepEvent]) -> bytes:
        chunk = self.chunker.step(events)
        return _data(chunk) if chunk is not None else b""

    def done(self, served: core.Served) -> bytes:
        usage = _data(self.chunker.usage(served.result)) if self.plan.include_usage else b""
        return usage + DONE

    def error(self, failure: errors.ApiError, request_id: str | None) -> bytes:
        return streams.sse_data(render(failure, "POST", self.path))


class CompletionEvents:
    """A completion's rows as `text_completion` chunks: choice k*n+i is prompt k's row i."""

    path = "/completions"

    def __init__(self, plan: serving.Plan, generator: Generator) -> None:
        self.plan = plan
        self.generator = generator
        self.sent = [0] * len(plan.rows)
        """Characters of each row's completion already sent (for `logprobs.text_offset`)."""
        self.texts = [""] * len(plan.rows)
        """Each row's completion so far (whether its JSON is complete, for its last chunk)."""

    def _chunk(self, choices: list[p.CompletionChoice], usage: p.Usage | None = None) -> bytes:
        plan = self.plan
        return _data(
            p.CompletionResponse(
                id=plan.id,
                created=plan.created,
                model=plan.model,
                system_fingerprint=plan.system_fingerprint,
                choices=choices,
                usage=usage,
            )
        )

    def _index(self, row: int) -> int:
        prompt, sample = divmod(row, self.plan.rows_per_prompt)
        return prompt * self.plan.n + sample

    def opening(self) -> bytes:
        if not self.plan.echo:
            return b""
        rows = range(len(self.plan.rows))
        return self._chunk(
            [p.CompletionChoice(index=self._index(row), text=self.plan.rows[row], finish_reason=None) for row in rows]
        )

    def _logprobs(self, event: StepEvent, text: str) -> p.CompletionLogprobs | None:
        plan, lp = self.plan, event.logprob
        if plan.logprobs is None or lp is None:
            return None
        alternatives = [token for token, _ in lp.top[: plan.logprobs]]
        ids = [lp.token_id, *alternatives]
        names = dict(zip(ids, self.generator.token_strings(ids), strict=True))
        best = {names[token]: serving._finite(value) for token, value in lp.top[: plan.logprobs]}
        best.setdefault(names[lp.token_id], serving._finite(lp.logprob))
        # Offsets count from the start of the prompt, echoed or not (as the buffered answer's do).
        offset = len(plan.rows[event.row]) + self.sent[event.row] - len(text)
        return p.CompletionLogprobs(
            tokens=[names[lp.token_id]],
            token_logprobs=[serving._finite(lp.logprob)],
            top_logprobs=[best],
            text_offset=[offset],
        )

    def steps(self, events: Sequence[StepEvent]) -> bytes:
        plan = self.plan
        choices = []
        for event in events:
            # max_tokens 0: one token is generated (the generator needs one) and never shown.
            text = "" if plan.zero_tokens else event.text
            self.sent[event.row] += len(text)
            self.texts[event.row] += text
            logprobs = None if plan.zero_tokens else self._logprobs(event, text)
            finish = event.finish_reason
            if not text and logprobs is None and finish is None:
                continue
            native = ("length" if plan.zero_tokens else finish) if finish else None
            choices.append(
                p.CompletionChoice(
                    index=self._index(event.row),
                    text=text,
                    logprobs=logprobs,
                    finish_reason=serving.FINISH_REASONS[native] if native else None,
                    native_finish_reason=native,
                    json_complete=serving.parses(self.texts[event.row]) if native and plan.json_output else None,
                )
            )
        return self._chunk(choices) if choices else b""

    def done(self, served: core.Served) -> bytes:
        # The usage rule (the prompt counted once per prompt, max_tokens 0 as no tokens) is the buffered one.
        usage = self._chunk([], serving._usage(self.plan, served.result)) if self.plan.include_usage else b""
        return usage + DONE

    def error(self, failure: errors.ApiError, request_id: str | None) -> bytes:
        return streams.sse_data(render(failure, "POST", self.path))
