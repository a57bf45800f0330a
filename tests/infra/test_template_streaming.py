"""template.yaml's streaming surface, read through the real SAM translator: the streaming function (same image,
its own Command), its REST API whose every route streams through Lambda's InvokeWithResponseStream with the
integration timeout the function reads as its budget, the permission API Gateway needs, the same API key
requirement as the buffered API, the optional SigV4 Function URL, and the outputs."""

from __future__ import annotations

import importlib
import re

import pytest
from deployables import (
    CATCH_ALL,
    ROOT,
    evaluate,
    parameter_defaults,
    resolve,
    resources_of_type,
    template_source,
    translate,
)

STREAM_URI = re.compile(
    r"^arn:\$\{AWS::Partition\}:apigateway:\$\{AWS::Region\}:lambda:path/2021-11-15/functions/"
    r"\$\{StreamFunction\.Arn\}:live/response-streaming-invocations$"
)
API_GATEWAY_MAX_STREAM_MS = 15 * 60 * 1000
LAMBDA_MAX_TIMEOUT_S = 900
SETTINGS_SOURCE = ROOT / "function" / "phi2" / "settings.py"


@pytest.fixture(scope="module")
def cfn():
    return translate()


def function(template: dict, name: str) -> dict:
    return template["Resources"][name]["Properties"]


def operations(template: dict, api: str) -> dict[tuple[str, str], dict]:
    paths = template["Resources"][api]["Properties"]["Body"]["paths"]
    return {(path, method.upper()): op for path, methods in paths.items() for method, op in methods.items()}


def test_the_streaming_function_runs_the_same_image_with_the_streaming_runtime_as_its_command(cfn):
    stream, buffered = function(cfn, "StreamFunction"), function(cfn, "GenerateFunction")
    # THEN it is the buffered function's image, memory, architecture and tracing
    assert stream["PackageType"] == "Image" and stream["Code"] == buffered["Code"]
    for key in ("MemorySize", "Architectures", "TracingConfig", "EphemeralStorage"):
        assert stream[key] == buffered[key], key
    # AND its Command is the streaming runtime's module, which the entry script runs with `python -m`
    (command,) = stream["ImageConfig"]["Command"]
    assert command == "phi2.runtime.stream_runtime"
    assert callable(importlib.import_module(command).main)
    assert f'{command}) set -- "$python" -m {command}' in (ROOT / "infra" / "entrypoint.sh").read_text()
    # AND `sam build` builds it from the same Dockerfile and arguments
    sources = template_source()["Resources"]
    assert sources["StreamFunction"]["Metadata"] == sources["GenerateFunction"]["Metadata"]
    # AND the API invokes its `live` alias
    aliases = {r["Properties"]["FunctionName"]["Ref"]: r for r in resources_of_type(cfn, "AWS::Lambda::Alias").values()}
    assert aliases["StreamFunction"]["Properties"]["Name"] == "live"


def test_the_streaming_functions_environment_is_the_buffered_one_with_the_stream_timeout_as_its_budget(cfn):
    stream = function(cfn, "StreamFunction")["Environment"]["Variables"]
    buffered = function(cfn, "GenerateFunction")["Environment"]["Variables"]
    surface_specific = {"API_TIMEOUT_MS", "STREAM_BASE_URL", "GENERATION_BUDGET_SECONDS", "STREAM_KEEPALIVE_SECONDS"}
    # THEN every other setting is the same
    assert {k: v for k, v in stream.items() if k not in surface_specific} == {
        k: v for k, v in buffered.items() if k not in surface_specific
    }
    # AND its budget is the streaming integrations' timeout, read by settings.py
    assert stream["API_TIMEOUT_MS"] == {"Ref": "StreamTimeoutMillis"}
    assert '"API_TIMEOUT_MS"' in SETTINGS_SOURCE.read_text()


def test_the_budget_the_function_reads_parses_to_the_integration_timeout(cfn, monkeypatch):
    from phi2.settings import get_settings

    environment = function(cfn, "StreamFunction")["Environment"]["Variables"]
    for name, value in environment.items():
        monkeypatch.setenv(name, resolve(value))
    settings = get_settings.__wrapped__()
    assert settings.api_timeout_s * 1000 == float(parameter_defaults()["StreamTimeoutMillis"])


