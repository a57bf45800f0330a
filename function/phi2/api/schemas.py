"""Request and response bodies of the HTTP API: bounded, described, and the source of the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from phi2.engine.constrained.grammar import MAX_GRAMMAR_CHARS, Grammar
from phi2.engine.generator import GenerationParams, GenerationResult

MAX_PROMPTS = 8
MAX_PROMPT_CHARS = 32_000
MAX_NEW_TOKENS = 1024
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
# Below this, logits / temperature overflows float32 and sampling fails; greedy is do_sample=false.
MIN_TEMPERATURE = 0.01

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
# The generation defaults live once, in GenerationParams; the schema publishes them.
_DEFAULT = GenerationParams()

StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class GenerateRequest(BaseModel):
    """`POST /generate`: the seed's `{"prompt": ...}` plus optional generation controls."""

    # strict: "5" is not a number and 1.5 is not an int; forbid: a misspelt option is an error, not a no-op.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Prompt | None = Field(None, description="Text to continue. Give exactly one of `prompt` and `prompts`.")
    prompts: list[Prompt] | None = Field(
        None,
        min_length=1,
        max_length=MAX_PROMPTS,
        description=f"Up to {MAX_PROMPTS} prompts, generated together as one left-padded batch.",
    )
    max_new_tokens: int = Field(
        _DEFAULT.max_new_tokens, ge=1, le=MAX_NEW_TOKENS, description="Upper bound on generated tokens."
    )
    do_sample: bool = Field(
        _DEFAULT.do_sample, description="Sample (true, as the seed did) or decode greedily (false)."
    )
    temperature: float = Field(
        _DEFAULT.temperature,
        ge=MIN_TEMPERATURE,
        le=5.0,
        allow_inf_nan=False,
        description="Softmax temperature when sampling. For greedy decoding send `do_sample: false`.",
    )
    top_p: float = Field(_DEFAULT.top_p, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus sampling mass.")
    top_k: int = Field(_DEFAULT.top_k, ge=0, le=1000, description="Sample among the k most likely tokens; 0 disables.")
    repetition_penalty: float = Field(
        _DEFAULT.repetition_penalty,
        ge=0.5,
        le=2.0,
        allow_inf_nan=False,
        description="Above 1 discourages repeating tokens.",
    )
    seed: int | None = Field(
        None, ge=0, lt=2**32, description="Random seed; the same seed and request give the same text."
    )
    stop: list[StopSequence] = Field(
        default_factory=list,
        max_length=MAX_STOP_SEQUENCES,
        description="Generation ends at the first of these strings, which is not included in the text.",
    )
    return_full_text: bool = Field(
        _DEFAULT.return_full_text, description="Prefix the prompt to the generated text, as the seed did."
    )
    min_p: float = Field(
        _DEFAULT.min_p,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="When sampling: drop tokens less likely than min_p times the most likely one; 0 disables.",
    )
    typical_p: float = Field(
        _DEFAULT.typical_p,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="When sampling: typical sampling's probability mass; 1 disables.",
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description="Constrained decoding: the generated text is JSON valid against this JSON Schema (compact: "
        "`, ` and `: ` separators, no other whitespace). `details.grammar_complete` says whether it was finished.",
    )
    grammar: Annotated[str, StringConstraints(min_length=1, max_length=MAX_GRAMMAR_CHARS)] | None = Field(
        None,
        description="Constrained decoding: the generated text follows this Lark grammar, in llguidance's dialect "
        "(`start:` is the whole text; regexes between slashes; `%json {...}` inlines a JSON Schema). Give at most "
        "one of `json_schema` and `grammar`.",
    )

    @model_validator(mode="after")
    def _one_prompt_field(self) -> GenerateRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of `prompt` (a string) or `prompts` (a list of strings)")
        if self.json_schema is not None and self.grammar is not None:
            raise ValueError("give at most one of `json_schema` and `grammar`")
        return self

    @property
    def batched(self) -> bool:
        return self.prompts is not None

    def prompt_list(self) -> list[str]:
        return list(self.prompts) if self.prompts is not None else [self.prompt or ""]

    def params(self) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop),
            return_full_text=self.return_full_text,
            min_p=self.min_p,
            typical_p=self.typical_p,
            grammar=self.constraint(),
        )

    def constraint(self) -> Grammar | None:
        """The grammar the text must follow (InvalidGrammar, a 422 naming the field, past a bound)."""
        if self.json_schema is not None:
            return Grammar.json_schema(self.json_schema, "json_schema")
        if self.grammar is not None:
            return Grammar.lark(self.grammar, "grammar")
        return None


class Timings(BaseModel):
    time_to_first_token_ms: float = Field(description="From request to the first new token (includes the prompt).")
    prompt_pass_ms: float = Field(description="The prompt's forward pass (all its chunks).")
    total_ms: float = Field(description="Whole generation.")
    tokens_per_second: float = Field(description="Decode speed after the first token, per sequence.")
    deadline_ms: float = Field(
        description="Time the request had when generation started, before `deadline_source` ends it."
    )


