"""template.yaml: cfn-lint and the real SAM translator accept it, and the CloudFormation it becomes deploys
what the function needs (image, memory, routes, timeouts, environment, permissions, outputs)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
from deployables import (
    CATCH_ALL,
    IMAGE_URI,
    ROOT,
    TEMPLATE,
    evaluate,
    parameter_defaults,
    parse_dockerfile,
    resolve,
    resources_of_type,
    template_source,
    translate,
)

LAMBDA_MAX_MEMORY_MB = 10240
API_GATEWAY_MAX_INTEGRATION_MS = 29000
SETTINGS_SOURCE = ROOT / "function" / "phi2" / "settings.py"
# Read by Powertools itself rather than by settings.py.
POWERTOOLS_VARIABLES = {"POWERTOOLS_LOG_LEVEL"}


@pytest.fixture(scope="module")
def cfn():
    return translate()


def function_of(template: dict) -> dict:
    """The buffered function (the streaming one has tests of its own: test_template_streaming.py)."""
    return template["Resources"]["GenerateFunction"]


def api_paths(template: dict) -> dict:
    """The buffered API's routes."""
    return template["Resources"]["Api"]["Properties"]["Body"]["paths"]


def variables_settings_reads() -> set[str]:
    """Every environment variable named in settings.py (os.environ.get or the _bool/_float/_int readers)."""
    return set(re.findall(r'(?:environ\.get|_bool|_float|_int)\(\s*"([A-Z0-9_]+)"', SETTINGS_SOURCE.read_text()))


def test_cfn_lint_reports_nothing():
    # GIVEN the template WHEN cfn-lint (with its SAM transform) checks it
    from cfnlint.api import lint_file

    matches = lint_file(TEMPLATE)
    # THEN it reports no error, warning or informational finding
    assert [str(m) for m in matches] == []


@pytest.mark.parametrize("require_api_key", ["true", "false"])
@pytest.mark.parametrize("provisioned", [0, 2])
def test_sam_translator_accepts_every_option(require_api_key, provisioned):
    # GIVEN each combination of the two options that change resources
    # WHEN the SAM translator transforms the template
    cfn = translate(RequireApiKey=require_api_key, ProvisionedConcurrency=provisioned)
    # THEN it yields plain CloudFormation: one function, one REST API, no SAM types left
    assert not [r for r in cfn["Resources"].values() if r["Type"].startswith("AWS::Serverless::")]
    function_of(cfn)
    assert cfn["Resources"]["Api"]["Type"] == "AWS::ApiGateway::RestApi"


def test_function_is_an_image_with_memory_within_lambda_limit(cfn):
    function = function_of(cfn)["Properties"]
    memory = template_source()["Parameters"]["MemorySize"]
    # THEN the function is a container image
    assert function["PackageType"] == "Image" and function["Code"] == {"ImageUri": IMAGE_URI}
    assert "Handler" not in function and "Runtime" not in function
    # AND its memory is the parameter, 10240 MB by default, never allowed above Lambda's maximum
    assert function["MemorySize"] == {"Ref": "MemorySize"}
    assert memory["Default"] == LAMBDA_MAX_MEMORY_MB
    assert memory["MaxValue"] <= LAMBDA_MAX_MEMORY_MB
    assert function["Architectures"] == ["x86_64"]


def test_image_command_names_the_real_handler_and_matches_the_dockerfile(cfn):
    # GIVEN the handler the template gives the image (ImageConfig.Command) and the Dockerfile's CMD
    command = function_of(cfn)["Properties"]["ImageConfig"]["Command"]
    runtime = parse_dockerfile().stage("runtime")
    # THEN both name the same handler
    assert command == runtime.exec_form("CMD")
    # AND it is a callable in the function's code (renaming the handler breaks this test)
    module_name, _, function_name = command[0].rpartition(".")
    module = importlib.import_module(module_name)
    assert callable(getattr(module, function_name))
    # AND the entry script's own default is the same handler
    assert f"HANDLER:-{command[0]}" in (ROOT / "infra" / "entrypoint.sh").read_text()


