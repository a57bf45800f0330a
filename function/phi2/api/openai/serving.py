"""OpenAI requests -> the generator's prompts, seeds and GenerationParams; GenerationResults -> OpenAI responses.

No HTTP and no AWS here: `routes` (buffered) and the streaming surface both plan a request with `plan_chat` /
`plan_completion`, generate through `phi2.api.serving.generate`, and build their bodies with the functions below
(`chat_response`, `completion_response`, or the chunk builders for a stream).

OpenAI's conventions, where they differ from `/generate`: temperature and top_p default to 1, `temperature: 0`
decodes greedily, top_k is off unless asked for, `max_tokens` defaults to 16 on completions and to the rest of
the context on chat (the request's deadline still bounds it), and the text never includes the prompt unless
`echo` asks for it.

Structured output and tools become one grammar per request (`response_format`, `structured_outputs`, or the tool
grammar of tools.py), checked against the model's vocabulary at planning time, so that a schema the constrained
decoder refuses is a 400 naming its field before anything is generated (or streamed).
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
from phi2.api.openai import tools as tooling
from phi2.api.openai.errors import InvalidValue, ModelNotFound, UnsupportedValue
from phi2.api.schemas import MAX_STOP_SEQUENCES, MIN_TEMPERATURE
from phi2.engine.constrained.grammar import Grammar, json_rule
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
    tools: tooling.ToolPlan | None = None
    """What the model may call: its replies are parsed into `tool_calls`."""
    json_output: bool = False
    """The output was constrained to JSON (not by tools): each choice says whether it is complete."""
    cache_key: str | None = None
    """`prompt_cache_key`: narrows which of the caller's earlier prompt passes this request may reuse."""

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
    if request.structured_outputs is not None:
        _structured(request.structured_outputs, "structured_outputs")
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


