"""OpenAI requests -> the generator's prompts, seeds and GenerationParams; GenerationResults -> OpenAI responses.

No HTTP and no AWS here: `routes` (buffered) and the streaming surface both plan a request with `plan_chat` /
`plan_completion`, generate through `phi2.api.serving.generate`, and build their bodies with the functions below
(`chat_response`, `completion_response`, or the chunk builders for a stream).

OpenAI's conventions, where they differ from `/generate`: temperature and top_p default to 1, `temperature: 0`
decodes greedily, top_k is off unless asked for, `max_tokens` defaults to 16 on completions and to the rest of
the context on chat (the request's deadline still bounds it), and the text never includes the prompt unless
`echo` asks for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from phi2 import errors
from phi2.api.openai import chat_template
from phi2.api.openai import protocol as p
from phi2.api.openai.errors import InvalidValue, ModelNotFound, UnsupportedValue
from phi2.api.schemas import MAX_STOP_SEQUENCES, MIN_TEMPERATURE
from phi2.engine.generator import Completion, GenerationParams, GenerationResult, Generator, ModelInfo, StepEvent
from phi2.engine.generator import TokenLogprob as NativeLogprob
from phi2.runtime import invocation
from phi2.settings import get_settings

SEED_SPACE = 2**32
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's documented default for /v1/completions."""
LOGPROB_FLOOR = -9999.0
"""A log-probability of -inf (a banned token) is reported as this: JSON has no infinity."""
FINISH_REASONS: dict[str, Literal["stop", "length"]] = {
    "length": "length",
    "time_limit": "length",
    "eos_token": "stop",
    "stop_sequence": "stop",
    "cancelled": "stop",
}
"""Our finish reasons in OpenAI's vocabulary; ours stays in each choice's `native_finish_reason`."""


@dataclass(frozen=True)
class Plan:
    """A validated OpenAI request, translated: what to generate and how to answer."""

    kind: Literal["chat", "completion"]
    id: str
    created: int
    model: str
    """The model as the client named it (echoed back)."""
    prompts: tuple[str, ...]
    """The distinct prompts (completions may have several; chat has one)."""
    rows_per_prompt: int
    """Rows generated per prompt: `best_of`, else `n`."""
    n: int
    params: GenerationParams
    seeds: tuple[int, ...]
    """One per row: prompt k's row i samples with seed + i, whatever else is in the batch."""
    echo: bool = False
    logprobs: int | None = None
    """Alternatives per position the client asked to see; None: no logprobs in the answer."""
    zero_tokens: bool = False
    """`max_tokens: 0` (completions): one token is generated (the generator needs one) and dropped."""
    strip_reply: bool = False
    system_fingerprint: str | None = None
    include_usage: bool = False
    """`stream_options.include_usage` (streaming only)."""

    @property
    def rows(self) -> list[str]:
        """The generator's batch: each prompt repeated `rows_per_prompt` times."""
        return [prompt for prompt in self.prompts for _ in range(self.rows_per_prompt)]


# Checks that need no model


def _refuse_stream(request: p.CompletionRequest | p.ChatCompletionRequest, streaming: bool) -> None:
    if streaming:
        return
    if request.stream:
        where = get_settings().stream_base_url or "the streaming API (see the stack output StreamBaseUrl)"
        raise UnsupportedValue(
            "stream",
            f"stream: true is served by the streaming API: point the client's base URL at {where}. This "
            "buffered API answers stream: false (or no stream field).",
        )
    if request.stream_options is not None:
        raise InvalidValue("stream_options", "stream_options is only allowed when stream is true")