def test_sam_build_metadata_builds_the_projects_dockerfile_with_pinned_phi2():
    function = next(r for r in template_source()["Resources"].values() if r["Type"] == "AWS::Serverless::Function")
    metadata = function["Metadata"]
    dockerfile_args = parse_dockerfile().args()
    # THEN `sam build` uses this repository's Dockerfile
    assert (ROOT / metadata["DockerContext"] / metadata["Dockerfile"]).resolve() == (ROOT / "Dockerfile").resolve()
    assert metadata["DockerTag"]
    # AND every build arg it passes is one the Dockerfile declares
    assert set(metadata["DockerBuildArgs"]) <= set(dockerfile_args)
    # AND it bakes Phi-2 at the revision the preparation script pins
    import prepare_model

    args = metadata["DockerBuildArgs"]
    assert args["MODEL_ID"] == "microsoft/phi-2" == dockerfile_args["MODEL_ID"]
    assert (
        args["MODEL_REVISION"] == prepare_model.PINNED_REVISIONS["microsoft/phi-2"] == dockerfile_args["MODEL_REVISION"]
    )
    assert (
        (args["MODEL_FORMAT"], args["MODEL_DTYPE"])
        == ("int8", "auto")
        == (
            dockerfile_args["MODEL_FORMAT"],
            dockerfile_args["MODEL_DTYPE"],
        )
    )


def named_routes(paths: dict) -> dict[str, str]:
    """The routes a path names (the catch-alls aside), by path, with their method."""
    return {path: method.upper() for path, methods in paths.items() for method in methods if path not in CATCH_ALL}


def test_rest_api_routes_are_the_handlers_routes_on_the_live_alias(cfn):
    from phi2.runtime import handler

    paths = api_paths(cfn)
    # THEN the API names exactly the routes the handler implements, with the same methods, and the catch-alls
    assert named_routes(paths) == handler.ROUTES
    assert {path: next(iter(paths[path])) for path in CATCH_ALL} == CATCH_ALL
    for methods in paths.values():
        for operation in methods.values():
            integration = operation["x-amazon-apigateway-integration"]
            # AND each is a Lambda proxy integration on the function's `live` alias
            assert integration["type"] == "aws_proxy" and integration["httpMethod"] == "POST"
            assert "${GenerateFunction.Arn}:live/invocations" in integration["uri"]["Fn::Sub"]
    alias = cfn["Resources"]["GenerateFunctionAliaslive"]["Properties"]
    assert alias["Name"] == "live"
    # AND API Gateway may invoke that alias
    permission = cfn["Resources"]["ApiInvokePermission"]["Properties"]
    assert permission["Principal"] == "apigateway.amazonaws.com"
    assert permission["FunctionName"] == {"Ref": "GenerateFunctionAliaslive"}


def test_the_function_reads_its_budget_from_the_integration_timeout_it_sits_behind(cfn):
    parameters = template_source()["Parameters"]
    timeout = parameters["ApiTimeoutMillis"]
    environment = function_of(cfn)["Properties"]["Environment"]["Variables"]
    # GIVEN every route's integration timeout
    timeouts = [
        operation["x-amazon-apigateway-integration"]["timeoutInMillis"]
        for methods in api_paths(cfn).values()
        for operation in methods.values()
    ]
    # THEN it is the one parameter, API Gateway's default 29 s maximum unless a deployer raises it
    assert {str(t) for t in timeouts} == {str({"Ref": "ApiTimeoutMillis"})}
    assert timeout["Default"] == API_GATEWAY_MAX_INTEGRATION_MS
    # AND the function reads the very same value as its budget, so the two cannot drift apart
    assert environment["API_TIMEOUT_MS"] == {"Ref": "ApiTimeoutMillis"}
    # AND the default function timeout leaves the default API budget whole
    assert parameters["Timeout"]["Default"] * 1000 > timeout["Default"]


def test_safe_defaults_api_keys_on_memory_that_fits_the_model_no_reserved_concurrency():
    parameters = template_source()["Parameters"]
    # THEN the API needs a key unless the deployer turns it off
    assert parameters["RequireApiKey"]["Default"] == "true"
    # AND the memory can never be set below what Phi-2 in the baked format needs at its peak (int8: ~3.6 GB)
    assert parameters["MemorySize"]["MinValue"] * 2**20 >= 3.6e9
    # AND no concurrency is reserved by default (accounts with a low quota cannot reserve any)
    assert parameters["ReservedConcurrency"]["Default"] == 0


@pytest.mark.parametrize(("reserved", "expected"), [(0, None), (4, "4")])
def test_reserved_concurrency_only_when_asked(reserved, expected):
    cfn = translate(ReservedConcurrency=reserved)
    for function in resources_of_type(cfn, "AWS::Lambda::Function").values():
        value = evaluate(
            function["Properties"].get("ReservedConcurrentExecutions"), cfn, {"ReservedConcurrency": reserved}
        )
        assert (resolve(value, {"ReservedConcurrency": reserved}) if value is not None else None) == expected


def test_environment_holds_only_variables_the_code_reads(cfn):
    environment = function_of(cfn)["Properties"]["Environment"]["Variables"]
    # THEN every variable is one settings.py (or Powertools) reads: no dead configuration
    assert set(environment) <= variables_settings_reads() | POWERTOOLS_VARIABLES
    # AND the model directory is the one the image bakes
    assert environment["MODEL_DIR"] == parse_dockerfile().stage("runtime").env()["MODEL_DIR"]


