"""What API Gateway does before (or instead of) the function, as template.yaml configures it, read through the
real SAM translator: catch-all routes on both APIs, so every path reaches the function (the `/v1/...` paths
the README promises, unknown ones, the API's root) with the key requirement and the integration of the named
routes; the answers API Gateway gives itself (a missing or wrong key, the throttle, the quota, its own errors),
rendered as API Gateway renders them and handed to the real `openai` SDK, which must raise its typed
exception for each; and the provisioned concurrency of each function, chosen separately.

API Gateway itself cannot run here: what it does with these settings (route matching, the order of its
checks) is AWS's documented behaviour, not tested; what is tested is that the deployed template says it.
"""

from __future__ import annotations

import json
import re

import httpx2
import openai
import pytest
from apigateway_transport import BASE_URL
from deployables import CATCH_ALL, evaluate, resolve, template_source, translate

APIS = ("Api", "StreamApi")
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def cfn():
    return translate()


def body_of(template: dict, api: str) -> dict:
    return template["Resources"][api]["Properties"]["Body"]


def render(template: str, response_type: str, message: str) -> bytes:
    """A gateway response's body as API Gateway renders it: `$context.error.messageString` is the message as a
    quoted JSON string, `$context.error.responseType` the response type."""
    text = template.replace("$context.error.messageString", json.dumps(message))
    return text.replace("$context.error.responseType", response_type).encode()


def sdk_error(status: int, headers: dict[str, str], content: bytes) -> openai.APIStatusError:
    """What the real openai SDK raises when the API answers this (a transport that plays API Gateway)."""

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers={"Content-Type": "application/json", **headers}, content=content)

    with (
        openai.OpenAI(
            base_url=BASE_URL,
            api_key="unused",
            default_headers={"x-api-key": "wrong"},
            http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
            max_retries=0,
        ) as client,
        pytest.raises(openai.APIStatusError) as raised,
    ):
        client.chat.completions.create(model="phi-2", messages=[{"role": "user", "content": "Hi"}])
    return raised.value


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("require", ["true", "false"])
def test_every_path_and_method_no_route_names_reaches_the_function_with_the_key_of_the_named_routes(api, require):
    cfn = translate(RequireApiKey=require)
    parameters = {"RequireApiKey": require}
    paths = body_of(cfn, api)["paths"]
    generate = paths["/generate"]["post"]
    for path, method in CATCH_ALL.items():
        # THEN the API's root and every other path accept any method
        operation = paths[path][method]
        # AND send it through the same integration as /generate (on the streaming API: STREAM)
        assert operation["x-amazon-apigateway-integration"] == generate["x-amazon-apigateway-integration"], path
        # AND require the API key exactly when /generate does
        assert evaluate(operation.get("security"), cfn, parameters) == evaluate(
            generate.get("security"), cfn, parameters
        )
    # AND the greedy path variable is declared (API Gateway refuses a {proxy+} it cannot bind)
    (parameter,) = paths["/{proxy+}"][CATCH_ALL["/{proxy+}"]]["parameters"]
    assert (parameter["name"], parameter["in"], parameter["required"]) == ("proxy", "path", True)


def test_a_v1_prefixed_path_reached_through_the_catch_all_is_the_route_without_its_prefix(monkeypatch):
    from conftest import LambdaContext, load_event
    from fakes import FakeGenerator

    from phi2.engine import generator as generator_module
    from phi2.runtime import handler

    fake = FakeGenerator(model_id="microsoft/phi-2")
    monkeypatch.setattr(generator_module, "get_generator", lambda wait_s=None: fake)
    # GIVEN the request of an SDK whose base URL is the stage's plus /v1 (…/v1/v1/chat/completions), as the
    # catch-all resource hands it to the function: the whole path after the stage
    event = load_event("openai/rest-chat-completions-v1-prefixed")
    event["resource"] = "/{proxy+}"
    assert event["path"].startswith("/v1/")
    # WHEN the function answers it
    answer = handler.lambda_handler(event, LambdaContext())
    # THEN it is the route without the prefix: a chat completion
    assert answer["statusCode"] == 200, answer["body"]
    assert json.loads(answer["body"])["object"] == "chat.completion"


