"""infra/probe.py: REPORT parsing; the stack and the configuration update against moto's CloudFormation and
Lambda; the invoke path against the function under the real Lambda RIE.

The RIE stands in for Lambda's Invoke API (boto3's Lambda client pointed at it calls the same
`/2015-03-31/functions/function/invocations`), but it answers without a LogResult: there the REPORT fields are
None and the probe's numbers come from the function's answers alone.
"""

from __future__ import annotations

import json
import zipfile
from io import BytesIO

import boto3
import probe
import pytest
import smoke_test
from botocore.config import Config
from conftest import AWS_REGION
from moto import mock_aws
from rie import RieServer, slowed

STACK = "phi2-lambda"
REGION = AWS_REGION

# A cold start's REPORT as Lambda writes it with Tracing: Active (tab-separated, Init Duration last, X-Ray after).
COLD_TAIL = (
    "START RequestId: 8f2b6c1e-4a7d-4f0e-9b3a-2d5c7e9f1a3b Version: $LATEST\n"
    '{"level":"INFO","message":"model ready","service":"phi2-text-generation"}\n'
    "END RequestId: 8f2b6c1e-4a7d-4f0e-9b3a-2d5c7e9f1a3b\n"
    "REPORT RequestId: 8f2b6c1e-4a7d-4f0e-9b3a-2d5c7e9f1a3b\tDuration: 14302.57 ms\tBilled Duration: 23168 ms\t"
    "Memory Size: 10240 MB\tMax Memory Used: 6021 MB\tInit Duration: 8865.12 ms\t\n"
    "XRAY TraceId: 1-67a1b2c3-0123456789abcdef01234567\tSegmentId: 0123456789abcdef\tSampled: true\t\n"
)
WARM_LINE = (
    "REPORT RequestId: 3c9d0e7a-1b2f-4c5d-8e6f-7a8b9c0d1e2f\tDuration: 4310.4 ms\tBilled Duration: 4311 ms\t"
    "Memory Size: 10240 MB\tMax Memory Used: 6033 MB\t"
)
# The same, in the JSON log format template.yaml configures (LoggingConfig.LogFormat: JSON).
JSON_TAIL = json.dumps(
    {
        "time": "2026-11-29T09:00:00.000Z",
        "type": "platform.report",
        "record": {
            "requestId": "8f2b6c1e-4a7d-4f0e-9b3a-2d5c7e9f1a3b",
            "metrics": {
                "durationMs": 14302.57,
                "billedDurationMs": 23168,
                "memorySizeMB": 10240,
                "maxMemoryUsedMB": 6021,
                "initDurationMs": 8865.12,
            },
            "status": "success",
        },
    }
)


# --- REPORT parsing ---------------------------------------------------------------------------------------


def test_a_cold_start_report_gives_every_field_including_init_duration():
    # GIVEN the log tail of a cold start WHEN its REPORT is parsed
    report = probe.parse_report(COLD_TAIL)
    # THEN every field has its own value (Billed Duration and Init Duration are not taken for Duration)
    assert report == {
        "duration_ms": 14302.57,
        "billed_duration_ms": 23168.0,
        "memory_size_mb": 10240.0,
        "max_memory_used_mb": 6021.0,
        "init_duration_ms": 8865.12,
    }


def test_a_warm_report_has_no_init_duration():
    # GIVEN a warm invocation's REPORT (no Init Duration) WHEN parsed THEN init is None, the rest is read
    report = probe.parse_report(WARM_LINE + "\n")
    assert report["init_duration_ms"] is None
    assert (report["duration_ms"], report["billed_duration_ms"], report["max_memory_used_mb"]) == (4310.4, 4311, 6033)


def test_the_json_log_formats_platform_report_gives_the_same_fields():
    # GIVEN the REPORT as a JSON platform.report record WHEN parsed THEN the fields match the text line's
    assert probe.parse_report(JSON_TAIL) == probe.parse_report(COLD_TAIL)


@pytest.mark.parametrize("tail", [None, "", "START RequestId: x Version: $LATEST\nEND RequestId: x\n"])
def test_a_tail_without_a_report_gives_none_fields(tail):
    # GIVEN no log tail, or one cut before its REPORT WHEN parsed THEN every field is None, nothing raises
    assert set(probe.parse_report(tail).values()) == {None}


def test_warm_medians_skip_missing_values():
    # GIVEN three warm runs, one without a REPORT WHEN summarised THEN medians use what each run has
    runs = [
        probe.run_record(
            {"timings": {"time_to_first_token_ms": ttft, "tokens_per_second": tps, "total_ms": total}},
            probe.parse_report(tail),
        )
        for ttft, tps, total, tail in [(900, 5.0, 13000, WARM_LINE), (700, 6.0, 11000, None), (800, 4.0, 15000, "")]
    ]
    summary = probe.warm_summary(runs)
    assert summary["runs"] == 3
    assert (summary["median_time_to_first_token_ms"], summary["median_tokens_per_second"]) == (800, 5.0)
    assert (summary["median_total_ms"], summary["median_duration_ms"], summary["max_memory_used_mb"]) == (
        13000,
        4310.4,
        6033,
    )