def test_the_stream_timeout_is_within_api_gateways_streaming_limit_and_the_function_timeout(cfn):
    timeout = template_source()["Parameters"]["StreamTimeoutMillis"]
    # THEN the default and the largest allowed value are within API Gateway's 15 minutes for a stream
    assert timeout["Default"] <= timeout["MaxValue"] <= API_GATEWAY_MAX_STREAM_MS
    # AND longer than the buffered API's 29 s, which is the point
    assert timeout["MinValue"] > 29_000
    # AND the function timeout never cuts a stream the integration still waits for
    assert function(cfn, "StreamFunction")["Timeout"] == LAMBDA_MAX_TIMEOUT_S >= timeout["MaxValue"] / 1000


def test_the_streaming_api_serves_every_route_of_the_buffered_api_and_of_the_handler(cfn):
    from phi2.runtime import handler

    streamed = set(operations(cfn, "StreamApi"))
    # THEN both APIs have the same routes, which are exactly the handler's, and the catch-alls
    assert streamed == set(operations(cfn, "Api"))
    named = {(path, method) for path, method in streamed if path not in CATCH_ALL}
    assert named == set(handler.ROUTES.items())


def test_every_streaming_route_streams_through_response_streaming_invocations_with_the_parameters_timeout(cfn):
    for route, operation in operations(cfn, "StreamApi").items():
        integration = operation["x-amazon-apigateway-integration"]
        # THEN each is a Lambda proxy integration in STREAM transfer mode
        assert (integration["type"], integration["httpMethod"]) == ("aws_proxy", "POST"), route
        assert integration["responseTransferMode"] == "STREAM", route
        # AND invokes the streaming function's `live` alias with InvokeWithResponseStream
        assert STREAM_URI.match(integration["uri"]["Fn::Sub"]), (route, integration["uri"])
        # AND waits the timeout the function reads as its budget
        assert integration["timeoutInMillis"] == {"Ref": "StreamTimeoutMillis"}, route


def test_the_buffered_api_never_streams_and_its_generate_stream_reaches_the_buffered_function(cfn):
    for route, operation in operations(cfn, "Api").items():
        integration = operation["x-amazon-apigateway-integration"]
        assert "responseTransferMode" not in integration, route
        assert "${GenerateFunction.Arn}:live/invocations" in integration["uri"]["Fn::Sub"], route
    assert ("/generate_stream", "POST") in operations(cfn, "Api")


def test_the_streaming_integration_is_the_one_sam_itself_writes_for_a_response_stream_event():
    # GIVEN the SAM translator's own translation of an Api event with ResponseTransferMode: RESPONSE_STREAM
    from deployables import _NoManagedPolicies
    from samtranslator.translator.transform import transform

    source = {
        "Transform": "AWS::Serverless-2016-10-31",
        "Resources": {
            "StreamFunction": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "PackageType": "Image",
                    "ImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/x:y",
                    "AutoPublishAlias": "live",
                    "Events": {
                        "Stream": {
                            "Type": "Api",
                            "Properties": {"Path": "/s", "Method": "post", "ResponseTransferMode": "RESPONSE_STREAM"},
                        }
                    },
                },
            }
        },
    }
    sam = transform(source, {}, _NoManagedPolicies())
    (api,) = [r for r in sam["Resources"].values() if r["Type"] == "AWS::ApiGateway::RestApi"]
    integration = api["Properties"]["Body"]["paths"]["/s"]["post"]["x-amazon-apigateway-integration"]
    (permission,) = [r for r in sam["Resources"].values() if r["Type"] == "AWS::Lambda::Permission"]
    # THEN it streams, through the same API version and action as our integrations, with the same permission
    assert integration["responseTransferMode"] == "STREAM"
    assert "/2021-11-15/functions/" in integration["uri"]["Fn::Sub"]
    assert integration["uri"]["Fn::Sub"].endswith("/response-streaming-invocations")
    assert permission["Properties"]["Action"] == "lambda:InvokeFunction"


def test_api_gateway_may_invoke_the_streaming_alias_from_the_streaming_api_only(cfn):
    permission = cfn["Resources"]["StreamApiInvokePermission"]["Properties"]
    # THEN InvokeWithResponseStream's action (lambda:InvokeFunction), for API Gateway, on the `live` alias
    assert permission["Action"] == "lambda:InvokeFunction"
    assert permission["Principal"] == "apigateway.amazonaws.com"
    alias = next(
        name
        for name, r in resources_of_type(cfn, "AWS::Lambda::Alias").items()
        if r["Properties"]["FunctionName"] == {"Ref": "StreamFunction"}
    )
    assert permission["FunctionName"] == {"Ref": alias}
    # AND only for calls through the streaming API
    assert permission["SourceArn"]["Fn::Sub"].endswith(":${StreamApi}/*/*/*")


