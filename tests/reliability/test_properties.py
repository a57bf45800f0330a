"""Property-based fuzzing, in process with the fake generator: no request schema input and no event,
however malformed, produces an unhandled exception or a 5xx."""

from __future__ import annotations

import base64
import copy
import json
import math

import pytest
from conftest import LambdaContext, load_event
from fakes import FakeGenerator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from phi2.api.schemas import MAX_NEW_TOKENS, MAX_PROMPTS, MAX_STOP_SEQUENCES, GenerateRequest
from phi2.engine import generator as generator_module
from phi2.runtime import handler

# Modest example counts: the whole module runs in seconds on two busy cores.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELDS = list(GenerateRequest.model_fields)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    # Lone surrogates: valid in a Python str (and in JSON "\ud800" escapes), not encodable as UTF-8.
    | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
)
json_ish = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=12,
)
# Mostly the schema's own field names, so the fuzzer reaches the validators rather than "extra field".
requests = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), json_ish, max_size=6)
good_values = {
    "prompt": st.text(min_size=1, max_size=50),
    "max_new_tokens": st.integers(1, 8),
    "temperature": st.floats(0.01, 5.0),
    "top_p": st.floats(0.01, 1.0),
    "seed": st.integers(0, 2**32 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=5), max_size=2),
}


@pytest.fixture(scope="module", autouse=True)
def fake_generator():
    with pytest.MonkeyPatch.context() as patch:
        generator = FakeGenerator()
        patch.setattr(generator_module, "get_generator", lambda wait_s=None: generator)
        yield generator


def invoke(event: object) -> dict:
    return handler.lambda_handler(event, LambdaContext())


def assert_clean_error(body: dict, status: int) -> None:
    """A 4xx in the API's error shape, with a message and nothing internal in it."""
    assert 400 <= status < 500, body
    assert body["error"] and body["message"] and body["request_id"]
    text = json.dumps(body)
    assert "Traceback" not in text and "/site-packages/" not in text and "phi2/" not in text


@FUZZ
@given(payload=requests)
def test_any_request_body_either_validates_within_bounds_or_raises_a_validation_error(payload):
    # GIVEN any JSON-ish object, mostly made of the schema's field names
    # WHEN the request schema validates it
    try:
        request = GenerateRequest.model_validate(payload)
    except ValidationError:
        return  # THEN it is rejected the one expected way...
    # ...or every value it lets through is within the bounds the generator relies on
    params = request.params()
    assert 1 <= len(request.prompt_list()) <= MAX_PROMPTS and all(request.prompt_list())
    assert 1 <= params.max_new_tokens <= MAX_NEW_TOKENS
    assert math.isfinite(params.temperature) and params.temperature > 0
    assert math.isfinite(params.top_p) and 0 < params.top_p <= 1
    assert len(params.stop) <= MAX_STOP_SEQUENCES and all(params.stop)


@FUZZ
@given(event=json_ish | requests)
def test_any_direct_invocation_gets_a_result_or_a_4xx_error_object(event):
    # GIVEN any JSON value as a direct invocation's event
    # WHEN the handler gets it
    result = invoke(event)
    # THEN it answers with generated text or a 4xx error object, never an exception or a 5xx
    if "statusCode" in result:
        # An object carrying an API Gateway key (e.g. {"rawPath": null}) is answered as an API Gateway event
        assert_proxy_response_is_not_a_5xx(result)
    elif "generated_text" not in result:
        assert_clean_error(result, result["status_code"])


def _api_event(kind: str) -> dict:
    return copy.deepcopy(load_event("http-generate-seed-prompt" if kind == "http" else "rest-generate-seed-prompt"))


def assert_proxy_response_is_not_a_5xx(response: dict) -> None:
    assert isinstance(response["statusCode"], int)
    body = json.loads(response["body"])
    if response["statusCode"] != 200:
        assert_clean_error(body, response["statusCode"])


