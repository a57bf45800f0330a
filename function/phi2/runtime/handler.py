"""Lambda entry point: routes, decorators and the mapping of errors to HTTP. Nothing else.

Serves API Gateway REST (payload v1) and HTTP API (payload v2) events through Powertools' event
handler, and direct invocations (`{"prompt": ...}` as `aws lambda invoke` sends) with plain JSON.
"""

from __future__ import annotations

import binascii
import json
from typing import Any

from aws_lambda_powertools.event_handler import (
    APIGatewayHttpResolver,
    APIGatewayRestResolver,
    Response,
    content_types,
)
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import ValidationError

from phi2 import errors
from phi2.api import native
from phi2.api.openai import errors as openai_errors
from phi2.api.openai import routes as openai_routes
from phi2.api.schemas import ErrorResponse, GenerateRequest, HttpEvent, RestEvent
from phi2.engine.generator import load_status, start_loading
from phi2.runtime import invocation
from phi2.runtime.observability import logger, metrics, tracer
from phi2.settings import get_settings

settings = get_settings()

ROUTES = {**native.ROUTES, **openai_routes.ROUTES, "/openapi.json": "GET"}
# The OpenAI base URL is the stage's (https://<api>/v1): a path that still carries /v1 (an HTTP API's
# $default stage, a custom domain, sam local start-api) is routed as the same path without it.
STRIP_PREFIXES = ["/v1"]
# Keys only API Gateway events have: an event with any of them is answered as an API Gateway request.
API_GATEWAY_KEYS = ("requestContext", "httpMethod", "rawPath", "routeKey")
# Input echoed in an error message (a path, a field name) is cut to this many characters.
MAX_ECHO_CHARS = 80
# An error lists at most this many problems: a body of ten thousand unknown fields gets a short answer.
MAX_ERROR_DETAILS = 20
API_TITLE = "Phi-2 text generation"
API_VERSION = "1.0.0"


def _request_id() -> str | None:
    return invocation.request_id()


def _clip(text: object) -> str:
    """Caller input quoted in an error, cut short: it may be huge, and it is not ours to echo in full."""
    text = str(text)
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "…"


def _error_body(exc: errors.ApiError, request_id: str | None) -> dict[str, Any]:
    return ErrorResponse(error=exc.code, message=exc.message, request_id=request_id, details=exc.details).model_dump()