@pytest.mark.parametrize("require", ["true", "false"])
def test_the_streaming_api_requires_the_api_key_exactly_when_the_buffered_one_does(require):
    cfn = translate(RequireApiKey=require)
    parameters = {"RequireApiKey": require}
    for api in ("Api", "StreamApi"):
        body = cfn["Resources"][api]["Properties"]["Body"]
        assert body["x-amazon-apigateway-api-key-source"] == "HEADER"
        assert body["components"]["securitySchemes"]["api_key"] == {
            "type": "apiKey",
            "name": "x-api-key",
            "in": "header",
        }
        for route, operation in operations(cfn, api).items():
            security = evaluate(operation.get("security"), cfn, parameters)
            assert (security == [{"api_key": []}]) is (require == "true"), (api, route, security)
    # AND the usage plan (its quota and throttle, and the key) covers both stages
    if require == "true":
        (plan,) = resources_of_type(cfn, "AWS::ApiGateway::UsagePlan").values()
        stages = {stage["ApiId"]["Ref"] for stage in plan["Properties"]["ApiStages"]}
        assert stages == {"Api", "StreamApi"}


def test_the_streaming_api_is_throttled_and_traced_like_the_buffered_one(cfn):
    stages = {
        r["Properties"]["RestApiId"]["Ref"]: r["Properties"]
        for r in resources_of_type(cfn, "AWS::ApiGateway::Stage").values()
    }
    assert stages["StreamApi"]["StageName"] == stages["Api"]["StageName"] == "v1"
    assert stages["StreamApi"]["MethodSettings"] == stages["Api"]["MethodSettings"]
    assert stages["StreamApi"]["TracingEnabled"] is True


def test_the_stream_base_url_is_an_output_and_the_buffered_function_names_it(cfn):
    url = cfn["Outputs"]["StreamBaseUrl"]["Value"]
    stage = next(
        r["Properties"]["StageName"]
        for r in resources_of_type(cfn, "AWS::ApiGateway::Stage").values()
        if r["Properties"]["RestApiId"] == {"Ref": "StreamApi"}
    )
    assert url["Fn::Sub"] == f"https://${{StreamApi}}.execute-api.${{AWS::Region}}.${{AWS::URLSuffix}}/{stage}"
    # AND the buffered function's 400 for a streaming request names this URL
    assert function(cfn, "GenerateFunction")["Environment"]["Variables"]["STREAM_BASE_URL"] == url
    assert '"STREAM_BASE_URL"' in SETTINGS_SOURCE.read_text()


def test_the_streaming_function_logs_to_its_own_group_with_retention(cfn):
    logging = function(cfn, "StreamFunction")["LoggingConfig"]
    assert logging["LogFormat"] == "JSON" and logging["LogGroup"] == {"Ref": "StreamFunctionLogGroup"}
    group = cfn["Resources"]["StreamFunctionLogGroup"]["Properties"]
    assert group["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert group["LogGroupName"]["Fn::Sub"].endswith("-stream")


@pytest.mark.parametrize("enabled", ["true", "false"])
def test_a_sigv4_function_url_with_response_streaming_exists_only_when_asked(enabled):
    cfn = translate(EnableStreamFunctionUrl=enabled)
    parameters = {"EnableStreamFunctionUrl": enabled}
    (url,) = resources_of_type(cfn, "AWS::Lambda::Url").values()
    # THEN it exists exactly when enabled (off by default), and so does its output
    assert evaluate({"Condition": url["Condition"]}, cfn, parameters) is (enabled == "true")
    assert cfn["Outputs"]["StreamFunctionUrlEndpoint"]["Condition"] == url["Condition"]
    assert parameter_defaults()["EnableStreamFunctionUrl"] == "false"
    # AND it streams, for SigV4-signed callers only, on the `live` alias
    properties = url["Properties"]
    assert (properties["InvokeMode"], properties["AuthType"]) == ("RESPONSE_STREAM", "AWS_IAM")
    assert properties["TargetFunctionArn"] == {"Fn::GetAtt": ["StreamFunction", "Arn"]}
    assert properties["Qualifier"] == "live"


def test_the_streaming_api_is_declared_before_the_buffered_one_so_sam_local_serves_the_buffered_routes():
    # `sam local start-api` maps a path both APIs have to the API declared last (checked with SAM CLI's
    # ApiProvider), and it buffers: that must be the buffered API, whose function answers JSON.
    resources = list(template_source()["Resources"])
    assert resources.index("StreamApi") < resources.index("Api")
