"""The native API: `POST /generate` (the Flask app's contract, extended), `POST /generate_stream` (the same
request, answered as Server-Sent Events on the streaming surface, in TGI's `/generate_stream` shape) and
`GET /health`."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import Router
from aws_lambda_powertools.event_handler.openapi.params import Body, Query

from phi2 import errors
from phi2.api import serving, streaming, streams
from phi2.api.schemas import ErrorResponse, GenerateRequest, GenerateResponse, HealthResponse
from phi2.engine.generator import StepEvent
from phi2.runtime import invocation
from phi2.settings import get_settings

router = Router()
ROUTES = {"/generate": "POST", "/generate_stream": "POST", "/health": "GET"}


def generate_response(request: GenerateRequest) -> GenerateResponse:
    """Serve a validated `/generate` request (REST, HTTP API and direct invocations alike)."""
    served = serving.generate(request.prompt_list(), request.params())
    return GenerateResponse.from_result(served.result, request.batched, served.deadline.source, served.available_s)


@router.post(
    "/generate",
    summary="Generate text",
    description="Continue the prompt. Stops at end-of-text, a stop string, max_new_tokens or the deadline, "
    "whichever comes first.",
    responses={
        200: {"description": "Generated text and details"},
        400: {"description": "Malformed JSON", "content": {"application/json": {"model": ErrorResponse}}},
        413: {"description": "Body too large", "content": {"application/json": {"model": ErrorResponse}}},
        422: {
            "description": "Invalid field, prompt too long for the context, or too long to read before the deadline",
            "content": {"application/json": {"model": ErrorResponse}},
        },
        503: {"description": "Model not loaded", "content": {"application/json": {"model": ErrorResponse}}},
    },
)
def generate(request: Annotated[GenerateRequest, Body()]) -> GenerateResponse:
    return generate_response(request)


class TgiEvents:
    """`/generate_stream` events as TGI sends them: one per token, then one with the whole answer.

    Token event: `{"index", "token": {"id", "text", "logprob", "special"}, "generated_text": null,
    "details": null}`; `text` is the token's new final text (concatenated, the tokens' texts are the
    completion). The final event has `"token": null` and the `generated_text` and `details` `/generate`
    answers. A failure after the first byte ends the stream with `event: error` and `/generate`'s error body.
    """

    def __init__(self, request: GenerateRequest) -> None:
        self.request = request
        self.index = 0

    def _event(self, token: dict[str, Any] | None, **final: Any) -> bytes:
        self.index += 1
        payload = {"index": self.index, "token": token, "generated_text": None, "details": None, **final}
        return streams.sse_data(payload)

    def opening(self) -> bytes:
        return b""

    def steps(self, events: list[StepEvent]) -> bytes:
        out = b""
        for event in events:
            if event.token_id is None and not event.text:
                continue  # a row's end with nothing left to say: the final event says why
            logprob = round(event.logprob.logprob, 4) if event.logprob is not None else None
            token = {"id": event.token_id, "text": event.text, "logprob": logprob, "special": False}
            out += self._event(token)
        return out

    def done(self, served: serving.Served) -> bytes:
        answer = GenerateResponse.from_result(served.result, False, served.deadline.source, served.available_s)
        return self._event(None, generated_text=answer.generated_text, details=answer.details.model_dump())

    def error(self, failure: errors.ApiError, request_id: str | None) -> bytes:
        body = ErrorResponse(error=failure.code, message=failure.message, request_id=request_id)
        return streams.sse_event("error", body.model_dump())


@router.post(
    "/generate_stream",
    summary="Generate text, streamed as Server-Sent Events",
    description="The request of `/generate` with one `prompt`. Answered on the streaming API only (the buffered "
    "one answers 400 naming it): one event per token (`token.id`, `token.text`, `token.logprob`), then a final "
    "event with `generated_text` and `details` as `/generate` returns them. Errors found before the first byte are "
    "normal JSON error responses; a failure later ends the stream with an `event: error`.",
    responses={
        200: {"description": "Server-Sent Events", "content": {streams.EVENT_STREAM: {}}},
        400: {
            "description": "Malformed JSON, or sent to the buffered API",
            "content": {"application/json": {"model": ErrorResponse}},
        },
        413: {"description": "Body too large", "content": {"application/json": {"model": ErrorResponse}}},
        422: {
            "description": "Invalid field (`prompts` is not streamed), prompt too long for the context or the deadline",
            "content": {"application/json": {"model": ErrorResponse}},
        },
        503: {"description": "Model not loaded", "content": {"application/json": {"model": ErrorResponse}}},
    },
)
def generate_stream(request: Annotated[GenerateRequest, Body()]):  # no annotation: the answer is SSE, not a model
    if streams.current() is None:
        raise streaming.not_here("/generate_stream")
    if request.batched:
        raise errors.ValidationFailed(
            "invalid request: prompts: /generate_stream streams one `prompt`; send `prompts` to /generate",
            details=[{"field": "prompts", "message": "not streamed: send one `prompt`", "type": "not_streamed"}],
        )
    # The chosen token's log-probability (TGI's `token.logprob`): read from the scores, it leaves sampling as is.
    params = dataclasses.replace(request.params(), logprobs=0)
    return streaming.generate(request.prompt_list(), params, TgiEvents(request), protocol="native_stream")


HEALTH_RETRY_AFTER_S = "1"
"""A /health that found the model still loading asks to be called again at once: on Lambda, waiting between
calls moves nothing (the environment is frozen without a request), the next call's own wait does."""


@router.get(
    "/health",
    summary="Which model is loaded, and whether it is ready",
    description="Waits for a model that is still loading, up to `HEALTH_WAIT_SECONDS` (20 s by default) and never "
    "past the request's deadline: on Lambda a new environment loads its model only while a request is in flight, "
    "so each call moves the load on. 200 once loaded; 503 `loading` with Retry-After when the wait ends first; 503 "
    "`not_ready` at once when the load failed. `?wait=0` answers at once (a liveness check).",
    responses={
        200: {"description": "The model is loaded"},
        503: {
            "description": "Still loading (Retry-After), or failed to load",
            "content": {"application/json": {"model": HealthResponse}},
        },
    },
)
def health(
    wait: Annotated[
        float | None,
        Query(ge=0, description="Seconds to wait for a loading model (capped by HEALTH_WAIT_SECONDS); 0: at once."),
    ] = None,
) -> Response[HealthResponse]:
    limit = get_settings().health_wait_s
    wait_s = max(0.0, min(limit if wait is None else wait, limit, invocation.deadline().remaining()))
    try:
        generator = serving.model(wait_s=wait_s)
    except errors.ModelLoading:
        body = HealthResponse(status="loading", loaded=False, cold_start=invocation.cold())
        return Response(503, content_types.APPLICATION_JSON, body, headers={"Retry-After": HEALTH_RETRY_AFTER_S})
    except errors.ModelNotReady:
        body = HealthResponse(status="not_ready", loaded=False, cold_start=invocation.cold())
        return Response(503, content_types.APPLICATION_JSON, body)
    info = generator.info
    body = HealthResponse(
        status="ok",
        loaded=True,
        model_id=info.model_id,
        dtype=info.dtype,
        context_length=info.context_length,
        load_seconds=round(info.load_seconds, 3),
        cold_start=invocation.cold(),
        model=info.manifest,
        cpu=info.cpu,
        kernels=info.kernels,
        speeds=generator.speeds(),
    )
    return Response(200, content_types.APPLICATION_JSON, body)
