"""OpenAI's request, response and error bodies, as pydantic models: bounded, described, and the source of the
OpenAPI document for the `/v1` routes.

Requests list every field OpenAI documents for the endpoint (openai-python 3.x's `*CreateParams`), so that a
client sending one at its neutral value is served; `serving` implements each or refuses a value it cannot
honour with a 400 naming the field. A field OpenAI does not document is refused as OpenAI refuses it
("Unrecognized request argument supplied"), except the extras this function adds as vLLM does (`top_k`,
`repetition_penalty`, `min_p`, `structured_outputs`) or TGI (`typical_p`). Every optional field also takes
`null`, meaning its default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from phi2.api.schemas import MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_STOP_CHARS, MAX_STOP_SEQUENCES
from phi2.engine.generator import MAX_LOGPROBS

MAX_CHOICES = MAX_PROMPTS
"""Rows of one generation batch: prompts x `n` (or `best_of`) may not exceed it."""
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256
MAX_LOGIT_BIAS = 300
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = MAX_LOGPROBS
MAX_TOOLS = 128
MAX_METADATA = 16
MAX_ID_CHARS = 256
MAX_TOKENS_LIMIT = 2**31 - 1
"""Any larger `max_tokens` is nonsense; anything up to it past the context is a `context_length_exceeded`."""

ModelId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS)]
Identifier = Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
PromptText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
# OpenAI's rule for participant names; it also keeps a name usable as a speaker label in a prompt.
ParticipantName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
MAX_GRAMMAR_TEXT = 100_000
MAX_CHOICE_OPTIONS = 256
MAX_DESCRIPTION_CHARS = 8192


class _Request(BaseModel):
    # forbid: an unknown field is refused (OpenAI does the same), never silently ignored. strict: "5" is not
    # a number; an integer is still a valid float.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = Field(None, description="Streaming only: a last chunk with the usage.")
    include_obfuscation: bool | None = Field(None, description="Streaming only: accepted, no effect here.")


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs`: exactly one constraint on the generated text."""

    json_: dict[str, Any] | bool | str | None = Field(
        None,
        alias="json",
        description="A JSON Schema (an object, or its JSON text): the output is JSON valid against it.",
    )
    json_object: bool | None = Field(None, description="true: the output is a JSON object.")
    regex: Annotated[str, StringConstraints(max_length=MAX_GRAMMAR_TEXT)] | None = Field(
        None, description="The output matches this regular expression (Rust regex syntax, anchored at both ends)."
    )
    choice: (
        Annotated[
            list[Annotated[str, StringConstraints(max_length=MAX_GRAMMAR_TEXT)]],
            Field(min_length=1, max_length=MAX_CHOICE_OPTIONS),
        ]
        | None
    ) = Field(None, description="The output is exactly one of these strings.")
    grammar: Annotated[str, StringConstraints(max_length=MAX_GRAMMAR_TEXT)] | None = Field(
        None,
        description="A Lark grammar in llguidance's dialect (`start:` is the output; `%json {...}` inlines a JSON "
        "Schema; regexes between slashes).",
    )


