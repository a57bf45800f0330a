#!/usr/bin/env python3
"""Measure a deployed stack's function where it really runs: a forced cold start, then warm runs.

    python infra/probe.py phi2-lambda                      # the stack name given to `sam deploy`
    python infra/probe.py phi2-lambda --warm 5 --json      # one JSON object instead of the summary
    python infra/probe.py phi2-lambda --no-cold            # warm runs only, on the `live` alias

Needs boto3 (`pip install boto3`). Invokes the stack's FunctionArn directly (lambda:InvokeFunction,
`LogType=Tail`), not through API Gateway, so neither its 29 s limit nor its latency is in the numbers. The cold
run sets `PROBE_NONCE` on the function's $LATEST (every other variable kept) so that Lambda starts a new
execution environment, times the generation request from sending it to the answer's first byte, then puts the
variables back. While the model loads, Lambda freezes the environment between invocations (background threads
included), so the load advances only during them: a generation waits for it within its own deadline, GET
/health for up to HEALTH_WAIT_SECONDS, and a `model_loading` or `loading` answer is sent again at once (a
pause between calls would only wait on a frozen environment). A published version is immutable, so the alias
`live` cannot be made cold this way: the cold run and the warm runs after it use $LATEST (the same image and
settings as `live` after `sam deploy`).
Prints the host's CPU and kernels (from /health), memory, init and load times, cold TTFT and tokens/s and the
warm medians. Lambda's REPORT fields (Init Duration, Max Memory Used) are None when the log tail has no REPORT:
Lambda sends it only at SystemLogLevel INFO or DEBUG. The prompt goes to the function only, never to a log.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from smoke_test import ROOT, SmokeTestFailed, seed_prompt, stack_outputs

NONCE = "PROBE_NONCE"
ALIAS = "live"
HEALTH_EVENT = ROOT / "events" / "rest-health.json"
REPORT_FIELDS = {  # the text REPORT line's names, and the JSON log format's `platform.report` metrics
    "Duration": ("duration_ms", "durationMs"),
    "Billed Duration": ("billed_duration_ms", "billedDurationMs"),
    "Memory Size": ("memory_size_mb", "memorySizeMB"),
    "Max Memory Used": ("max_memory_used_mb", "maxMemoryUsedMB"),
    "Init Duration": ("init_duration_ms", "initDurationMs"),
}
# Scanned left to right: "Billed Duration: 4311" is matched whole before its inner "Duration" could be.
REPORT_PATTERN = re.compile(r"(Init Duration|Billed Duration|Max Memory Used|Memory Size|Duration): ([0-9.]+)")
TIMINGS = ("time_to_first_token_ms", "tokens_per_second", "total_ms")


class ProbeFailed(Exception):
    """The function could not be measured; the message says why."""


@dataclass
class Invocation:
    body: Any
    report: dict[str, float | None]
    answered_at: float  # time.monotonic() when the answer's first byte came


def parse_report(tail: str | None) -> dict[str, float | None]:
    """The last REPORT of a log tail (text line or JSON `platform.report`); None for every field it lacks."""
    report: dict[str, float | None] = {key: None for key, _ in REPORT_FIELDS.values()}
    for line in reversed((tail or "").splitlines()):
        if line.startswith("REPORT "):
            for name, value in REPORT_PATTERN.findall(line):
                report[REPORT_FIELDS[name][0]] = float(value)
            return report
        if '"platform.report"' in line:
            try:
                metrics = json.loads(line)["record"]["metrics"]
            except (ValueError, KeyError, TypeError):
                continue
            for key, json_key in REPORT_FIELDS.values():
                report[key] = metrics.get(json_key)
            return report
    return report


def median(values: list[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return round(statistics.median(present), 2) if present else None


def run_record(details: dict[str, Any], report: dict[str, float | None]) -> dict[str, Any]:
    """One generation's numbers: the function's own timings and Lambda's REPORT."""
    timings = details.get("timings") or {}
    record = {name: timings.get(name) for name in TIMINGS}
    record.update(generated_tokens=details.get("generated_tokens"), finish_reason=details.get("finish_reason"))
    return {**record, **report}


def warm_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"runs": len(runs)}
    for name in (*TIMINGS, "duration_ms"):
        summary[f"median_{name}"] = median([run[name] for run in runs])
    used = [run["max_memory_used_mb"] for run in runs if run["max_memory_used_mb"] is not None]
    summary["max_memory_used_mb"] = max(used) if used else None
    return summary