def test_environment_values_are_accepted_by_the_real_settings(cfn, monkeypatch):
    from phi2.settings import get_settings

    # GIVEN the function's environment with the parameters' defaults
    environment = function_of(cfn)["Properties"]["Environment"]["Variables"]
    for name, value in environment.items():
        if isinstance(resolve(value), str):  # STREAM_BASE_URL is an Fn::Sub of the deployed API's id
            monkeypatch.setenv(name, resolve(value))
    # WHEN the function reads its settings from it
    settings = get_settings.__wrapped__()
    # THEN each value parses to what the template means
    assert settings.model_dir == Path("/opt/model")
    assert settings.api_timeout_s * 1000 == float(parameter_defaults()["ApiTimeoutMillis"])
    assert settings.preload is True and settings.log_text is False
    assert settings.num_threads in (0, None)  # 0: size torch's threads to the vCPUs Lambda gives


def test_every_parameter_is_used():
    source = template_source()
    text = TEMPLATE.read_text()
    for name in source["Parameters"]:
        # THEN each parameter is referenced somewhere besides its declaration
        assert len(re.findall(rf"\b{name}\b", text)) >= 2, name


@pytest.mark.parametrize(("provisioned", "expected"), [(0, None), (3, 3)])
def test_provisioned_concurrency_only_when_asked(provisioned, expected):
    cfn = translate(ProvisionedConcurrency=provisioned)
    alias = cfn["Resources"]["GenerateFunctionAliaslive"]["Properties"]
    # WHEN CloudFormation evaluates the alias' provisioned concurrency for this parameter value
    config = evaluate(alias["ProvisionedConcurrencyConfig"], cfn, {"ProvisionedConcurrency": provisioned})
    # THEN there is none for 0, and exactly the asked number otherwise
    if expected is None:
        assert config is None
    else:
        assert resolve(config["ProvisionedConcurrentExecutions"], {"ProvisionedConcurrency": expected}) == str(expected)


@pytest.mark.parametrize("require", ["true", "false"])
def test_api_key_and_usage_plan_only_when_required(require):
    cfn = translate(RequireApiKey=require)
    parameters = {"RequireApiKey": require}
    required = require == "true"
    # THEN every route requires the key exactly when asked
    for methods in api_paths(cfn).values():
        for operation in methods.values():
            security = evaluate(operation.get("security"), cfn, parameters)
            assert bool(security) is required
            if required:
                assert security == [{"api_key": []}]
    # AND the key, the usage plan and their link exist only then
    for kind in ("AWS::ApiGateway::ApiKey", "AWS::ApiGateway::UsagePlan", "AWS::ApiGateway::UsagePlanKey"):
        (resource,) = resources_of_type(cfn, kind).values()
        assert evaluate({"Condition": resource["Condition"]}, cfn, parameters) is required
    body = cfn["Resources"]["Api"]["Properties"]["Body"]
    assert body["components"]["securitySchemes"]["api_key"] == {"type": "apiKey", "name": "x-api-key", "in": "header"}


def test_api_is_throttled_and_traced_and_function_traced(cfn):
    stage = cfn["Resources"]["Apiv1Stage"]["Properties"]
    # THEN the stage throttles every method and traces with X-Ray
    (settings,) = stage["MethodSettings"]
    assert (settings["ResourcePath"], settings["HttpMethod"]) == ("/*", "*")
    assert settings["ThrottlingRateLimit"] == {"Ref": "ThrottlingRateLimit"}
    assert settings["ThrottlingBurstLimit"] == {"Ref": "ThrottlingBurstLimit"}
    assert stage["TracingEnabled"] is True
    # AND the function traces too
    assert function_of(cfn)["Properties"]["TracingConfig"] == {"Mode": "Active"}


def test_function_logs_json_to_a_log_group_with_retention(cfn):
    logging = function_of(cfn)["Properties"]["LoggingConfig"]
    name, group = "FunctionLogGroup", cfn["Resources"]["FunctionLogGroup"]
    # THEN the function logs JSON into the stack's own log group, which expires its logs
    assert logging["LogFormat"] == "JSON" and logging["LogGroup"] == {"Ref": name}
    assert group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}
    assert template_source()["Parameters"]["LogRetentionDays"]["Default"] == 30
    # AND Lambda's platform.report record (init duration, max memory: what infra/probe.py reads) is kept
    assert logging["SystemLogLevel"] == "INFO"


def test_role_allows_only_logs_and_tracing(cfn):
    role = cfn["Resources"]["GenerateFunctionRole"]["Properties"]
    # THEN the execution role has Lambda's basic logging policy and X-Ray writes, nothing else
    assert sorted(role["ManagedPolicyArns"]) == [
        "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess",
        "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
    ]
    assert not role.get("Policies")
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": ["lambda.amazonaws.com"]}


