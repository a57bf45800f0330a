"""Stream one generation as Server-Sent Events on the current invocation's response stream.

Shared by every protocol that streams (the native `/generate_stream`, OpenAI's `stream: true`); a protocol
only says how its events look (`EventFormat`). The rules live here once:

- errors found before the first byte (validation, context overflow, the planner's refusal) propagate, and
  the resolver answers them as normal, non-streamed 4xx responses, exactly as on the buffered surface;
- the status, headers and an SSE comment go out as soon as the request is admitted, before the prompt
  pass; the generator signals admission with an `on_step` call that carries no events, and at the latest
  the first token opens the stream. While the model works silently (a new environment's load before
  admission, a long prompt pass), the transport's keep-alive (`streams.KeptAlive`) sends SSE comments, so
  no idle timeout fires (5 minutes on a regional API Gateway endpoint, 30 s on an edge-optimised one); if
  that silence comes before admission, it opens the stream as announced here, and a later error becomes an
  error event;
- every step's events are written as they come; when the reader stops accepting bytes (the client went
  away), `on_step` returns False and the generator stops (`cancelled`);
- a failure after the first byte ends the stream with an error event and the stream's error trailers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from aws_lambda_powertools.event_handler import Response

from phi2 import errors
from phi2.api import serving, streams
from phi2.engine.generator import GenerationParams, StepEvent
from phi2.runtime import invocation
from phi2.runtime.observability import logger
from phi2.settings import get_settings

STREAM_ERROR_TYPE = "Runtime.StreamError"
"""The error type a failed stream reports in its `Lambda-Runtime-Function-Error-Type` trailer (the value
aws-lambda-rust-runtime sends: lambda-runtime/src/types.rs, `ToStreamErrorTrailer`)."""
OPENING_COMMENT = "ok"
REQUEST_ID_HEADER = streams.REQUEST_ID_HEADER


class EventFormat(Protocol):
    """How one protocol writes a generation's events (each method returns whole SSE events, as bytes)."""

    def opening(self) -> bytes:
        """Events sent with the stream's first bytes, at admission (may be empty bytes)."""
        ...

    def steps(self, events: list[StepEvent]) -> bytes:
        """The events of one decoding step (may be empty bytes)."""
        ...

    def done(self, served: serving.Served) -> bytes:
        """The events after the last step: the final answer, usage, an end marker."""
        ...

    def error(self, failure: errors.ApiError, request_id: str | None) -> bytes:
        """The event that ends a stream that failed after its first byte."""
        ...


class _Opened:
    """The stream of one generation: opened once, at admission or with the first token, or earlier by a
    keep-alive (the opening is announced up front, so whoever opens it sends the same first bytes)."""

    def __init__(self, stream: streams.ResponseStream, fmt: EventFormat) -> None:
        self.stream = stream
        self.fmt = fmt
        request_id = invocation.request_id()
        # The request id in a header, as the buffered answers carry it in their body or header.
        headers = {**streams.SSE_HEADERS, REQUEST_ID_HEADER: request_id} if request_id else streams.SSE_HEADERS
        self.opening = (200, headers, streams.sse_comment(OPENING_COMMENT) + fmt.opening())
        stream.announce(*self.opening)

    def ensure_open(self) -> bool:
        return self.stream.open_once(*self.opening)

    def write(self, data: bytes) -> bool:
        return self.stream.write(data) if data else self.stream.open


def not_here(route: str) -> errors.BadRequest:
    """The answer to a streaming request on the buffered surface: where streaming is served."""
    base = get_settings().stream_base_url
    where = f"POST {base.rstrip('/')}{route}" if base else "the streaming API (phi2.runtime.stream_runtime)"
    return errors.BadRequest(
        f"this API answers whole responses only; streams are served by {where}",
        details=[{"stream_base_url": base or None}],
    )


def generate(
    prompts: list[str],
    params: GenerationParams,
    fmt: EventFormat,
    *,
    seeds: Sequence[int] | None = None,
    protocol: str,
    cache_key: str | None = None,
) -> Response:
    """Generate and stream; returns the response the resolver needs (dropped by the streaming runtime).

    Must run on the streaming surface (`streams.current()` is set): callers answer `not_here` otherwise.
    """
    stream = streams.current()
    if stream is None:
        raise RuntimeError("streaming.generate needs the invocation's response stream")
    out = _Opened(stream, fmt)

    def on_step(events: list[StepEvent]) -> bool:
        if not out.ensure_open():
            return False
        return out.write(fmt.steps(events)) if events else True

    try:
        served = serving.generate(prompts, params, seeds=seeds, on_step=on_step, protocol=protocol, cache_key=cache_key)
    except errors.ApiError as exc:
        if not stream.started:
            raise  # before the first byte: a normal error response, as on the buffered surface
        if exc.status_code >= 500:
            logger.error("stream failed", extra={"error": exc.code})
        _end_with_error(out, fmt, exc)
        return streams.streamed()
    except Exception:
        if not stream.started:
            raise
        logger.exception("stream failed")
        _end_with_error(out, fmt, errors.ApiError(errors.INTERNAL_ERROR_MESSAGE))
        return streams.streamed()
    if out.ensure_open():
        out.write(fmt.done(served))
    return streams.streamed()


def _end_with_error(out: _Opened, fmt: EventFormat, failure: errors.ApiError) -> None:
    out.write(fmt.error(failure, invocation.request_id()))
    out.stream.fail(STREAM_ERROR_TYPE, f"{failure.code}: {failure.message}")
