"""OpenAI's request, response and error bodies, as pydantic models: bounded, described, and the source of the
OpenAPI document for the `/v1` routes.

Requests list every field OpenAI documents for the endpoint (openai-python 3.x's `*CreateParams`), so that a
client sending one at its neutral value is served; `serving` implements each or refuses a value it cannot
honour with a 400 naming the field. A field OpenAI does not document is refused as OpenAI refuses it
("Unrecognized request argument supplied"), except the two extras this function adds (`top_k`,
`repetition_penalty`, as vLLM does). Every optional field also takes `null`, meaning its default.
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


class _Request(BaseModel):
    # forbid: an unknown field is refused (OpenAI does the same), never silently ignored. strict: "5" is not
    # a number; an integer is still a valid float.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool | None = Field(None, description="Streaming only: a last chunk with the usage.")
    include_obfuscation: bool | None = Field(None, description="Streaming only: accepted, no effect here.")


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


class ChatMessage(_Request):
    """A message of the conversation. `developer` is OpenAI's newer name for `system`."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = Field(
        None, description="Text, or a list of parts of which only `text` parts are supported."
    )
    name: ParticipantName | None = Field(None, description="The participant's name (the speaker's label).")
    tool_calls: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_call_id: Identifier | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    audio: dict[str, Any] | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


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
        None, description='Only `{"type": "text"}`: JSON modes are refused (no constrained decoding).'
    )
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS, description="Only empty: no tool calls.")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field(
        None, description="Only `none`, or `auto` without tools."
    )
    parallel_tool_calls: bool | None = Field(None, description="Accepted: without tools it has no effect.")
    functions: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS, description="Only empty.")
    function_call: Literal["none", "auto"] | dict[str, Any] | None = Field(
        None, description="Only `none`, or `auto` without functions."
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
    prompt_cache_key: Identifier | None = Field(None, description="Accepted: no prompt cache, no effect.")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(None, description="Accepted, no effect.")
    prompt_cache_options: dict[str, Any] | None = Field(None, description="Accepted, no effect.")
    safety_identifier: Identifier | None = Field(None, description="Accepted: never logged or stored.")


# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    annotations: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    native_finish_reason: NativeFinishReason = Field(description=_NATIVE_FINISH)


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    native_finish_reason: NativeFinishReason | None = Field(None, description=_NATIVE_FINISH)


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (for the streaming surface)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


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