# (response type, status, the SDK's exception, the error code a client can branch on)
GATEWAY_ANSWERS = [
    ("INVALID_API_KEY", 401, openai.AuthenticationError, "invalid_api_key"),
    ("THROTTLED", 429, openai.RateLimitError, "rate_limit_exceeded"),
    ("QUOTA_EXCEEDED", 429, openai.RateLimitError, "insufficient_quota"),
    ("MISSING_AUTHENTICATION_TOKEN", 405, openai.APIStatusError, "method_not_allowed"),
]


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(("response_type", "status", "raised", "code"), GATEWAY_ANSWERS)
def test_api_gateways_own_answers_are_openai_errors_the_sdk_raises_by_type(
    cfn, api, response_type, status, raised, code
):
    responses = body_of(cfn, api)["x-amazon-apigateway-gateway-responses"]
    # GIVEN the gateway response API Gateway sends for this case
    response = responses[response_type]
    assert response["statusCode"] == str(status)
    headers = {
        name.removeprefix("gatewayresponse.header."): value.strip("'")
        for name, value in response.get("responseParameters", {}).items()
    }
    content = render(response["responseTemplates"]["application/json"], response_type, "Too Many Requests")
    # THEN its body is OpenAI's error shape
    error = json.loads(content)["error"]
    assert set(error) == OPENAI_ERROR_KEYS and error["code"] == code and error["message"]
    # AND the real openai SDK raises its typed exception for it, with the code and message
    exception = sdk_error(status, headers, content)
    assert type(exception) is raised and exception.status_code == status
    assert exception.code == code and error["message"] in str(exception)


def test_a_throttled_client_is_told_to_retry_after_a_second(cfn):
    for api in APIS:
        throttled = body_of(cfn, api)["x-amazon-apigateway-gateway-responses"]["THROTTLED"]
        assert throttled["responseParameters"] == {"gatewayresponse.header.Retry-After": "'1'"}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    ("response_type", "status", "kind"),
    [("DEFAULT_4XX", 413, "invalid_request_error"), ("DEFAULT_5XX", 504, "server_error")],
)
def test_every_other_answer_of_api_gateway_keeps_its_status_in_openais_shape(cfn, api, response_type, status, kind):
    response = body_of(cfn, api)["x-amazon-apigateway-gateway-responses"][response_type]
    # GIVEN API Gateway's own error (a body over its limit, an integration timeout) with its default status
    assert "statusCode" not in response
    specific = "REQUEST_TOO_LARGE" if status == 413 else "INTEGRATION_TIMEOUT"
    content = render(response["responseTemplates"]["application/json"], specific, "Endpoint request timed out")
    # THEN the body is OpenAI's shape, naming API Gateway's response type, and the SDK reads it
    error = json.loads(content)["error"]
    assert error == {"message": "Endpoint request timed out", "type": kind, "param": None, "code": specific}
    exception = sdk_error(status, {}, content)
    assert exception.status_code == status and exception.code == specific


def test_both_apis_answer_for_themselves_alike(cfn):
    assert (
        body_of(cfn, "Api")["x-amazon-apigateway-gateway-responses"]
        == body_of(cfn, "StreamApi")["x-amazon-apigateway-gateway-responses"]
    )


@pytest.mark.parametrize(("buffered", "streamed"), [(0, 0), (2, 0), (0, 3), (1, 4)])
def test_each_function_gets_the_provisioned_concurrency_asked_for_it(buffered, streamed):
    parameters = {"ProvisionedConcurrency": buffered, "StreamProvisionedConcurrency": streamed}
    cfn = translate(**parameters)
    for alias, wanted, parameter in (
        ("GenerateFunctionAliaslive", buffered, "ProvisionedConcurrency"),
        ("StreamFunctionAliaslive", streamed, "StreamProvisionedConcurrency"),
    ):
        # WHEN CloudFormation evaluates the `live` alias of each function (the one its API invokes)
        config = evaluate(cfn["Resources"][alias]["Properties"].get("ProvisionedConcurrencyConfig"), cfn, parameters)
        # THEN it has exactly the environments asked for that function, and none for 0
        if wanted == 0:
            assert config is None, alias
        else:
            assert config == {"ProvisionedConcurrentExecutions": {"Ref": parameter}}, alias
            assert resolve(config["ProvisionedConcurrentExecutions"], parameters) == str(wanted)


def test_the_provisioned_init_limit_covers_each_functions_load():
    # Lambda gives a provisioned environment's init 130 s or the function's timeout, whichever is higher
    # (Lambda developer guide, "Understanding the Lambda execution environment lifecycle")
    parameters = template_source()["Parameters"]
    resources = template_source()["Resources"]
    buffered_limit = max(130, parameters["Timeout"]["Default"])
    streamed_limit = max(130, resources["StreamFunction"]["Properties"]["Timeout"])
    # THEN both are above the cold start `make bench` measured for int8 Phi-2 on 2 vCPUs (18.7 s, README),
    # with room for a first read of the image's layers
    assert buffered_limit == 130 and streamed_limit == 900
    # AND the parameters say which function each one covers, and the limits that bind them
    text = {name: re.sub(r"\s+", " ", parameters[name]["Description"]) for name in parameters}
    assert "GenerateFunction" in text["ProvisionedConcurrency"] and "130 s" in text["ProvisionedConcurrency"]
    assert "StreamFunction" in text["StreamProvisionedConcurrency"]
    assert "ReservedConcurrency" in text["ProvisionedConcurrency"] and "100" in text["ReservedConcurrency"]
    assert "per method" in text["ThrottlingRateLimit"]
