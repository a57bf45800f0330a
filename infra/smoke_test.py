#!/usr/bin/env python3
"""Smoke-test a deployed stack: read its Outputs, POST the seed's request to GenerateUrl, check the answer.

    python infra/smoke_test.py phi2-lambda                    # the stack name given to `sam deploy`
    python infra/smoke_test.py phi2-lambda --api-key KEY      # when deployed with RequireApiKey=true
    python infra/smoke_test.py phi2-lambda --prompt "The capital of France is"

Needs boto3 (`pip install boto3`) and credentials allowed cloudformation:DescribeStacks.

Exits 0 when /health (if the stack exports HealthUrl) says the model is loaded and /generate answers 200 with
a `generated_text` that continues the prompt; 1 otherwise, saying why.

A new execution environment loads Phi-2 for tens of seconds, and Lambda freezes an environment whenever no
request is in flight, background threads included: the load advances only while some request runs. So the
smoke test first polls GET /health, which waits for the load up to HEALTH_WAIT_SECONDS (20 s) per call;
each call moves the load on, and a 503 `loading` is retried at once (sleeping would only wait on a frozen
environment), up to --load-timeout. 502 and 504 (API Gateway's own: the image fetch and init outlasting its
29 s, during which the invocation itself goes on) are retried after a pause. Then it POSTs the prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEED_EVENT = ROOT / "events" / "rest-generate-seed-prompt.json"
RETRYABLE = {502, 503, 504}
LOADING = 503


class SmokeTestFailed(Exception):
    """The deployed API did not answer as it should."""


@dataclass
class Answer:
    status: int
    body: Any
    seconds: float


def seed_prompt() -> str:
    """The prompt of the seed's request (the same body `events/` sends through the RIE)."""
    return json.loads(json.loads(SEED_EVENT.read_text())["body"])["prompt"]


def stack_outputs(stack_name: str, cloudformation: Any = None) -> dict[str, str]:
    """The Outputs of a deployed stack, by OutputKey."""
    if cloudformation is None:
        import boto3

        cloudformation = boto3.client("cloudformation")
    stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    if not stacks:
        raise SmokeTestFailed(f"stack {stack_name} not found")
    return {output["OutputKey"]: output["OutputValue"] for output in stacks[0].get("Outputs", [])}


def call(url: str, body: dict | None, api_key: str | None, timeout: float) -> Answer:
    """One HTTP request; any HTTP status is an Answer, only transport failures raise."""
    if urllib.parse.urlsplit(url).scheme not in ("https", "http"):
        raise SmokeTestFailed(f"not an HTTP(S) URL: {url}")
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if api_key:
        headers["x-api-key"] = api_key
    method = "POST" if body is not None else "GET"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 (scheme checked)
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (scheme checked)
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    seconds = time.monotonic() - started
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return Answer(status, parsed, seconds)


def call_with_retries(
    url: str, body: dict | None, api_key: str | None, timeout: float, retries: int, pause: float
) -> Answer:
    """Retry API Gateway's own 502/504 after `pause`, a 503 (the model still loading) at once."""
    answer = call(url, body, api_key, timeout)
    for _ in range(retries):
        if answer.status not in RETRYABLE:
            break
        time.sleep(0 if answer.status == LOADING else pause)
        answer = call(url, body, api_key, timeout)
    return answer


def wait_loaded(
    url: str, api_key: str | None, timeout: float, retries: int, pause: float, load_timeout: float
) -> tuple[Answer, int]:
    """GET /health until it says loaded (each call waits for the load, and moves it on); the answer, and the
    number of calls it took. SmokeTestFailed when it still loads after `load_timeout` or answers otherwise."""
    started, calls, gateway_errors = time.monotonic(), 0, 0
    while True:
        health = call(url, None, api_key, timeout)
        calls += 1
        if health.status in RETRYABLE - {LOADING} and gateway_errors < retries:
            gateway_errors += 1
            time.sleep(pause)
            continue
        loading = health.status == LOADING and isinstance(health.body, dict) and health.body.get("status") == "loading"
        if not loading or time.monotonic() - started > load_timeout:
            break
    if health.status != 200 or not isinstance(health.body, dict) or health.body.get("loaded") is not True:
        raise SmokeTestFailed(f"GET /health answered {health.status} after {calls} calls: {health.body}")
    return health, calls


def check_generate(answer: Answer, prompt: str) -> str:
    """The generated text, or SmokeTestFailed saying what is wrong with the answer."""
    if answer.status != 200:
        raise SmokeTestFailed(f"POST /generate answered {answer.status}: {answer.body}")
    if not isinstance(answer.body, dict) or not isinstance(answer.body.get("generated_text"), str):
        raise SmokeTestFailed(f"POST /generate answered without a generated_text string: {answer.body}")
    text = answer.body["generated_text"]
    if not text.startswith(prompt) or len(text) <= len(prompt):
        raise SmokeTestFailed(f"generated_text does not continue the prompt: {text!r}")
    return text


def run(
    outputs: dict[str, str],
    prompt: str,
    api_key: str | None = None,
    timeout: float = 60,
    retries: int = 3,
    pause: float = 5,
    load_timeout: float = 600,
) -> dict[str, Any]:
    """Smoke-test the API named by a stack's outputs; a summary on success, SmokeTestFailed otherwise."""
    if "GenerateUrl" not in outputs:
        raise SmokeTestFailed(f"the stack has no GenerateUrl output (outputs: {sorted(outputs)})")
    summary: dict[str, Any] = {"generate_url": outputs["GenerateUrl"]}
    if "HealthUrl" in outputs:
        health, calls = wait_loaded(outputs["HealthUrl"], api_key, timeout, retries, pause, load_timeout)
        summary.update(model_id=health.body.get("model_id"), health_calls=calls)
    answer = call_with_retries(outputs["GenerateUrl"], {"prompt": prompt}, api_key, timeout, retries, pause)
    text = check_generate(answer, prompt)
    summary.update(status=answer.status, seconds=round(answer.seconds, 2), generated_text=text)
    summary["details"] = answer.body.get("details")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", help="CloudFormation stack name (sam deploy --stack-name)")
    parser.add_argument("--region", help="AWS region (default: the AWS CLI/SDK configuration)")
    parser.add_argument("--prompt", default=None, help="prompt to send (default: the seed's prompt)")
    parser.add_argument("--api-key", help="x-api-key value, for a stack deployed with RequireApiKey=true")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per HTTP request")
    parser.add_argument("--retries", type=int, default=3, help="retries of one request on 502/503/504 (cold start)")
    parser.add_argument(
        "--load-timeout", type=float, default=600, help="seconds to keep polling /health while the model loads"
    )
    args = parser.parse_args(argv)

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    cloudformation = boto3.client("cloudformation", region_name=args.region)
    prompt = args.prompt or seed_prompt()
    try:
        outputs = stack_outputs(args.stack, cloudformation)
        summary = run(outputs, prompt, args.api_key, args.timeout, args.retries, load_timeout=args.load_timeout)
    except (SmokeTestFailed, OSError, BotoCoreError, ClientError) as exc:
        print(f"smoke test FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