def invoke(client: Any, function: str, payload: dict, qualifier: str | None) -> Invocation:
    """One synchronous invoke with the log tail; a function error (FunctionError set) is ProbeFailed."""
    extra = {"Qualifier": qualifier} if qualifier else {}
    response = client.invoke(FunctionName=function, Payload=json.dumps(payload).encode(), LogType="Tail", **extra)
    answered_at = time.monotonic()
    raw = response["Payload"].read()
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")
    # Lambda flags an unhandled error with FunctionError; the RIE does not, but answers the same body.
    unhandled = isinstance(body, dict) and {"errorType", "errorMessage"} <= body.keys()
    if response.get("FunctionError") or unhandled:
        detail = f"{body['errorType']}: {body['errorMessage']}" if unhandled else body
        raise ProbeFailed(f"the function failed ({response.get('FunctionError', 'Unhandled')}): {str(detail)[:300]}")
    tail = base64.b64decode(response.get("LogResult") or "").decode(errors="replace")
    return Invocation(body, parse_report(tail), answered_at)


def generate(client: Any, function: str, request: dict, qualifier: str | None, timeout: float) -> dict[str, Any]:
    """One generation, sent again while the model is still loading: its numbers, `wall_s` and `attempts`."""
    started, first_report, attempts = time.monotonic(), None, 0
    while True:
        attempts += 1
        answer = invoke(client, function, request, qualifier)
        first_report = first_report or answer.report
        body = answer.body if isinstance(answer.body, dict) else {}
        if body.get("error") != "model_loading":
            break
        if time.monotonic() - started > timeout:
            raise ProbeFailed(f"the model was still loading after {timeout:.0f} s")
    if "status_code" in body or not isinstance(body.get("details"), dict):
        raise ProbeFailed(f"the function answered {body.get('status_code')} {body.get('error')}: {body.get('message')}")
    # The environment's init happened during the first attempt: its REPORT has the Init Duration.
    report = {**answer.report, "init_duration_ms": first_report["init_duration_ms"]}
    wall = {"wall_s": round(answer.answered_at - started, 3), "attempts": attempts}
    return {**run_record(body["details"], report), **wall}


def health(client: Any, function: str, qualifier: str | None, timeout: float) -> dict[str, Any]:
    """GET /health as API Gateway would send it (a direct invocation is routed to /generate), once loaded: each
    call waits for the load (and so moves it on), and is repeated at once while the model still loads."""
    event = json.loads(HEALTH_EVENT.read_text())
    started = time.monotonic()
    while True:
        response = invoke(client, function, event, qualifier).body
        response = response if isinstance(response, dict) else {}
        status, body = response.get("statusCode"), json.loads(response.get("body") or "null")
        if status == 200 and isinstance(body, dict):
            return body
        if status != 503 or not isinstance(body, dict) or body.get("status") != "loading":
            raise ProbeFailed(f"/health answered {status}: {body}")
        if time.monotonic() - started > timeout:
            raise ProbeFailed(f"/health still said loading after {timeout:.0f} s")


def measure(client: Any, function: str, request: dict, qualifier: str | None, cold: bool, warm: int, timeout: float):
    """Cold run (the caller made the environment new), /health, then `warm` runs, as one summary."""
    first = generate(client, function, request, qualifier, timeout) if cold else None
    host = health(client, function, qualifier, timeout)  # without a cold run, this waits out any loading
    runs = [generate(client, function, request, qualifier, timeout) for _ in range(warm)]
    reports = [run for run in [first, *runs] if run and run["memory_size_mb"]]
    return {
        "function": function,
        "qualifier": qualifier or "$LATEST",
        "model_id": host.get("model_id"),
        "load_seconds": host.get("load_seconds"),
        "memory_size_mb": reports[0]["memory_size_mb"] if reports else None,
        "cpu": host.get("cpu") or {},
        "kernels": host.get("kernels") or {},
        "speeds": host.get("speeds") or {},
        "cold": first,
        "warm": warm_summary(runs),
    }


def wait_updated(client: Any, function: str, timeout: float = 300) -> dict[str, Any]:
    """The function's configuration once no update is in progress (the waiter function_updated_v2 polls alike)."""
    deadline = time.monotonic() + timeout
    while True:
        config = client.get_function_configuration(FunctionName=function)
        status = config.get("LastUpdateStatus", "Successful")
        if status == "Failed":
            raise ProbeFailed(f"the function's update failed: {config.get('LastUpdateStatusReason')}")
        if status == "Successful" and config.get("State", "Active") == "Active":
            return config
        if time.monotonic() > deadline:
            raise ProbeFailed(f"the function's update is still {status} after {timeout:.0f} s")
        time.sleep(2)


def set_variables(client: Any, function: str, variables: dict[str, str]) -> None:
    client.update_function_configuration(FunctionName=function, Environment={"Variables": variables})
    wait_updated(client, function)