class Details(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence", "time_limit"] = Field(
        description="length: max_new_tokens reached; eos_token: the model ended the text; "
        "stop_sequence: a `stop` string was generated; time_limit: the deadline (`deadline_source`) came."
    )
    deadline_source: Literal["api_timeout", "invocation_timeout"] = Field(
        description="Which limit set the deadline: api_timeout (API Gateway's integration timeout, counted from "
        "when API Gateway received the request) or invocation_timeout (the Lambda invocation's remaining time)."
    )
    prompt_tokens: int
    cached_tokens: int = Field(
        0,
        description="Of the prompt tokens, those whose prompt pass was reused from this caller's earlier request in "
        "the same warm environment (the prompt cache), not read again.",
    )
    generated_tokens: int
    seed: int = Field(description="The seed used; send it back to reproduce this output.")
    grammar_complete: bool | None = Field(
        None,
        description="With `json_schema` or `grammar`: whether the text is complete (false: cut short by "
        "max_new_tokens or the deadline, e.g. the JSON is incomplete). Absent otherwise.",
        exclude_if=lambda value: value is None,
    )
    timings: Timings


class GenerateResponse(BaseModel):
    """The seed's `{"generated_text": ...}`; a list, in order, when the request had `prompts`."""

    generated_text: str | list[str]
    details: Details | list[Details]

    @classmethod
    def from_result(
        cls, result: GenerationResult, batched: bool, deadline_source: str, deadline_s: float
    ) -> GenerateResponse:
        timings = Timings(
            time_to_first_token_ms=round(result.time_to_first_token_s * 1000, 1),
            prompt_pass_ms=round(result.prompt_pass_s * 1000, 1),
            total_ms=round(result.total_s * 1000, 1),
            tokens_per_second=round(result.tokens_per_second, 2),
            deadline_ms=round(max(0.0, deadline_s) * 1000, 1),
        )
        details = [
            Details(
                finish_reason=c.finish_reason,
                deadline_source=deadline_source,
                prompt_tokens=c.prompt_tokens,
                cached_tokens=c.cached_tokens,
                generated_tokens=c.generated_tokens,
                seed=c.seed if c.seed is not None else result.seed,
                grammar_complete=c.grammar_complete,
                timings=timings,
            )
            for c in result.completions
        ]
        texts = [c.text for c in result.completions]
        if batched:
            return cls(generated_text=texts, details=details)
        return cls(generated_text=texts[0], details=details[0])


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "not_ready"] = Field(
        description="ok: serving; loading: a new execution environment is still loading the model (503, "
        "Retry-After); not_ready: the model failed to load (503; the reason is in the init log line)."
    )
    loaded: bool
    model_id: str | None = None
    dtype: str | None = None
    context_length: int | None = None
    load_seconds: float | None = None
    cold_start: bool = Field(description="True on the first invocation of this execution environment.")
    model: dict[str, object] = Field(default_factory=dict, description="The preparation manifest.")
    cpu: dict[str, object] = Field(
        default_factory=dict, description="The CPU's ISA (AVX2, AVX-512, VNNI, AMX) as the libraries use it."
    )
    kernels: dict[str, object] = Field(default_factory=dict, description="Which kernels the model runs.")
    speeds: dict[str, object] = Field(
        default_factory=dict,
        description="The planner's measured speeds on this execution environment (prompt tokens per second, "
        "seconds per decode step).",
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="Stable error code, e.g. validation_error.")
    message: str
    request_id: str | None = None
    details: list[dict[str, object]] = Field(default_factory=list)


# API Gateway envelopes: the fields Powertools' resolvers read, with the types API Gateway sends. Checked
# before the resolver runs, so a malformed event is a 400 naming the field instead of a crash inside it.
StrMap = dict[str, str] | None
ListMap = dict[str, list[str]] | None


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class RestRequestContext(_Envelope):
    requestId: str | None = None


class RestEvent(_Envelope):
    """An API Gateway REST API event (payload format 1.0, also what HTTP APIs send as version 1.0)."""

    httpMethod: str
    path: str
    headers: StrMap = None
    multiValueHeaders: ListMap = None
    queryStringParameters: StrMap = None
    multiValueQueryStringParameters: ListMap = None
    pathParameters: StrMap = None
    stageVariables: StrMap = None
    requestContext: RestRequestContext
    body: str | None = None
    isBase64Encoded: bool | None = None


class HttpDetails(_Envelope):
    method: str


class HttpRequestContext(_Envelope):
    http: HttpDetails
    stage: str
    requestId: str | None = None


class HttpEvent(_Envelope):
    """An API Gateway HTTP API event (payload format 2.0)."""

    version: Literal["2.0"]
    rawPath: str
    rawQueryString: str = ""
    cookies: list[str] | None = None
    headers: StrMap = None
    queryStringParameters: StrMap = None
    pathParameters: StrMap = None
    stageVariables: StrMap = None
    requestContext: HttpRequestContext
    body: str | None = None
    isBase64Encoded: bool | None = None