bodies = (
    json_ish.map(lambda v: json.dumps(v, allow_nan=True))
    | requests.map(json.dumps)
    | st.text(max_size=60)
    | st.integers(1, 20_000).map(lambda depth: "[" * depth)  # deeper than Python's recursion limit
    | st.integers(4_000, 6_000).map(lambda digits: '{"prompt": "hi", "seed": ' + "9" * digits + "}")
)


@FUZZ
@given(
    kind=st.sampled_from(["rest", "http"]),
    body=bodies,
    encoding=st.sampled_from(["plain", "base64", "base64 of random bytes", "not base64"]),
    raw=st.binary(max_size=40),
)
def test_any_body_in_an_api_gateway_event_gets_a_proxy_response_below_500(kind, body, encoding, raw):
    # GIVEN an API Gateway event whose body is arbitrary text or JSON, plain, base64 (of it, or of random
    # bytes that need not be UTF-8), or flagged base64 without being so
    event = _api_event(kind)
    if encoding == "base64":
        event["body"] = base64.b64encode(body.encode("utf-8", "surrogatepass")).decode()
    elif encoding == "base64 of random bytes":
        event["body"] = base64.b64encode(raw).decode()
    else:
        event["body"] = body
    event["isBase64Encoded"] = encoding != "plain"
    # WHEN handled
    response = invoke(event)
    # THEN it is a proxy response: 200, or a 4xx JSON error
    assert_proxy_response_is_not_a_5xx(response)
    # AND only a JSON object is ever served (an array is not a request, not even its first element)
    if response["statusCode"] == 200 and encoding in ("plain", "base64"):
        assert isinstance(json.loads(body), dict)


def _paths(event: dict, prefix: tuple = ()) -> list[tuple]:
    found = []
    for key, value in event.items():
        found.append((*prefix, key))
        if isinstance(value, dict):
            found.extend(_paths(value, (*prefix, key)))
    return found


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["rest", "http"]))
def test_any_field_of_an_api_gateway_envelope_replaced_by_junk_gets_a_response_below_500(data, kind):
    # GIVEN a valid API Gateway event with one to three fields (at any depth) replaced by junk or removed
    event = _api_event(kind)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(event)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = event
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(json_ish)
        else:
            del parent[path[-1]]
    # WHEN handled
    response = invoke(event)
    # THEN the answer is a response, never an exception, and never a 5xx
    if "statusCode" in response:
        assert_proxy_response_is_not_a_5xx(response)
    elif "generated_text" not in response:  # so broken it no longer looks like API Gateway: a direct call
        assert_clean_error(response, response["status_code"])


@FUZZ
@given(
    kind=st.sampled_from(["rest", "http"]),
    headers=st.dictionaries(
        st.sampled_from(["Content-Type", "content-type", "Content-Length", "Accept"]) | st.text(max_size=10),
        st.text(max_size=30) | st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]),
        max_size=4,
    ),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]) | st.text(max_size=8),
    path=st.sampled_from(["/generate", "/health", "/openapi.json", "/", "/generate/", "//generate"])
    | st.text(max_size=30),
)
def test_any_headers_method_and_path_get_a_response_below_500(kind, headers, method, path):
    # GIVEN a seed request with arbitrary headers, method and path
    event = _api_event(kind)
    event["headers"] = headers
    if kind == "http":
        event["requestContext"]["http"]["method"] = method
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
    else:
        event["multiValueHeaders"] = {name: [value] for name, value in headers.items()}
        event["httpMethod"], event["path"] = method, path
    # WHEN handled
    response = invoke(event)
    # THEN 200 or a 4xx JSON error
    assert_proxy_response_is_not_a_5xx(response)


@FUZZ
@given(overrides=st.fixed_dictionaries({}, optional=good_values))
def test_any_valid_request_is_served_with_200(overrides):
    # GIVEN a valid body (the seed's prompt plus any in-bounds options)
    event = _api_event("rest")
    event["body"] = json.dumps({"prompt": "Hello", **overrides})
    # WHEN handled
    response = invoke(event)
    # THEN it is served
    assert response["statusCode"] == 200, response["body"]