def chat_messages(request: p.ChatCompletionRequest, plan: tooling.ToolPlan | None = None) -> list[dict[str, str]]:
    """The conversation as {"role": system|user|assistant, "content", optional "name"} dicts (400 if it holds
    what a text model cannot read). Tool calls and results in the history are written in the tool format
    (tools.py); with `plan`, the tools the model may call are described in the first system message."""
    out: list[dict[str, str]] = []
    called: dict[str, str] = {}  # tool call id -> function name, from the assistant messages so far
    for i, message in enumerate(request.messages):
        where = f"messages[{i}]"
        if message.role == "function":
            raise UnsupportedValue(
                f"{where}.role", "function messages are OpenAI's deprecated form: send tool messages"
            )
        for name in ("function_call", "audio"):
            if getattr(message, name):
                raise UnsupportedValue(f"{where}.{name}", f"{name} is not supported on a message")
        if message.tool_calls and message.role != "assistant":
            raise InvalidValue(f"{where}.tool_calls", "only assistant messages carry tool_calls")
        if message.tool_call_id is not None and message.role != "tool":
            raise InvalidValue(f"{where}.tool_call_id", "only tool messages carry a tool_call_id")
        content = _text_of(message.content, where)
        if content is None:
            if message.role != "assistant":
                raise InvalidValue(f"{where}.content", f"a {message.role} message needs content")
            content = message.refusal or ""
        if message.role == "tool":
            if message.tool_call_id is None:
                raise InvalidValue(f"{where}.tool_call_id", "a tool message needs the tool_call_id it answers")
            if message.tool_call_id not in called:
                raise InvalidValue(
                    f"{where}.tool_call_id",
                    "messages with role 'tool' must answer a preceding assistant message's tool_calls: no call "
                    f"has the id {message.tool_call_id[:80]!r}",
                )
            result = tooling.render_result(called[message.tool_call_id], content)
            out.append({"role": "user", "content": result, "name": tooling.TOOL_SPEAKER})
            continue
        if message.tool_calls:
            for call in message.tool_calls:
                called[call.id] = call.function.name
            rendered = [tooling.render_call(call.function.name, call.function.arguments) for call in message.tool_calls]
            content = "\n".join(([content] if content else []) + rendered)
        entry = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.name:
            entry["name"] = message.name
        out.append(entry)
    if plan is not None:
        described = tooling.preamble(plan)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def tool_plan(request: p.ChatCompletionRequest) -> tooling.ToolPlan | None:
    """What the model may call (400 naming the field for a tool or a tool_choice that cannot be honoured); None
    when it calls nothing (no tools, or tool_choice none)."""
    defined: list[tooling.Tool] = []
    for i, tool in enumerate(request.tools or ()):
        where = f"tools[{i}]"
        if tool.type != "function":
            raise UnsupportedValue(f"{where}.type", "only function tools are supported (custom tools take free text)")
        if tool.function is None:
            raise InvalidValue(f"{where}.function", "a function tool needs its function")
        name = tool.function.name
        if not tooling.NAME.match(name):
            raise InvalidValue(
                f"{where}.function.name",
                f"invalid function name {name[:80]!r}: use letters, digits, underscores and dashes, at most 64",
            )
        if any(other.name == name for other in defined):
            raise InvalidValue(f"{where}.function.name", f"two tools are named {name!r}")
        parameters = tool.function.parameters if tool.function.parameters is not None else tooling.NO_ARGUMENTS
        defined.append(tooling.Tool(name, tool.function.description, parameters))
    choice = request.tool_choice or "auto"
    parallel = request.parallel_tool_calls is not False
    if choice == "none" or (choice == "auto" and not defined):
        return None
    if not defined:
        raise InvalidValue("tool_choice", "tool_choice other than none or auto needs tools")
    if choice in ("auto", "required"):
        return tooling.ToolPlan(tuple(defined), choice, parallel)
    by_name = {tool.name: tool for tool in defined}
    kind = choice.get("type")
    if kind == "function":
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if not isinstance(name, str):
            raise InvalidValue("tool_choice.function.name", "a named tool_choice needs function.name")
        if name not in by_name:
            raise InvalidValue(
                "tool_choice.function.name", f"tool_choice names {name[:80]!r}, which is not one of the tools"
            )
        return tooling.ToolPlan((by_name[name],), "named", False)
    if kind == "allowed_tools":
        allowed = choice.get("allowed_tools")
        mode = allowed.get("mode") if isinstance(allowed, dict) else None
        listed = allowed.get("tools") if isinstance(allowed, dict) else None
        if mode not in ("auto", "required") or not isinstance(listed, list) or not listed:
            raise InvalidValue(
                "tool_choice.allowed_tools", "allowed_tools needs mode (auto or required) and a list of tools"
            )
        names = []
        for j, entry in enumerate(listed):
            name = (entry.get("function") or {}).get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or name not in by_name:
                raise InvalidValue(
                    f"tool_choice.allowed_tools.tools[{j}]", "each allowed tool names one of the tools' functions"
                )
            names.append(name)
        return tooling.ToolPlan(tuple(tool for tool in defined if tool.name in names), mode, parallel)
    if kind == "custom":
        raise UnsupportedValue("tool_choice", "custom tools are not supported: only function tools")
    raise InvalidValue("tool_choice", "tool_choice is none, auto, required, a named function or allowed_tools")


def check_chat(request: p.ChatCompletionRequest, *, streaming: bool = False) -> None:
    """Refuse what a chat request asks that cannot be honoured (400 naming the field)."""
    _refuse_stream(request, streaming)
    _stops(request)
    chat_messages(request)
    tool_plan(request)
    fmt = request.response_format
    if fmt is not None:
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise InvalidValue("response_format.json_schema", "response_format of type json_schema needs json_schema")
        if fmt.type != "json_schema" and fmt.json_schema is not None:
            raise InvalidValue("response_format.json_schema", f"json_schema goes with type json_schema, not {fmt.type}")
    if request.structured_outputs is not None:
        if fmt is not None and fmt.type != "text":
            raise InvalidValue("structured_outputs", "send response_format or structured_outputs, not both")
        if request.tools and request.tool_choice != "none":
            raise InvalidValue("structured_outputs", "structured_outputs cannot be combined with tools")
        _structured(request.structured_outputs, "structured_outputs")
    if request.functions:
        raise UnsupportedValue("functions", "functions is OpenAI's deprecated form of tools: send tools")
    if request.function_call not in (None, "none", "auto"):
        raise UnsupportedValue("function_call", "function_call is OpenAI's deprecated form of tool_choice: send tools")
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
    grammar: Grammar | None = None,
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
        min_p=request.min_p or 0.0,
        typical_p=1.0 if request.typical_p is None else request.typical_p,
        grammar=grammar,
    )