def test_outputs_give_the_generate_url_function_arn_and_api_id(cfn):
    outputs = cfn["Outputs"]
    stage = cfn["Resources"]["Apiv1Stage"]["Properties"]["StageName"]
    # THEN the outputs a user (and infra/smoke_test.py) needs are there
    assert {"GenerateUrl", "FunctionArn", "ApiId"} <= set(outputs)
    url = outputs["GenerateUrl"]["Value"]["Fn::Sub"]
    assert url.startswith("https://${Api}.execute-api.") and url.endswith(f"/{stage}/generate")
    assert outputs["HealthUrl"]["Value"]["Fn::Sub"].endswith(f"/{stage}/health")
    assert outputs["FunctionArn"]["Value"] == {"Fn::GetAtt": ["GenerateFunction", "Arn"]}
    assert outputs["ApiId"]["Value"] == {"Ref": "Api"}
    # AND the API key's id only exists when a key does
    assert outputs["ApiKeyId"]["Condition"] == "ApiKeyRequired"


OPENAI_ROUTES = {
    "/chat/completions": "post",
    "/completions": "post",
    "/models": "get",
    "/models/{model+}": "get",
    "/tokenize": "post",
    "/detokenize": "post",
}


@pytest.mark.parametrize("require", ["true", "false"])
def test_openai_routes_sit_at_the_api_root_with_the_key_and_timeout_of_generate(require):
    from phi2.api.openai.routes import ROUTES

    # GIVEN the translated template, with and without API keys
    cfn = translate(RequireApiKey=require)
    parameters = {"RequireApiKey": require}
    paths = api_paths(cfn)
    generate = paths["/generate"]["post"]
    # THEN every OpenAI route the function serves is declared, with its method
    assert {path: method.upper() for path, method in OPENAI_ROUTES.items()} == ROUTES
    for path, method in OPENAI_ROUTES.items():
        operation = paths[path][method]
        integration = operation["x-amazon-apigateway-integration"]
        # AND it is the same proxy integration as /generate: the live alias, the same timeout
        assert integration == generate["x-amazon-apigateway-integration"]
        # AND it requires the API key exactly when /generate does
        security = evaluate(operation.get("security"), cfn, parameters)
        assert security == evaluate(generate.get("security"), cfn, parameters)
        assert bool(security) is (require == "true")
    # AND a model id with a slash reaches the function: the path variable is greedy and declared
    (parameter,) = paths["/models/{model+}"]["get"]["parameters"]
    assert (parameter["name"], parameter["in"], parameter["required"]) == ("model", "path", True)


def test_openai_base_url_output_is_the_stage_url_the_sdk_takes(cfn):
    outputs = cfn["Outputs"]
    stage = template_source()["Resources"]["Api"]["Properties"]["StageName"]
    url = outputs["OpenAIBaseUrl"]["Value"]["Fn::Sub"]
    # THEN it is the stage's root, so base_url + "/chat/completions" is a route (no /v1/v1)
    assert url == "https://${Api}.execute-api.${AWS::Region}.${AWS::URLSuffix}/" + stage
    assert stage == "v1"
    assert outputs["GenerateUrl"]["Value"]["Fn::Sub"] == url + "/generate"  # /generate's URL is unchanged


def test_the_memory_minimum_follows_the_format_both_functions_bake():
    from phi2.engine.memory import PHI2_MIN_MEMORY_MB

    template = template_source()
    baked = {
        resource["Metadata"]["DockerBuildArgs"]["MODEL_FORMAT"]
        for resource in template["Resources"].values()
        if resource["Type"] == "AWS::Serverless::Function"
    }
    # GIVEN the one format both functions bake, the Dockerfile's default
    assert baked == {parse_dockerfile().args()["MODEL_FORMAT"]}
    # THEN MemorySize's minimum is that format's (int8: 4096 MB; a 4-bit build may go down to 3,008 MB)
    (fmt,) = baked
    assert template["Parameters"]["MemorySize"]["MinValue"] == PHI2_MIN_MEMORY_MB[fmt]
    # AND every format the preparation script writes has a minimum, none above Lambda's largest size, and the
    # 4-bit ones fit the 3,008 MB that new accounts may be capped at
    import prepare_model

    assert set(prepare_model.FORMATS) == set(PHI2_MIN_MEMORY_MB)
    assert max(PHI2_MIN_MEMORY_MB.values()) <= LAMBDA_MAX_MEMORY_MB
    assert PHI2_MIN_MEMORY_MB["int4"] <= 3008 and PHI2_MIN_MEMORY_MB["int4-mixed"] <= 3008