def _stops(request: p.CompletionRequest | p.ChatCompletionRequest) -> tuple[str, ...]:
    stop = request.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidValue("stop", f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    return stops


def _logit_bias(request: p.CompletionRequest | p.ChatCompletionRequest, vocab: int | None) -> tuple:
    bias = []
    for key, value in (request.logit_bias or {}).items():
        if not key.isascii() or not key.isdigit() or len(key) > 9:
            raise InvalidValue("logit_bias", f"logit_bias keys are token ids (integers as strings), not {key[:20]!r}")
        token = int(key)
        if vocab is not None and token >= vocab:
            raise InvalidValue("logit_bias", f"token id {token} is not in the model's vocabulary of {vocab}")
        bias.append((token, float(value)))
    return tuple(bias)


def check_completion(request: p.CompletionRequest, *, streaming: bool = False) -> None:
    """Refuse what a completions request asks that cannot be honoured (400 naming the field).

    `streaming`: the request is served by the streaming surface, where `stream` and `stream_options` apply.
    """
    _refuse_stream(request, streaming)
    _stops(request)
    if request.suffix:
        raise UnsupportedValue("suffix", "suffix is not supported: the model cannot insert text, only continue it")
    n = request.n or 1
    best_of = request.best_of or n
    if best_of < n:
        raise InvalidValue("best_of", f"best_of ({best_of}) must be at least n ({n})")
    prompts = 1 if isinstance(request.prompt, str) else len(request.prompt)
    if prompts * best_of > p.MAX_CHOICES:
        param = "best_of" if request.best_of and request.best_of > n else "n"
        raise InvalidValue(
            param,
            f"{prompts} prompt(s) x {param} {best_of} = {prompts * best_of} completions: at most "
            f"{p.MAX_CHOICES} are generated in one batch",
        )


def _text_of(content: str | list[p.ContentPart] | None, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise UnsupportedValue(
                f"{where}.content[{j}].type", f"content of type {part.type!r} is not supported: this is a text model"
            )
        if part.text is None:
            raise InvalidValue(f"{where}.content[{j}].text", "a text part needs its text")
        texts.append(part.text)
    return "\n".join(texts)


def chat_messages(request: p.ChatCompletionRequest) -> list[dict[str, str]]:
    """The conversation as {"role": system|user|assistant, "content", optional "name"} dicts (400 if it
    holds what a text model without tools cannot read)."""
    out = []
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role in ("tool", "function"):
            raise UnsupportedValue(
                f"{where}.role", f"{message.role} messages are not supported: this server does not call tools"
            )
        for name in ("tool_calls", "function_call", "audio", "tool_call_id"):
            if getattr(message, name):
                raise UnsupportedValue(f"{where}.{name}", f"{name} is not supported: this server does not call tools")
        content = _text_of(message.content, where)
        if content is None:
            if message.role != "assistant":
                raise InvalidValue(f"{where}.content", f"a {message.role} message needs content")
            content = message.refusal or ""
        entry = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    return out


def check_chat(request: p.ChatCompletionRequest, *, streaming: bool = False) -> None:
    """Refuse what a chat request asks that cannot be honoured (400 naming the field)."""
    _refuse_stream(request, streaming)
    _stops(request)
    chat_messages(request)
    if request.response_format is not None and request.response_format.type != "text":
        raise UnsupportedValue(
            "response_format",
            f"'response_format' of type '{request.response_format.type}' is not supported with this model: "
            "it has no constrained decoding; ask for JSON in the prompt instead",
        )
    if request.tools:
        raise UnsupportedValue("tools", "tools are not supported: this server does not call tools")
    if request.functions:
        raise UnsupportedValue("functions", "functions are not supported: this server does not call tools")
    if request.tool_choice not in (None, "none", "auto"):
        raise UnsupportedValue("tool_choice", "tool_choice may only be none or auto: there are no tools")
    if request.function_call not in (None, "none", "auto"):
        raise UnsupportedValue("function_call", "function_call may only be none or auto: there are no functions")
    if request.audio is not None or (request.modalities and request.modalities != ["text"]):
        raise UnsupportedValue("audio" if request.audio is not None else "modalities", "only text output")
    if request.store:
        raise UnsupportedValue("store", "store: true is not supported: this server stores no completions")
    if request.reasoning_effort not in (None, "none"):
        raise UnsupportedValue("reasoning_effort", "the model does not reason: reasoning_effort may only be none")
    if request.verbosity not in (None, "medium"):
        raise UnsupportedValue("verbosity", "verbosity may only be medium: the model has no verbosity control")
    if request.service_tier not in (None, "auto", "default"):
        raise UnsupportedValue("service_tier", "there is one service tier: service_tier may be auto or default")
    if request.web_search_options is not None:
        raise UnsupportedValue("web_search_options", "web search is not supported")
    if request.moderation is not None:
        raise UnsupportedValue("moderation", "moderation is not supported: no moderation model is served")
    if request.top_logprobs and not request.logprobs:
        raise InvalidValue("top_logprobs", "top_logprobs needs logprobs: true")
    if request.max_tokens == 0:
        raise InvalidValue("max_tokens", "max_tokens must be at least 1")
    if None not in (request.max_tokens, request.max_completion_tokens) and (
        request.max_tokens != request.max_completion_tokens
    ):
        raise InvalidValue("max_completion_tokens", "max_tokens and max_completion_tokens differ: send one of them")
    if (request.n or 1) > p.MAX_CHOICES:  # pragma: no cover - the schema bounds n
        raise InvalidValue("n", f"at most {p.MAX_CHOICES} choices")


# Translation


def aliases(model_id: str) -> set[str]:
    """The names this model answers to: its id and the id's last path segment, case-insensitively."""
    return {model_id.lower(), model_id.rsplit("/", 1)[-1].lower()}


def resolve_model(name: str, info: ModelInfo) -> str:
    """The served model's id for `name`, or 404 model_not_found."""
    if name.lower() not in aliases(info.model_id):
        shown = name if len(name) <= 80 else name[:80] + "…"
        raise ModelNotFound(
            f"The model `{shown}` does not exist: this server serves `{info.model_id}` (GET /v1/models)"
        )
    return info.model_id


def fingerprint(info: ModelInfo) -> str:
    """OpenAI's `system_fingerprint`: changes exactly when the served weights, precision or format do."""
    digest = hashlib.sha256(json.dumps(info.manifest, sort_keys=True, default=str).encode()).hexdigest()
    return f"fp_{digest[:12]}"


def _base_seed(seed: int | None) -> int:
    return seed % SEED_SPACE if seed is not None else secrets.randbelow(SEED_SPACE)


def _params(
    request: p.CompletionRequest | p.ChatCompletionRequest,
    generator: Generator,
    *,
    max_new_tokens: int,
    stop: tuple[str, ...],
    logprobs: int | None,
    prompt_logprobs: bool,
    seed: int,
) -> GenerationParams:
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    # temperature -> 0 is argmax, and so is a nucleus of mass 0 (it keeps the single most likely token).
    greedy = temperature < MIN_TEMPERATURE or top_p == 0.0
    return GenerationParams(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=1.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        top_k=max(0, request.top_k or 0),
        repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=_logit_bias(request, generator.info.vocab_size or None),
        seed=seed,
        stop=stop,
        return_full_text=False,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _seeds(base: int, prompts: int, rows_per_prompt: int) -> tuple[int, ...]:
    return tuple((base + i) % SEED_SPACE for _ in range(prompts) for i in range(rows_per_prompt))


def _new_id(prefix: str) -> str:
    # The Lambda request id makes a response easy to find in the logs; outside Lambda, a random one.
    return f"{prefix}-{invocation.request_id() or uuid.uuid4().hex}"


def _include_usage(request: p.CompletionRequest | p.ChatCompletionRequest) -> bool:
    return bool(request.stream_options and request.stream_options.include_usage)


def plan_completion(request: p.CompletionRequest, generator: Generator, *, streaming: bool = False) -> Plan:
    """Translate a `/v1/completions` request (checks, model, prompts, seeds, parameters)."""
    check_completion(request, streaming=streaming)
    resolve_model(request.model, generator.info)
    prompts = (request.prompt,) if isinstance(request.prompt, str) else tuple(request.prompt)
    n = request.n or 1
    best_of = request.best_of or n
    max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    # best_of ranks choices by their log-probability: ask for it even when the client did not.
    logprobs = request.logprobs if request.logprobs is not None else (0 if best_of > n else None)
    base = _base_seed(request.seed)
    return Plan(
        kind="completion",
        id=_new_id("cmpl"),
        created=int(time.time()),
        model=request.model,
        prompts=tuple(prompts),
        rows_per_prompt=best_of,
        n=n,
        params=_params(
            request,
            generator,
            max_new_tokens=max(1, max_tokens),
            stop=_stops(request),
            logprobs=logprobs,
            prompt_logprobs=bool(request.echo) and request.logprobs is not None,
            seed=base,
        ),
        seeds=_seeds(base, len(prompts), best_of),
        echo=bool(request.echo),
        logprobs=request.logprobs,
        zero_tokens=max_tokens == 0,
        system_fingerprint=fingerprint(generator.info),
        include_usage=_include_usage(request),
    )


def chat_prompt(generator: Generator, messages: list[dict[str, str]]) -> chat_template.ChatPrompt:
    """The tokenizer's own chat template when it ships one, else Phi-2's documented format."""
    rendered = generator.apply_chat_template(messages)
    if rendered is not None:
        return chat_template.ChatPrompt(rendered)
    return chat_template.phi2_prompt(messages)


def plan_chat(request: p.ChatCompletionRequest, generator: Generator, *, streaming: bool = False) -> Plan:
    """Translate a `/v1/chat/completions` request (checks, model, prompt, seeds, parameters)."""
    check_chat(request, streaming=streaming)
    resolve_model(request.model, generator.info)
    prompt = chat_prompt(generator, chat_messages(request))
    stop = tuple(dict.fromkeys(_stops(request) + prompt.stop))
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:
        # OpenAI's default: whatever the context has left (one token is kept for a BOS the tokenizer may add).
        context = generator.info.context_length
        prompt_tokens = generator.count_tokens(prompt.text) + 1
        if prompt_tokens >= context:
            raise errors.ContextLengthExceeded(prompt_tokens, 1, context)
        max_tokens = context - prompt_tokens
    n = request.n or 1
    base = _base_seed(request.seed)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return Plan(
        kind="chat",
        id=_new_id("chatcmpl"),
        created=int(time.time()),
        model=request.model,
        prompts=(prompt.text,),
        rows_per_prompt=n,
        n=n,
        params=_params(
            request,
            generator,
            max_new_tokens=max_tokens,
            stop=stop,
            logprobs=logprobs,
            prompt_logprobs=False,
            seed=base,
        ),
        seeds=_seeds(base, 1, n),
        logprobs=logprobs,
        strip_reply=prompt.strip_reply,
        system_fingerprint=fingerprint(generator.info),
        include_usage=_include_usage(request),
    )


# Responses


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def _mean_logprob(completion: Completion) -> float:
    values = [_finite(lp.logprob) for lp in completion.logprobs or ()]
    return sum(values) / len(values) if values else 0.0


def _chosen(plan: Plan, rows: Sequence[Completion]) -> list[Completion]:
    """The n rows to answer with: all of them, or (best_of) the n most likely per token, best first."""
    if plan.rows_per_prompt == plan.n:
        return list(rows)
    return sorted(rows, key=_mean_logprob, reverse=True)[: plan.n]


def _usage(plan: Plan, result: GenerationResult) -> p.Usage:
    # The prompt is counted once however many choices were sampled from it (as OpenAI counts it).
    rows = plan.rows_per_prompt
    prompt_tokens = sum(result.completions[k * rows].prompt_tokens for k in range(len(plan.prompts)))
    completion_tokens = 0 if plan.zero_tokens else sum(c.generated_tokens for c in result.completions)
    return p.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _reply(plan: Plan, completion: Completion) -> str:
    if plan.zero_tokens:
        return ""
    return completion.text.lstrip() if plan.strip_reply else completion.text


def _offsets(pieces: list[bytes], start: int) -> list[int]:
    """Where each token starts in the text, in characters (a token inside a multi-byte character starts
    where that character does)."""
    offsets, seen = [], b""
    for piece in pieces:
        offsets.append(start + len(seen.decode("utf-8", errors="ignore")))
        seen += piece
    return offsets


def completion_logprobs(
    plan: Plan, prompt: str, completion: Completion, generator: Generator
) -> p.CompletionLogprobs | None:
    """The legacy completions `logprobs` object: tokens, their log-probabilities, top alternatives, offsets."""
    if plan.logprobs is None:
        return None
    entries: list[tuple[int, NativeLogprob | None]] = []
    if plan.echo:
        prompt_logprobs = completion.prompt_logprobs or (None,) * len(completion.prompt_token_ids)
        entries += list(zip(completion.prompt_token_ids, prompt_logprobs, strict=False))
    if not plan.zero_tokens:
        entries += [(lp.token_id, lp) for lp in completion.logprobs or ()]
    ids = [token for token, _ in entries]
    alternatives = sorted({a for _, lp in entries if lp is not None for a, _ in lp.top[: plan.logprobs]})
    names = dict(zip(ids + alternatives, generator.token_strings(ids + alternatives), strict=True))
    top: list[dict[str, float] | None] = []
    for token, lp in entries:
        if lp is None:
            top.append(None)
            continue
        best = {names[a]: _finite(v) for a, v in lp.top[: plan.logprobs]}
        best.setdefault(names[token], _finite(lp.logprob))
        top.append(best)
    return p.CompletionLogprobs(
        tokens=[names[token] for token in ids],
        token_logprobs=[None if lp is None else _finite(lp.logprob) for _, lp in entries],
        top_logprobs=top,
        # Offsets count from the start of the prompt, echoed or not (as OpenAI's did).
        text_offset=_offsets(generator.token_bytes(ids), 0 if plan.echo else len(prompt)),
    )


def completion_response(plan: Plan, result: GenerationResult, generator: Generator) -> p.CompletionResponse:
    """The `/v1/completions` answer for `result` (rows in `plan.rows` order)."""
    choices = []
    rows = plan.rows_per_prompt
    for k, prompt in enumerate(plan.prompts):
        for i, completion in enumerate(_chosen(plan, result.completions[k * rows : (k + 1) * rows])):
            choices.append(
                p.CompletionChoice(
                    index=k * plan.n + i,
                    text=(prompt if plan.echo else "") + _reply(plan, completion),
                    logprobs=completion_logprobs(plan, prompt, completion, generator),
                    finish_reason="length" if plan.zero_tokens else FINISH_REASONS[completion.finish_reason],
                    native_finish_reason="length" if plan.zero_tokens else completion.finish_reason,
                )
            )
    return p.CompletionResponse(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        system_fingerprint=plan.system_fingerprint,
        choices=choices,
        usage=_usage(plan, result),
    )


def chat_token_logprobs(
    plan: Plan, logprobs: Sequence[NativeLogprob], generator: Generator
) -> list[p.TokenLogprob] | None:
    """Chat's `logprobs.content`: each token with its bytes and its top alternatives."""
    if plan.logprobs is None:
        return None
    k = plan.logprobs
    ids = [lp.token_id for lp in logprobs]
    alternatives = sorted({a for lp in logprobs for a, _ in lp.top[:k]})
    every = ids + alternatives
    names = dict(zip(every, generator.token_strings(every), strict=True))
    raw = dict(zip(every, generator.token_bytes(every), strict=True))
    return [
        p.TokenLogprob(
            token=names[lp.token_id],
            logprob=_finite(lp.logprob),
            bytes=list(raw[lp.token_id]),
            top_logprobs=[p.TopLogprob(token=names[a], logprob=_finite(v), bytes=list(raw[a])) for a, v in lp.top[:k]],
        )
        for lp in logprobs
    ]


def chat_response(plan: Plan, result: GenerationResult, generator: Generator) -> p.ChatCompletionResponse:
    """The `/v1/chat/completions` answer for `result`."""
    choices = [
        p.ChatChoice(
            index=i,
            message=p.AssistantMessage(content=_reply(plan, completion)),
            logprobs=None
            if plan.logprobs is None
            else p.ChoiceLogprobs(content=chat_token_logprobs(plan, completion.logprobs or (), generator)),
            finish_reason=FINISH_REASONS[completion.finish_reason],
            native_finish_reason=completion.finish_reason,
        )
        for i, completion in enumerate(result.completions)
    ]
    return p.ChatCompletionResponse(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        system_fingerprint=plan.system_fingerprint,
        choices=choices,
        usage=_usage(plan, result),
    )


def model_card(info: ModelInfo) -> p.Model:
    """The served model as `/v1/models` lists it."""
    owner = info.model_id.split("/", 1)[0] if "/" in info.model_id else "local"
    return p.Model(id=info.model_id, created=int(time.time()), owned_by=owner, max_model_len=info.context_length)


# Streaming: chunk objects built from the generator's StepEvents (the streaming surface sends them).


@dataclass
class ChatChunker:
    """Turns a chat generation's StepEvents into `chat.completion.chunk` objects, one stream per plan."""

    plan: Plan
    generator: Generator
    _started: set[int] = field(default_factory=set)

    def _chunk(self, choices: list[p.ChatChunkChoice], usage: p.Usage | None = None) -> p.ChatCompletionChunk:
        plan = self.plan
        return p.ChatCompletionChunk(
            id=plan.id,
            created=plan.created,
            model=plan.model,
            system_fingerprint=plan.system_fingerprint,
            choices=choices,
            usage=usage,
        )

    def first(self) -> p.ChatCompletionChunk:
        """The opening chunk: every choice's role, no content yet (as OpenAI's first chunk)."""
        return self._chunk(
            [p.ChatChunkChoice(index=i, delta=p.ChunkDelta(role="assistant", content="")) for i in range(self.plan.n)]
        )

    def step(self, events: Sequence[StepEvent]) -> p.ChatCompletionChunk | None:
        """One decoding step's events as a chunk (None when it carries nothing to send)."""
        choices = []
        for event in events:
            text = event.text
            if self.plan.strip_reply and event.row not in self._started:
                text = text.lstrip()
                if text:
                    self._started.add(event.row)
            logprobs = None
            if self.plan.logprobs is not None and event.logprob is not None:
                logprobs = p.ChoiceLogprobs(content=chat_token_logprobs(self.plan, [event.logprob], self.generator))
            finish = event.finish_reason
            if not text and logprobs is None and finish is None:
                continue
            choices.append(
                p.ChatChunkChoice(
                    index=event.row,
                    delta=p.ChunkDelta(content=text or None),
                    logprobs=logprobs,
                    finish_reason=FINISH_REASONS[finish] if finish else None,
                    native_finish_reason=finish,
                )
            )
        return self._chunk(choices) if choices else None

    def usage(self, result: GenerationResult) -> p.ChatCompletionChunk:
        """The last chunk when `stream_options.include_usage`: no choices, the usage."""
        return self._chunk([], _usage(self.plan, result))