# Grammars: what the output is held to


def _json_grammar(schema: object, origin: str, leading_space: bool, generator: Generator | None = None) -> Grammar:
    """JSON valid against `schema`; after a prompt that ends with a speaker's colon (Phi-2's formats) the answer
    may begin with the space that follows it, as unconstrained text does. With `generator`, the schema alone is
    compiled first, so that its errors read as the schema's."""
    plain = Grammar.json_schema(schema, origin)
    if not leading_space:
        return plain
    _checked(generator, plain)
    return Grammar.lark(f'start: " "? value\nvalue: {json_rule(schema, origin)}', origin, is_json=True)


def _structured(
    so: p.StructuredOutputs, where: str, leading_space: bool = False, generator: Generator | None = None
) -> Grammar:
    """vLLM's `structured_outputs` as a grammar (400 naming the field unless exactly one constraint is given)."""
    given = [name for name in ("json", "json_object", "regex", "choice", "grammar") if _given(so, name)]
    if len(given) != 1:
        raise InvalidValue(where, "structured_outputs takes exactly one of json, json_object, regex, choice, grammar")
    if given == ["json"]:
        schema = so.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidValue(
                    f"{where}.json", f"json is a JSON Schema, and this text is not JSON: {exc}"
                ) from None
        return _json_grammar(schema, f"{where}.json", leading_space, generator)
    if given == ["json_object"]:
        return _json_grammar({"type": "object"}, f"{where}.json_object", leading_space, generator)
    if given == ["regex"]:
        return Grammar.regex(so.regex or "", f"{where}.regex")
    if given == ["choice"]:
        return Grammar.choice(list(so.choice or ()), f"{where}.choice")
    return Grammar.lark(so.grammar or "", f"{where}.grammar")


def _given(so: p.StructuredOutputs, name: str) -> bool:
    value = getattr(so, "json_" if name == "json" else name)
    return value is not None and value is not False


def _response_schema(request: p.ChatCompletionRequest) -> tuple[object, str] | None:
    """The schema `response_format` asks for, and the field it came from; None for text."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}, "response_format"
    spec = fmt.json_schema
    schema = spec.schema_ if spec is not None and spec.schema_ is not None else {"type": "object"}
    return schema, "response_format.json_schema.schema"


def _chat_grammar(
    request: p.ChatCompletionRequest, generator: Generator, plan: tooling.ToolPlan | None, leading_space: bool
) -> Grammar | None:
    """The one grammar of a chat's reply: the tools' (whose text branch follows response_format, if any),
    structured_outputs', or response_format's. Each tool's schema is compiled alone first, so that an error
    names its tool."""
    response = _response_schema(request)
    if plan is not None:
        index = {tool.function.name: i for i, tool in enumerate(request.tools or ()) if tool.function is not None}
        for tool in plan.tools:
            origin = f"tools[{index[tool.name]}].function.parameters"
            _checked(generator, Grammar.json_schema(tool.parameters, origin))
        if response is not None:
            _checked(generator, Grammar.json_schema(*response))
        text = json_rule(*response) if response is not None else None
        return _checked(generator, tooling.grammar(plan, leading_space=leading_space, text=text))
    if request.structured_outputs is not None:
        so = request.structured_outputs
        return _checked(generator, _structured(so, "structured_outputs", leading_space, generator))
    return _checked(generator, _json_grammar(*response, leading_space, generator) if response is not None else None)


def _checked(generator: Generator | None, grammar: Grammar | None) -> Grammar | None:
    """`grammar`, once the model's constrained decoder has compiled it (InvalidGrammar names the field)."""
    if grammar is not None and generator is not None:
        generator.check_grammar(grammar)
    return grammar


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
    so = request.structured_outputs
    grammar = _checked(generator, _structured(so, "structured_outputs") if so is not None else None)
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
            grammar=grammar,
        ),
        seeds=_seeds(base, len(prompts), best_of),
        echo=bool(request.echo),
        logprobs=request.logprobs,
        zero_tokens=max_tokens == 0,
        system_fingerprint=fingerprint(generator.info),
        include_usage=_include_usage(request),
        json_output=grammar is not None and grammar.is_json,
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
    tools = tool_plan(request)
    prompt = chat_prompt(generator, chat_messages(request, tools))
    grammar = _chat_grammar(request, generator, tools, prompt.strip_reply)
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
            grammar=grammar,
        ),
        seeds=_seeds(base, 1, n),
        logprobs=logprobs,
        strip_reply=prompt.strip_reply,
        system_fingerprint=fingerprint(generator.info),
        include_usage=_include_usage(request),
        cache_key=request.prompt_cache_key,
        tools=tools,
        # A text reply is JSON: response_format (also as the text of a tool-calling reply) or structured_outputs
        json_output=grammar is not None and (_response_schema(request) is not None or (grammar.is_json and not tools)),
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
    cached_tokens = sum(result.completions[k * rows].cached_tokens for k in range(len(plan.prompts)))
    return p.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached_tokens),
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
                    json_complete=completion.grammar_complete if plan.json_output else None,
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


