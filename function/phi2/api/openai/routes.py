"""The OpenAI-compatible routes, on a Powertools Router that the handler includes.

They sit at the root of the API, next to `/generate`: the REST API's stage is `v1`, so the base URL
`https://<api>.execute-api.<region>.amazonaws.com/v1` is what `OpenAI(base_url=...)` takes. The resolvers
strip a leading `/v1` too (an HTTP API's $default stage, a custom domain, `sam local start-api`).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import unquote

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body
from pydantic import BaseModel

from phi2.api import serving as core
from phi2.api import streams
from phi2.api.openai import serving
from phi2.api.openai import streaming as openai_streaming  # stream: true on the streaming surface (issue 12)
from phi2.api.openai.errors import REQUEST_ID_HEADER
from phi2.api.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    Model,
    ModelList,
    OpenAIErrorResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from phi2.engine.generator import Generator
from phi2.runtime import invocation

router = Router()
# As API Gateway declares them (template.yaml): a model id may hold a slash (`microsoft/phi-2`).
ROUTES = {
    "/chat/completions": "POST",
    "/completions": "POST",
    "/models": "GET",
    "/models/{model+}": "GET",
    "/tokenize": "POST",
    "/detokenize": "POST",
}
TAGS = ["OpenAI-compatible"]


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"model": OpenAIErrorResponse}}}


GENERATION_ERRORS = {
    400: _error(
        "Invalid request, a value this server cannot honour (the field is in `param`), a context overflow "
        "(`code: context_length_exceeded`) or a prompt too long to read before the deadline"
    ),
    404: _error("Unknown model (`code: model_not_found`)"),
    413: _error("Body too large"),
    503: _error("Model not loaded"),
}


def _model() -> Generator:
    """The model; a request that arrives while a new environment is still loading it waits for it within the
    request's own deadline (503 with Retry-After if it cannot), whichever route it came to."""
    return core.model(wait_s=max(0.0, invocation.deadline().remaining()))


def _ok(body: BaseModel) -> Response:
    request_id = invocation.request_id()
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return Response(200, content_types.APPLICATION_JSON, body, headers=headers)


@router.post(
    "/chat/completions",
    summary="Chat completion (OpenAI-compatible)",
    description="The assistant's next message. The prompt is built with the tokenizer's chat template, or "
    "Phi-2's documented chat/QA format when the model ships none.",
    tags=TAGS,
    responses=GENERATION_ERRORS,
)
def chat_completions(request: Annotated[ChatCompletionRequest, Body()]) -> Response[ChatCompletionResponse]:
    if request.stream and streams.current() is not None:  # issue 12: streamed on the streaming surface
        return openai_streaming.chat(request)
    serving.check_chat(request)  # refusals first: they need no model
    generator = _model()
    plan = serving.plan_chat(request, generator)
    served = core.generate(plan.rows, plan.params, seeds=plan.seeds, protocol="openai", cache_key=plan.cache_key)
    return _ok(serving.chat_response(plan, served.result, generator))


@router.post(
    "/completions",
    summary="Text completion (OpenAI-compatible, legacy)",
    description="Continue each prompt.",
    tags=TAGS,
    responses=GENERATION_ERRORS,
)
def completions(request: Annotated[CompletionRequest, Body()]) -> Response[CompletionResponse]:
    if request.stream and streams.current() is not None:  # issue 12: streamed on the streaming surface
        return openai_streaming.completions(request)
    serving.check_completion(request)
    generator = _model()
    plan = serving.plan_completion(request, generator)
    served = core.generate(plan.rows, plan.params, seeds=plan.seeds, protocol="openai", cache_key=plan.cache_key)
    return _ok(serving.completion_response(plan, served.result, generator))


@router.get(
    "/models", summary="The served model (OpenAI-compatible)", tags=TAGS, responses={503: _error("Model not loaded")}
)
def list_models() -> Response[ModelList]:
    return _ok(ModelList(data=[serving.model_card(_model().info)]))


def _retrieve(name: str) -> Response:
    info = _model().info
    serving.resolve_model(unquote(name), info)
    return _ok(serving.model_card(info))


@router.get(
    "/models/<model>",
    summary="One model (OpenAI-compatible); its id or alias",
    tags=TAGS,
    responses={404: _error("Unknown model (`code: model_not_found`)"), 503: _error("Model not loaded")},
)
def retrieve_model(model: str) -> Response[Model]:
    return _retrieve(model)


@router.get(
    "/models/<owner>/<name>",
    summary="One model whose id holds a slash (e.g. microsoft/phi-2)",
    tags=TAGS,
    responses={404: _error("Unknown model (`code: model_not_found`)"), 503: _error("Model not loaded")},
)
def retrieve_namespaced_model(owner: str, name: str) -> Response[Model]:
    return _retrieve(f"{owner}/{name}")


@router.post(
    "/tokenize",
    summary="Tokenize a prompt, or a chat as /chat/completions renders it (vLLM's)",
    description="`prompt` or `messages` (with `tools`, as a chat request would show them). The ids are the ones the "
    "model reads; `count` is what a request's `prompt_tokens` would be, `max_model_len` the context.",
    tags=TAGS,
    responses={k: v for k, v in GENERATION_ERRORS.items() if k != 413},
)
def tokenize(request: Annotated[TokenizeRequest, Body()]) -> Response[TokenizeResponse]:
    generator = _model()
    return _ok(serving.tokenize(request, generator))


@router.post(
    "/detokenize",
    summary="The text of token ids (vLLM's)",
    tags=TAGS,
    responses={k: v for k, v in GENERATION_ERRORS.items() if k != 413},
)
def detokenize(request: Annotated[DetokenizeRequest, Body()]) -> Response[DetokenizeResponse]:
    generator = _model()
    return _ok(serving.detokenize(request, generator))