def force_cold_start(client: Any, function: str) -> dict[str, str]:
    """Set PROBE_NONCE on $LATEST (a configuration change retires its environments); returns the variables as
    they were, to put back."""
    environment = wait_updated(client, function).get("Environment") or {}
    if "Error" in environment:  # encrypted with a key we may not use: writing them back would lose them
        raise ProbeFailed(f"cannot read the function's environment ({environment['Error']}); use --no-cold")
    before = {k: v for k, v in (environment.get("Variables") or {}).items() if k != NONCE}
    set_variables(client, function, {**before, NONCE: str(time.time_ns())})
    return before


def live_qualifier(client: Any, function: str) -> str | None:
    """`live` when the function has that alias (the template's AutoPublishAlias), else None ($LATEST)."""
    try:
        client.get_alias(FunctionName=function, Name=ALIAS)
    except client.exceptions.ResourceNotFoundException:
        return None
    return ALIAS


def run(outputs: dict[str, str], client: Any, request: dict, cold: bool, warm: int, timeout: float) -> dict:
    """Probe the function a stack's outputs name."""
    function = outputs.get("FunctionArn")
    if not function:
        raise ProbeFailed(f"the stack has no FunctionArn output (outputs: {sorted(outputs)})")
    if cold:
        before = force_cold_start(client, function)
        try:
            summary = measure(client, function, request, None, True, warm, timeout)
        finally:
            set_variables(client, function, before)
    else:
        summary = measure(client, function, request, live_qualifier(client, function), False, warm, timeout)
    if summary["memory_size_mb"] is None:  # no REPORT in the log tails: the configuration says it too
        summary["memory_size_mb"] = client.get_function_configuration(FunctionName=function).get("MemorySize")
    return summary


def _num(value: float | None, unit: str, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def render(summary: dict[str, Any]) -> str:
    """The summary for a terminal."""
    cpu, cold, warm = summary["cpu"], summary["cold"], summary["warm"]
    lines = [
        f"function  {summary['function']} ({summary['qualifier']}), model {summary['model_id']}",
        f"host      {cpu.get('model')}, {cpu.get('vcpus')} vCPUs, flags {' '.join(cpu.get('flags') or [])}, "
        f"effective ISA {cpu.get('effective_isa')}",
        f"kernels   {json.dumps(summary['kernels'], sort_keys=True)}",
        f"speeds    {json.dumps(summary['speeds'], sort_keys=True)}",
        f"memory    {_num(summary['memory_size_mb'], 'MB', 0)}, model load {_num(summary['load_seconds'], 's', 2)}",
    ]
    if cold:
        lines.append(
            f"cold      {_num(cold['wall_s'], 's', 2)} to the answer's first byte (attempts: {cold['attempts']}), init "
            f"{_num(cold['init_duration_ms'], 'ms', 0)}, max memory used {_num(cold['max_memory_used_mb'], 'MB', 0)}"
        )
        lines.append(
            f"          TTFT {_num(cold['time_to_first_token_ms'], 'ms')}, "
            f"{_num(cold['tokens_per_second'], 'tok/s', 2)}, {cold['generated_tokens']} tokens in "
            f"{_num(cold['total_ms'], 'ms')}"
        )
    lines.append(
        f"warm x{warm['runs']:<3} median TTFT {_num(warm['median_time_to_first_token_ms'], 'ms')}, "
        f"{_num(warm['median_tokens_per_second'], 'tok/s', 2)}, total {_num(warm['median_total_ms'], 'ms')}"
    )
    if (cold or {}).get("duration_ms") is None and warm["median_duration_ms"] is None:
        lines.append("(no REPORT in the log tail: Lambda sends it at SystemLogLevel INFO or DEBUG)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", help="CloudFormation stack name (sam deploy --stack-name)")
    parser.add_argument("--region", help="AWS region (default: the AWS CLI/SDK configuration)")
    parser.add_argument("--warm", type=int, default=3, help="warm invocations (default 3)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_new_tokens of each request (default 64)")
    parser.add_argument("--prompt", help="prompt to send (default: the seed's prompt)")
    parser.add_argument("--no-cold", action="store_true", help="do not force a cold start: warm runs on `live`")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the model to load")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    # One attempt per invoke (a retried generation would be measured twice) and time for a 900 s function.
    config = Config(read_timeout=910, connect_timeout=10, retries={"total_max_attempts": 1})
    client = boto3.client("lambda", region_name=args.region, config=config)
    request = {"prompt": args.prompt or seed_prompt(), "max_new_tokens": args.max_tokens, "do_sample": False}
    try:
        outputs = stack_outputs(args.stack, boto3.client("cloudformation", region_name=args.region))
        summary = run(outputs, client, request, not args.no_cold, args.warm, args.timeout)
    except (ProbeFailed, SmokeTestFailed, OSError, BotoCoreError, ClientError) as exc:
        print(f"probe FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