def _finish_reason(plan: Plan, native: str, called: bool) -> Literal["stop", "length", "tool_calls"]:
    """OpenAI's finish reason: `tool_calls` when the model called a tool it chose (auto, required), `stop` when
    the request named the function (as OpenAI answers a forced call), `length` when cut short either way."""
    reason = FINISH_REASONS[native]
    if called and reason == "stop" and native != "cancelled" and plan.tools is not None and plan.tools.mode != "named":
        return "tool_calls"
    return reason


def _json_output(plan: Plan, reply: tooling.ToolReply | None) -> bool:
    """Whether this reply is JSON: a call (or the start of one; with required or a named function, always), or a
    text reply that response_format or structured_outputs made JSON."""
    if plan.tools is not None and (plan.tools.mode != "auto" or (reply is not None and reply.is_call)):
        return True
    return plan.json_output


def chat_response(plan: Plan, result: GenerationResult, generator: Generator) -> p.ChatCompletionResponse:
    """The `/v1/chat/completions` answer for `result`."""
    choices = []
    for i, completion in enumerate(result.completions):
        content: str | None = _reply(plan, completion)
        calls: list[p.ToolCall] | None = None
        reply = None
        if plan.tools is not None:
            reply = tooling.ToolReply()
            reply.feed(content or "")
            reply.finish()
            if reply.calls:
                content = None
                calls = [
                    p.ToolCall(id=c.id, function=p.ToolCallFunction(name=c.name, arguments=c.arguments))
                    for c in reply.calls
                ]
        choices.append(
            p.ChatChoice(
                index=i,
                message=p.AssistantMessage(content=content, tool_calls=calls),
                logprobs=None
                if plan.logprobs is None
                else p.ChoiceLogprobs(content=chat_token_logprobs(plan, completion.logprobs or (), generator)),
                finish_reason=_finish_reason(plan, completion.finish_reason, bool(calls)),
                native_finish_reason=completion.finish_reason,
                json_complete=completion.grammar_complete if _json_output(plan, reply) else None,
            )
        )
    return p.ChatCompletionResponse(
        id=plan.id,
        created=plan.created,
        model=plan.model,
        system_fingerprint=plan.system_fingerprint,
        choices=choices,
        usage=_usage(plan, result),
    )


def tokenize(request: p.TokenizeRequest, generator: Generator) -> p.TokenizeResponse:
    """`/tokenize`: the ids of a prompt, or of a chat rendered exactly as a chat request renders it."""
    if request.model is not None:
        resolve_model(request.model, generator.info)
    if (request.prompt is None) == (request.messages is None):
        raise InvalidValue("prompt", "give exactly one of prompt (text) and messages (a chat)")
    if request.messages is None and (request.tools or request.add_generation_prompt is not None):
        raise InvalidValue("tools" if request.tools else "add_generation_prompt", "this field goes with messages")
    if request.add_generation_prompt is False:
        raise UnsupportedValue(
            "add_generation_prompt", "a chat is rendered as the model reads it: with the reply's prompt"
        )
    text = request.prompt
    if request.messages is not None:
        chat = p.ChatCompletionRequest.model_construct(
            model=generator.info.model_id, messages=request.messages, tools=request.tools
        )
        plan = tool_plan(chat)
        text = chat_prompt(generator, chat_messages(chat, plan)).text
    tokens = generator.tokenize(text or "", request.add_special_tokens is not False)
    return p.TokenizeResponse(
        count=len(tokens),
        max_model_len=generator.info.context_length,
        tokens=tokens,
        token_strs=generator.token_strings(tokens) if request.return_token_strs else None,
    )