class _Sampling(_Request):
    """Fields `/v1/completions` and `/v1/chat/completions` share."""

    model: ModelId = Field(
        description="The served model's id (GET /v1/models) or its alias: the id's last path segment "
        "(e.g. `phi-2` for `microsoft/phi-2`), case-insensitively. Echoed in the response."
    )
    frequency_penalty: float | None = Field(
        None,
        ge=-2.0,
        le=2.0,
        allow_inf_nan=False,
        description="Default 0. Subtracted from a token's logit once per time it was already generated.",
    )
    presence_penalty: float | None = Field(
        None,
        ge=-2.0,
        le=2.0,
        allow_inf_nan=False,
        description="Default 0. Subtracted once from the logit of every token already generated.",
    )
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = Field(
        None,
        max_length=MAX_LOGIT_BIAS,
        description="Token id (as a string) -> bias in [-100, 100], added to that token's logit at every step; "
        "-100 bans a token, 100 all but forces it. Ids are the served tokenizer's.",
    )
    max_tokens: int | None = Field(
        None,
        ge=0,
        le=MAX_TOKENS_LIMIT,
        description="Most tokens to generate. A prompt plus max_tokens past the model's context is a 400 "
        "`context_length_exceeded`; the request's deadline may end generation sooner (finish_reason `length`, "
        "native_finish_reason `time_limit`).",
    )
    n: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description=f"Default 1. Choices per prompt, sampled as one batch with seeds seed, seed+1, ...; "
        f"prompts x n may not exceed {MAX_CHOICES}.",
    )
    seed: int | None = Field(
        None,
        ge=-(2**63),
        lt=2**64,
        description="Sample reproducibly: the same seed and request give the same choices (choice i uses "
        "seed + i, modulo 2^32). Default: a random seed.",
    )
    stop: StopSequence | list[StopSequence] | None = Field(
        None,
        description=f"Up to {MAX_STOP_SEQUENCES} strings; generation ends before the first one generated, "
        "which is not returned.",
    )
    stream: bool | None = Field(
        None,
        description="`true` is served by the streaming API (stack output StreamBaseUrl); this buffered API "
        "answers it with a 400 that names that base URL.",
    )
    stream_options: StreamOptions | None = Field(None, description="Only with `stream: true` (as OpenAI).")
    temperature: float | None = Field(
        None,
        ge=0.0,
        le=2.0,
        allow_inf_nan=False,
        description="Default 1. 0 (or below 0.01) decodes greedily.",
    )
    top_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Default 1. Nucleus sampling mass; 0 keeps only the most likely token (greedy).",
    )
    user: Identifier | None = Field(None, description="An end-user id: accepted, never logged or stored.")
    top_k: int | None = Field(
        None,
        ge=-1,
        le=1000,
        description="Extension (as vLLM's): sample among the k most likely tokens. Default (and 0 or -1): all.",
    )
    repetition_penalty: float | None = Field(
        None,
        ge=0.5,
        le=2.0,
        allow_inf_nan=False,
        description="Extension (as vLLM's): default 1; above 1 discourages tokens already in the prompt or "
        "the text so far.",
    )
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Extension (as vLLM's): when sampling, drop tokens less likely than min_p times the most "
        "likely one. Default 0 (off).",
    )
    typical_p: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="Extension (as TGI's): typical sampling's probability mass when sampling. Default 1 (off).",
    )
    structured_outputs: StructuredOutputs | None = Field(
        None,
        description="Extension (as vLLM's): constrain the output to a JSON Schema (`json`), any JSON object "
        "(`json_object`), a `regex`, one of several strings (`choice`) or a Lark `grammar`; exactly one of them.",
    )


class CompletionRequest(_Sampling):
    """`POST /v1/completions` (OpenAI's legacy completions): continue each prompt."""

    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"A string or a list of up to {MAX_PROMPTS} strings. (Token-id prompts are refused: send text.)"
    )
    best_of: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description="Default n. Sample best_of choices per prompt and return the n with the highest log "
        "probability per token; prompts x best_of may not exceed the batch limit.",
    )
    echo: bool | None = Field(None, description="Default false. Prefix each choice's text with its prompt.")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Return each token's log-probability and the `logprobs` most likely alternatives (the "
        "model's own distribution, before sampling controls). With echo, the prompt's tokens too.",
    )
    suffix: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="Only empty or null: the model cannot insert text."
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_only(cls, value: object) -> object:
        # OpenAI also takes token ids; say so instead of listing why each id is not a string.
        if isinstance(value, list) and any(isinstance(item, int | list) for item in value):
            raise PydanticCustomError(
                "unsupported_value", "token-id prompts are not supported: send the prompt as text"
            )
        return value


class ContentPart(_Request):
    """One part of a message's content: only text parts can be read by a text model."""

    type: Literal["text", "image_url", "input_audio", "file", "refusal"]
    text: str | None = None
    image_url: dict[str, Any] | None = None
    input_audio: dict[str, Any] | None = None
    file: dict[str, Any] | None = None
    refusal: str | None = None


class CalledFunction(_Request):
    name: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]
    arguments: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] = Field(
        description="The arguments as JSON text."
    )