def _render_error(
    exc: errors.ApiError, request_id: str | None, method: Any, path: Any
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """The one mapping of an error to an answer: OpenAI's shape and status codes on OpenAI's paths (with the
    request id in `x-request-id`, where its SDK reads it), the native shape everywhere else."""
    if openai_errors.is_openai_path(path):
        headers = {**exc.headers, **({openai_errors.REQUEST_ID_HEADER: request_id} if request_id else {})}
        return openai_errors.status_code(exc), openai_errors.render(exc, str(method), _clip(path)), headers
    return exc.status_code, _error_body(exc, request_id), dict(exc.headers)


def _error_response(exc: errors.ApiError, headers: dict[str, str] | None = None, request: Any = None) -> Response:
    method, path = (request.http_method, request.path) if request is not None else (None, None)
    status, body, extra = _render_error(exc, _request_id(), method, path)
    return Response(
        status_code=status,
        content_type=content_types.APPLICATION_JSON,
        body=json.dumps(body),
        headers={**extra, **(headers or {})} or None,
    )


def _validation_error(exc: ValidationError | RequestValidationError) -> errors.ApiError:
    """Name every offending field; never echo the input (it may be a huge or private prompt)."""
    problems = exc.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        reason = next(p.get("ctx", {}).get("error", "") for p in problems if p.get("type") == "json_invalid")
        return errors.InvalidJson(f"request body is not valid JSON: {reason}".rstrip(": "))
    if any(p.get("type") == "missing" and tuple(p.get("loc", ())) == ("body",) for p in problems):
        return errors.ValidationFailed(
            'request body is empty: send a JSON object such as {"prompt": "..."}',
            details=[{"field": "body", "message": "Field required", "type": "missing"}],
        )
    details = []
    for p in problems[:MAX_ERROR_DETAILS]:
        loc = [_clip(part) or '""' for part in p.get("loc", ()) if part != "body"]
        details.append({"field": ".".join(loc) or "body", "message": p.get("msg", ""), "type": p.get("type", "")})
    summary = "; ".join(f"{d['field']}: {d['message']}" for d in details)
    if len(problems) > MAX_ERROR_DETAILS:
        summary += f"; and {len(problems) - MAX_ERROR_DETAILS} more"
    return errors.ValidationFailed(f"invalid request: {summary}", details=details)


class _NotJson(ValueError):
    """Something Python's json reads that JSON does not have."""


def _reject_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not valid JSON (JSON numbers are finite)")


def _parse_json_body(text: str) -> Any:
    """The request body as JSON, for the resolver: strict JSON, an object, and never a crash.

    Python's json accepts NaN and Infinity (JSON has neither), recurses once per nesting level and refuses
    integers of more than 4,300 digits; each of those is reported as invalid JSON, like any syntax error.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError:
        raise
    except _NotJson as exc:
        raise json.JSONDecodeError(str(exc), text, 0) from None
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
    except ValueError:  # int() refusing a literal of more than sys.get_int_max_str_digits() digits
        raise json.JSONDecodeError("a number has too many digits", text, 0) from None
    if not isinstance(value, dict):
        raise RequestValidationError(
            [{"type": "model_attributes_type", "loc": ("body",), "msg": "the body must be a JSON object", "input": {}}]
        )
    return value


def _build(resolver_class: type[ApiGatewayResolver]) -> ApiGatewayResolver:
    app = resolver_class(
        enable_validation=True, json_body_deserializer=_parse_json_body, strip_prefixes=list(STRIP_PREFIXES)
    )
    app.include_router(native.router)
    app.include_router(openai_routes.router)

    def fail(exc: errors.ApiError, headers: dict[str, str] | None = None) -> Response:
        return _error_response(exc, headers, app.current_event)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi():  # no annotation: the spec does not describe itself
        spec = app.get_openapi_json_schema(title=API_TITLE, version=API_VERSION)
        return Response(200, content_types.APPLICATION_JSON, spec)

    @app.exception_handler(RequestValidationError)
    def on_validation(exc: RequestValidationError) -> Response:
        return fail(_validation_error(exc))

    @app.exception_handler(RequestUnsupportedContentType)
    def on_content_type(exc: RequestUnsupportedContentType) -> Response:
        return fail(errors.UnsupportedMediaType("send the body as application/json"))

    # Raised while the resolver decodes the body. One handler each: Powertools takes a list of classes, but
    # registers a tuple as one key that never matches, which made these 500s.
    @app.exception_handler(binascii.Error)
    def on_bad_base64(exc: Exception) -> Response:
        return fail(errors.BadRequest("request body is marked isBase64Encoded but is not valid base64"))

    @app.exception_handler(UnicodeDecodeError)
    def on_bad_utf8(exc: Exception) -> Response:
        return fail(errors.BadRequest("request body is not valid UTF-8"))

    @app.exception_handler(errors.ApiError)
    def on_api_error(exc: errors.ApiError) -> Response:
        if exc.status_code >= 500:
            logger.error("request failed", extra={"error": exc.code})
        return fail(exc)

    @app.not_found
    def on_not_found(exc: NotFoundError) -> Response:
        path, method = app.current_event.path, app.current_event.http_method
        allowed = ROUTES.get(path) or ROUTES.get(path.removeprefix("/v1"))
        if allowed and allowed != method:
            return fail(
                errors.MethodNotAllowed(f"{_clip(method)} is not allowed on {path}; use {allowed}"),
                headers={"Allow": allowed},
            )
        return fail(errors.NotFound(f"no route for {_clip(method)} {_clip(path)}; try POST /generate"))

    @app.exception_handler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        # Full detail (stack trace) to the logs only; the caller gets the request id to quote.
        logger.exception("unhandled error")
        return fail(errors.ApiError(errors.INTERNAL_ERROR_MESSAGE))

    return app


rest_app = _build(APIGatewayRestResolver)
http_app = _build(APIGatewayHttpResolver)


def event_kind(event: Any) -> str:
    """How an event came: through an API Gateway REST API (`rest`), an HTTP API (`http`), or directly."""
    if isinstance(event, dict) and any(key in event for key in API_GATEWAY_KEYS):
        return "http" if event.get("version") == "2.0" else "rest"
    return "direct"


def _envelope_problem(event: dict[str, Any], kind: str) -> errors.ApiError | None:
    """Why this API Gateway event cannot be served, checked before the resolver reads it; None if it can."""
    try:
        envelope = (HttpEvent if kind == "http" else RestEvent).model_validate(event)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(_clip(part) for part in first.get("loc", ()))
        # pydantic names the model class in this message; the caller needs the shape, not our class names.
        message = "Input should be an object" if first.get("type") == "model_type" else first.get("msg", "")
        return errors.BadRequest(f"malformed API Gateway event: {where}: {message}")
    if _body_size(event) > settings.max_body_bytes:
        return errors.PayloadTooLarge(f"request body is over the {settings.max_body_bytes}-byte limit")
    if envelope.body:
        media_type = _media_type(event)
        # The resolver would parse a form or multipart body as such, and then report its JSON as unknown
        # fields: say what is wrong instead.
        if media_type not in ("", "application/json"):
            return errors.UnsupportedMediaType(f"send the body as application/json, not {_clip(media_type)}")
        if media_type:
            _lowercase_media_type(event)
    return None


def _media_type(event: dict[str, Any]) -> str:
    headers = {name.lower(): value for name, value in (event.get("headers") or {}).items()}
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _lowercase_media_type(event: dict[str, Any]) -> None:
    """Media types are case-insensitive, but the resolver only takes a lowercase `application/json`."""
    for name, value in event["headers"].items():
        if name.lower() == "content-type":
            media_type, _, parameters = value.partition(";")
            event["headers"][name] = media_type.strip().lower() + (";" + parameters if parameters else "")


def _body_size(event: dict[str, Any]) -> int:
    body = event.get("body") or ""
    return len(body.encode("utf-8", "surrogatepass")) if isinstance(body, str) else 0


def _proxy_error(exc: errors.ApiError, request_id: str | None, event: Any = None) -> dict[str, Any]:
    """An API Gateway proxy response built before Powertools sees the event (valid for v1 and v2)."""
    event = event if isinstance(event, dict) else {}
    context = event.get("requestContext")
    http = context.get("http") if isinstance(context, dict) else None
    method = event.get("httpMethod") or (http.get("method") if isinstance(http, dict) else None)
    status, body, headers = _render_error(exc, request_id, method, event.get("path") or event.get("rawPath"))
    return {
        "statusCode": status,
        "headers": {"Content-Type": content_types.APPLICATION_JSON, **headers},
        "body": json.dumps(body),
        "isBase64Encoded": False,
    }


def _direct(event: Any, request_id: str | None) -> dict[str, Any]:
    """A direct invocation: the request body itself is the event; the result is plain JSON."""
    try:
        if not isinstance(event, dict):
            raise errors.BadRequest('the event must be a JSON object such as {"prompt": "..."}')
        request = GenerateRequest.model_validate(event)
        return native.generate_response(request).model_dump()
    except ValidationError as exc:
        failure = _validation_error(exc)
    except errors.ApiError as exc:
        failure = exc
    except Exception:  # noqa: BLE001 - any failure becomes the generic 500, logged with its stack
        logger.exception("unhandled error")
        failure = errors.ApiError(errors.INTERNAL_ERROR_MESSAGE)
    return {**_error_body(failure, request_id), "status_code": failure.status_code}


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler(capture_response=False, capture_error=False)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    """Lambda handler: dispatch by event shape."""
    kind = event_kind(event)
    invocation.begin(context, kind, event)
    request_id = _request_id()
    if kind == "direct":
        return _direct(event, request_id)

    problem = _envelope_problem(event, kind)
    if problem is not None:
        return _proxy_error(problem, request_id, event)
    logger.set_correlation_id(event["requestContext"].get("requestId"))
    app = http_app if kind == "http" else rest_app
    try:
        return app.resolve(event, context)
    except Exception:  # noqa: BLE001 - logged with its stack, answered 400
        # Routes never get here (their errors are mapped above): this is an envelope Powertools cannot read.
        logger.exception("malformed API Gateway event")
        return _proxy_error(errors.BadRequest("malformed API Gateway event"), request_id, event)


def _report_load() -> None:
    """After the load (in the loading thread, or in init): one log line saying what is loaded, or why not."""
    generator, reason = load_status()
    if generator is None:
        logger.error("model failed to load", extra={"reason": reason, "model_dir": str(settings.model_dir)})
        return
    info = generator.info
    metrics.add_metric(name="ModelLoadSeconds", unit=MetricUnit.Seconds, value=info.load_seconds)
    logger.info(
        "model ready",
        extra={
            "model_id": info.model_id,
            "dtype": info.dtype,
            "load_seconds": round(info.load_seconds, 3),
            "cpu": info.cpu,
            "kernels": info.kernels,
            "speeds": generator.speeds(),
        },
    )


def _load_at_init() -> None:
    """Start the load in the init phase: in the background for on-demand environments (init returns at once,
    well inside Lambda's 10 s, and the first request waits for the model within its own deadline), fully
    for provisioned concurrency (whose init phase may take minutes, so requests always find it warm)."""
    background = settings.load_in_background
    logger.info("loading the model", extra={"background": background, "model_dir": str(settings.model_dir)})
    start_loading(background, on_done=_report_load)


if settings.preload:
    _load_at_init()