# --- moto: the stack's outputs and the configuration update ---------------------------------------------


@pytest.fixture
def aws(moto_credentials):
    with mock_aws():
        yield boto3.client("cloudformation", region_name=REGION), boto3.client("lambda", region_name=REGION)


def create_function(lambda_client, variables: dict[str, str] | None) -> str:
    """A function in moto (a zip: moto's image functions want an ECR repository), with these variables."""
    statement = {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}
    trust = {"Version": "2012-10-17", "Statement": [statement]}
    iam = boto3.client("iam", region_name=REGION)
    role = iam.create_role(RoleName="phi2-lambda-role", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    code = BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("app.py", "def handler(event, context):\n    return event\n")
    extra = {"Environment": {"Variables": variables}} if variables is not None else {}
    created = lambda_client.create_function(
        FunctionName="phi2-lambda-GenerateFunction",
        Runtime="python3.12",
        Role=role,
        Handler="app.handler",
        Code={"ZipFile": code.getvalue()},
        MemorySize=10240,
        **extra,
    )
    return created["FunctionArn"]


def variables_of(lambda_client, arn: str) -> dict[str, str]:
    return lambda_client.get_function_configuration(FunctionName=arn).get("Environment", {}).get("Variables", {})


@pytest.mark.parametrize("existing", [{"MODEL_LOADING": "auto", "POWERTOOLS_LOG_LEVEL": "INFO"}, None])
def test_forcing_a_cold_start_adds_the_nonce_keeps_every_variable_and_puts_them_back(aws, existing):
    _, lambda_client = aws
    # GIVEN a deployed function with (or without) environment variables
    arn = create_function(lambda_client, existing)
    # WHEN the probe forces a cold start
    before = probe.force_cold_start(lambda_client, arn)
    # THEN its variables are the old ones plus a PROBE_NONCE, and the old ones are returned to put back
    during = variables_of(lambda_client, arn)
    assert before == (existing or {})
    assert {k: v for k, v in during.items() if k != probe.NONCE} == (existing or {})
    assert during[probe.NONCE].isdigit()
    # AND a second probe (say, after one interrupted before it restored) sets a new nonce, not a second one
    assert probe.force_cold_start(lambda_client, arn) == (existing or {})
    assert variables_of(lambda_client, arn)[probe.NONCE] != during[probe.NONCE]
    # WHEN the probe puts the variables back THEN they are exactly the function's own again
    probe.set_variables(lambda_client, arn, before)
    assert variables_of(lambda_client, arn) == (existing or {})


def test_without_a_cold_run_the_probe_invokes_the_live_alias_when_there_is_one(aws):
    _, lambda_client = aws
    # GIVEN a function without aliases THEN the probe invokes $LATEST
    arn = create_function(lambda_client, {"MODEL_LOADING": "auto"})
    assert probe.live_qualifier(lambda_client, arn) is None
    # GIVEN the alias `live` the template's AutoPublishAlias creates THEN the probe invokes it
    version = lambda_client.publish_version(FunctionName=arn)["Version"]
    lambda_client.create_alias(FunctionName=arn, Name="live", FunctionVersion=version)
    assert probe.live_qualifier(lambda_client, arn) == "live"


def test_the_probe_names_the_problem_when_the_stack_is_missing_or_has_no_function(aws, capsys):
    cloudformation, _ = aws
    # GIVEN no such stack WHEN the probe runs THEN it fails saying so
    assert probe.main(["no-such-stack", "--region", REGION]) == 1
    assert "no-such-stack" in capsys.readouterr().err
    # GIVEN a stack without a FunctionArn output WHEN the probe runs THEN it fails naming the output
    template = {
        "Resources": {"Placeholder": {"Type": "AWS::S3::Bucket"}},
        "Outputs": {"ApiId": {"Value": "abc"}},
    }
    cloudformation.create_stack(StackName=STACK, TemplateBody=json.dumps(template))
    assert probe.main([STACK, "--region", REGION]) == 1
    assert "no FunctionArn output" in capsys.readouterr().err


# --- the invoke path, against the function under the real RIE ---------------------------------------------


@pytest.fixture
def new_environment(tiny_phi_dir):
    """A new execution environment loading the model in the background, as an on-demand Lambda one does."""
    server = RieServer(tiny_phi_dir, MODEL_LOADING="background")
    yield server
    server.stop()


def lambda_client_for(server: RieServer):
    return boto3.client(
        "lambda",
        endpoint_url=f"http://127.0.0.1:{server.port}",
        region_name=REGION,
        aws_access_key_id="rie",
        aws_secret_access_key="rie",
        config=Config(read_timeout=300, retries={"total_max_attempts": 1}),
    )


def generation_request(max_new_tokens: int = 8) -> dict:
    return {"prompt": smoke_test.seed_prompt(), "max_new_tokens": max_new_tokens, "do_sample": False}


@pytest.mark.e2e
def test_the_probe_measures_a_cold_start_then_warm_runs_through_the_invoke_api(new_environment):
    # GIVEN a new execution environment behind the Invoke API (the RIE: no LogResult)
    client = lambda_client_for(new_environment)
    # WHEN the probe measures it: the cold run, /health, two warm runs
    summary = probe.measure(client, "function", generation_request(), None, cold=True, warm=2, timeout=300)
    # THEN the cold run is timed from the answers, across the model's load (which began after it was sent)
    cold = summary["cold"]
    assert cold["attempts"] >= 1 and cold["generated_tokens"] >= 1
    assert cold["time_to_first_token_ms"] > 0 and cold["tokens_per_second"] > 0
    assert cold["wall_s"] * 1000 >= cold["total_ms"]
    assert cold["wall_s"] >= summary["load_seconds"] > 0
    # AND without a LogResult the REPORT fields are None, not an error
    assert cold["init_duration_ms"] is None and cold["duration_ms"] is None and cold["max_memory_used_mb"] is None
    assert summary["memory_size_mb"] is None and summary["warm"]["median_duration_ms"] is None
    # AND /health told the host's CPU and kernels
    assert summary["model_id"] == "tiny-random-phi"
    assert summary["cpu"]["effective_isa"] in {"baseline", "avx2", "avx512"}
    assert isinstance(summary["cpu"]["flags"], list) and summary["kernels"] and summary["speeds"]
    # AND the warm runs have medians
    warm = summary["warm"]
    assert warm["runs"] == 2 and warm["median_time_to_first_token_ms"] > 0 and warm["median_tokens_per_second"] > 0
    # AND the summary prints, as text and as JSON, without the prompt, which no log of the function has either
    text, as_json = probe.render(summary), json.dumps(summary)
    assert "warm x2" in text and "no REPORT in the log tail" in text
    for output in (text, as_json, new_environment.logs()):
        assert smoke_test.seed_prompt() not in output
    # AND the REPORT lines the RIE itself logs parse
    assert probe.parse_report(new_environment.logs())["duration_ms"] > 0


@pytest.mark.e2e
def test_without_a_cold_run_the_probe_waits_out_the_load_before_the_warm_runs(tiny_phi_dir):
    # GIVEN a new environment, frozen between requests, whose load needs 4 s of request time (by construction:
    # tests/slowed_function.py) while each /health waits at most 1 s for it
    server = RieServer(
        tiny_phi_dir,
        MODEL_LOADING="background",
        HEALTH_WAIT_SECONDS="1",
        **slowed(SLOW_LOAD_S="4", FROZEN_BETWEEN_REQUESTS="true"),
    )
    try:
        # WHEN the probe measures warm runs only
        summary = probe.measure(
            lambda_client_for(server), "function", generation_request(), None, cold=False, warm=1, timeout=300
        )
        reports = server.logs().count("REPORT RequestId")
    finally:
        server.stop()
    # THEN it asked /health again and again, each call moving the load on, until the model was loaded (at
    # least four health checks), then ran the warm run
    assert reports >= 4 + 1
    assert summary["cold"] is None and summary["load_seconds"] >= 4
    assert summary["warm"]["runs"] == 1 and summary["warm"]["median_tokens_per_second"] > 0


@pytest.mark.e2e
def test_the_probe_fails_naming_the_functions_error_answer(new_environment):
    # GIVEN a request the function refuses (max_new_tokens 0) WHEN the probe runs THEN it fails saying why
    client = lambda_client_for(new_environment)
    with pytest.raises(probe.ProbeFailed, match="422 validation_error: invalid request: max_new_tokens"):
        probe.measure(client, "function", generation_request(0), None, cold=True, warm=1, timeout=60)


@pytest.mark.e2e
def test_the_probe_fails_naming_an_unhandled_function_error(tmp_path):
    # GIVEN a function whose handler raises (it stands in for any crash of the real one's code)
    (tmp_path / "raising.py").write_text("def handler(event, context):\n    raise RuntimeError('out of memory')\n")
    server = RieServer(tmp_path, HANDLER="raising.handler", LAMBDA_TASK_ROOT=str(tmp_path))
    try:
        # WHEN the probe invokes it THEN it fails with the error's type and message, not its stack trace
        with pytest.raises(probe.ProbeFailed, match=r"function failed \(Unhandled\): RuntimeError: out of memory$"):
            probe.measure(lambda_client_for(server), "function", generation_request(), None, True, 1, 60)
    finally:
        server.stop()