class MessageToolCall(_Request):
    """A call the assistant made earlier in the conversation."""

    id: Identifier
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Request):
    """A message of the conversation. `developer` is OpenAI's newer name for `system`."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = Field(
        None, description="Text, or a list of parts of which only `text` parts are supported."
    )
    name: ParticipantName | None = Field(None, description="The participant's name (the speaker's label).")
    tool_calls: list[MessageToolCall] | None = Field(
        None, max_length=MAX_TOOLS, description="An assistant message's calls (rendered into the prompt)."
    )
    tool_call_id: Identifier | None = Field(None, description="A `tool` message: the call it answers.")
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None


class JsonSchemaFormat(_Request):
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = Field(
        description="The schema's name (letters, digits, _ and -; at most 64)."
    )
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    schema_: dict[str, Any] | bool | None = Field(
        None, alias="schema", description="The JSON Schema the answer follows. Absent: any JSON object."
    )
    strict: bool | None = Field(None, description="Accepted either way: the schema is always enforced, token by token.")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, description="With type json_schema: the schema.")


class FunctionDefinition(_Request):
    name: Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)] = Field(
        description="Letters, digits, _ and -, at most 64 characters."
    )
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="The JSON Schema of the arguments; absent: the function takes none."
    )
    strict: bool | None = Field(None, description="Accepted either way: the arguments always follow the schema.")


class ToolDefinition(_Request):
    type: Literal["function", "custom"]
    function: FunctionDefinition | None = None
    custom: dict[str, Any] | None = Field(None, description="Custom (free-form) tools are refused.")


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`: the assistant's next message in a conversation."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_TOKENS_LIMIT,
        description="OpenAI's newer name for max_tokens (either; both only if equal). Default: the rest of "
        "the context, within the request's deadline.",
    )
    logprobs: bool | None = Field(None, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: also the most likely alternatives at each position.",
    )
    response_format: ResponseFormat | None = Field(
        None,
        description="`text`, `json_object` (any JSON object) or `json_schema` (JSON valid against the schema): "
        "guaranteed by constrained decoding.",
    )
    tools: list[ToolDefinition] | None = Field(
        None, max_length=MAX_TOOLS, description="Functions the model may call (type `function`)."
    )
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None,
        description="`auto` (default with tools: text or calls), `none`, `required` (one call or more), "
        '`{"type": "function", "function": {"name": ...}}` (exactly that call) or '
        '`{"type": "allowed_tools", "allowed_tools": {"mode": "auto"|"required", "tools": [...]}}`.',
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Default true: up to 8 calls in one answer; false: at most one."
    )
    functions: list[dict[str, Any]] | None = Field(
        None, max_length=MAX_TOOLS, description="Only empty: the deprecated form of `tools`; send `tools`."
    )
    function_call: Literal["none", "auto"] | dict[str, Any] | None = Field(
        None, description="Only `none`, or `auto` without functions (the deprecated form of `tool_choice`)."
    )
    audio: dict[str, Any] | None = Field(None, description="Only null: text output only.")
    modalities: list[Literal["text", "audio"]] | None = Field(None, max_length=2, description='Only ["text"].')
    prediction: dict[str, Any] | None = Field(
        None, description="Accepted: a latency hint that never changes the output; not used."
    )
    metadata: dict[str, Annotated[str, StringConstraints(max_length=512)]] | None = Field(
        None, max_length=MAX_METADATA, description="Accepted: nothing is stored, so it has no effect."
    )
    store: bool | None = Field(None, description="Only false or null: this server stores no completions.")
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="Only `none` or null: the model does not reason before answering."
    )
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="Only `medium` (the default).")
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = Field(
        None, description="Only `auto` or `default`: there is one tier."
    )
    web_search_options: dict[str, Any] | None = Field(None, description="Only null: no web search.")
    moderation: dict[str, Any] | None = Field(None, description="Only null: no moderation model.")
    prompt_cache_key: Identifier | None = Field(
        None,
        description="Narrows the prompt cache: a request reuses only earlier prompt passes of the same caller "
        "with the same key (never another caller's, whatever the key).",
    )
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(
        None,
        description="Accepted: the cache is in memory, per warm environment, for PROMPT_CACHE_TTL_SECONDS after its "
        "last use (`24h` is served the same way; a cache changes latency, never an answer).",
    )
    prompt_cache_options: dict[str, Any] | None = Field(None, description="Accepted, no effect.")
    safety_identifier: Identifier | None = Field(None, description="Accepted: never logged or stored.")


# Responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        0,
        description="Prompt tokens whose prompt pass was reused from this caller's earlier request in the same warm "
        "environment (the prompt cache), not read again.",
    )
    audio_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


NativeFinishReason = Literal["length", "eos_token", "stop_sequence", "time_limit", "cancelled"]
_NATIVE_FINISH = (
    "This function's finer reason: length (max_tokens), eos_token (the model ended the text), stop_sequence "
    "(a stop string, including the chat template's next-turn marker), time_limit (the request's deadline)."
)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    native_finish_reason: NativeFinishReason | None = Field(None, description=_NATIVE_FINISH)
    json_complete: bool | None = Field(
        None,
        description="Only when structured_outputs constrained the output to JSON: whether it is complete.",
        exclude_if=lambda value: value is None,
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="JSON text valid against the function's parameters (unless cut short).")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda value: value is None)


_JSON_COMPLETE = (
    "Only when the output was constrained to JSON (response_format, structured_outputs, a tool call): whether it "
    "is complete. false: it was cut short (finish_reason length) and will not parse."
)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]
    native_finish_reason: NativeFinishReason = Field(description=_NATIVE_FINISH)
    json_complete: bool | None = Field(None, description=_JSON_COMPLETE, exclude_if=lambda value: value is None)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChunkFunction(BaseModel):
    name: str | None = Field(None, exclude_if=lambda value: value is None)
    arguments: str = ""


class ChunkToolCall(BaseModel):
    """A piece of a streamed call, in OpenAI's delta shape: the first piece of call `index` carries its id, type
    and name (arguments ""), the next ones more of its arguments."""

    index: int
    id: str | None = Field(None, exclude_if=lambda value: value is None)
    type: Literal["function"] | None = Field(None, exclude_if=lambda value: value is None)
    function: ChunkFunction


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = Field(None, exclude_if=lambda value: value is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    native_finish_reason: NativeFinishReason | None = Field(None, description=_NATIVE_FINISH)
    json_complete: bool | None = Field(None, description=_JSON_COMPLETE, exclude_if=lambda value: value is None)


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (for the streaming surface)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TokenizeRequest(_Request):
    """`POST /tokenize` (vLLM's): the tokens of a prompt, or of a chat rendered as the chat route renders it."""

    model: ModelId | None = Field(None, description="The served model's id or alias; absent: the served model.")
    prompt: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | None = Field(
        None, description="Text to tokenize. Give exactly one of `prompt` and `messages`."
    )
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, max_length=MAX_MESSAGES, description="A chat, rendered as /chat/completions renders it."
    )
    tools: list[ToolDefinition] | None = Field(
        None, max_length=MAX_TOOLS, description="With `messages`: the tools, rendered into the prompt as a chat would."
    )
    add_special_tokens: bool | None = Field(
        None, description="Default true for `prompt` (the tokenizer's special tokens, if it adds any)."
    )
    add_generation_prompt: bool | None = Field(
        None, description="With `messages`: default true (the prompt ends where the assistant's reply begins)."
    )
    return_token_strs: bool | None = Field(None, description="Also return each token's text.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    """`POST /detokenize` (vLLM's): the text of token ids."""

    model: ModelId | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=65_536, description="Token ids of the served model.")


class DetokenizeResponse(BaseModel):
    prompt: str


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When the model was prepared (Unix seconds; 0 if unknown).")
    owned_by: str
    max_model_len: int | None = Field(None, description="The model's context length in tokens (as vLLM's).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error (4xx) or server_error (5xx).")
    param: str | None = Field(None, description="The request field at fault, e.g. `messages[0].role`.")
    code: str | None = Field(None, description="Stable code, e.g. context_length_exceeded, model_not_found.")


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body; the request id is in the `x-request-id` header."""

    error: OpenAIError