def detokenize(request: p.DetokenizeRequest, generator: Generator) -> p.DetokenizeResponse:
    """`/detokenize`: the text of token ids (400 for an id outside the vocabulary)."""
    if request.model is not None:
        resolve_model(request.model, generator.info)
    vocab = generator.info.vocab_size
    for i, token in enumerate(request.tokens):
        if vocab and token >= vocab:
            raise InvalidValue(f"tokens[{i}]", f"token id {token} is not in the model's vocabulary of {vocab}")
    return p.DetokenizeResponse(prompt=generator.detokenize(request.tokens))


def model_card(info: ModelInfo) -> p.Model:
    """The served model as `/v1/models` lists it."""
    owner = info.model_id.split("/", 1)[0] if "/" in info.model_id else "local"
    return p.Model(id=info.model_id, created=int(time.time()), owned_by=owner, max_model_len=info.context_length)


# Streaming: chunk objects built from the generator's StepEvents (the streaming surface sends them).


@dataclass
class ChatChunker:
    """Turns a chat generation's StepEvents into `chat.completion.chunk` objects, one stream per plan. With tools,
    each row's text goes through a ToolReply: a call streams as OpenAI's `delta.tool_calls` (id and name first,
    then the arguments piece by piece), text as `delta.content`."""

    plan: Plan
    generator: Generator
    _started: set[int] = field(default_factory=set)
    _replies: dict[int, tooling.ToolReply] = field(default_factory=dict)
    _texts: dict[int, str] = field(default_factory=dict)

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

    def _split(self, row: int, text: str, last: bool) -> tuple[str, list[p.ChunkToolCall]]:
        """A row's new text as content and tool-call pieces."""
        if self.plan.tools is None:
            return text, []
        reply = self._replies.setdefault(row, tooling.ToolReply())
        content, deltas = reply.feed(text)
        if last:
            more, later = reply.finish()
            content, deltas = content + more, deltas + later
        pieces = [
            p.ChunkToolCall(
                index=d.index,
                id=d.id,
                type="function" if d.id else None,
                function=p.ChunkFunction(name=d.name, arguments=d.arguments),
            )
            for d in deltas
        ]
        return content, pieces

    def _complete(self, row: int) -> bool | None:
        """Whether a row's JSON is complete, for its last chunk: the grammar let it end only complete, so it is
        complete exactly when it parses (each call's arguments, or the text)."""
        reply = self._replies.get(row)
        if not _json_output(self.plan, reply):
            return None
        if reply is not None and (reply.is_call or self.plan.tools.mode != "auto"):
            return bool(reply.calls) and all(parses(call.arguments) for call in reply.calls)
        return parses(self._texts.get(row, ""))

    def step(self, events: Sequence[StepEvent]) -> p.ChatCompletionChunk | None:
        """One decoding step's events as a chunk (None when it carries nothing to send)."""
        choices = []
        for event in events:
            finish = event.finish_reason
            text, calls = self._split(event.row, event.text, finish is not None)
            if self.plan.strip_reply and event.row not in self._started:
                text = text.lstrip()
                if text or calls:
                    self._started.add(event.row)
            self._texts[event.row] = self._texts.get(event.row, "") + text
            logprobs = None
            if self.plan.logprobs is not None and event.logprob is not None:
                logprobs = p.ChoiceLogprobs(content=chat_token_logprobs(self.plan, [event.logprob], self.generator))
            if not text and not calls and logprobs is None and finish is None:
                continue
            called = event.row in self._replies and bool(self._replies[event.row].calls)
            choices.append(
                p.ChatChunkChoice(
                    index=event.row,
                    delta=p.ChunkDelta(content=text or None, tool_calls=calls or None),
                    logprobs=logprobs,
                    finish_reason=_finish_reason(self.plan, finish, called) if finish else None,
                    native_finish_reason=finish,
                    json_complete=self._complete(event.row) if finish else None,
                )
            )
        return self._chunk(choices) if choices else None

    def usage(self, result: GenerationResult) -> p.ChatCompletionChunk:
        """The last chunk when `stream_options.include_usage`: no choices, the usage."""
        return self._chunk([], _usage(self.plan, result))


def parses(text: str) -> bool:
    """Whether `text` is one whole JSON value."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
