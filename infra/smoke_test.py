#!/usr/bin/env python3
"""Smoke-test a deployed stack: read its Outputs, POST the seed's request to GenerateUrl, check the answer.

    python infra/smoke_test.py phi2-lambda                    # the stack name given to `sam deploy`
    python infra/smoke_test.py phi2-lambda --api-key KEY      # when deployed with RequireApiKey=true
    python infra/smoke_test.py phi2-lambda --prompt "The capital of France is"

Exits 0 when /generate answers 200 with a `generated_text` that continues the prompt (and /health, if
the stack exports HealthUrl, says the model is loaded); 1 otherwise, saying why. A cold start of a
multi-gigabyte image can outlast API Gateway's 29 s: 502/503/504 answers are retried a few times
(the execution environment keeps initialising meanwhile).
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
    answer = call(url, body, api_key, timeout)
    for _ in range(retries):
        if answer.status not in RETRYABLE:
            break
        time.sleep(pause)
        answer = call(url, body, api_key, timeout)
    return answer


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
) -> dict[str, Any]:
    """Smoke-test the API named by a stack's outputs; a summary on success, SmokeTestFailed otherwise."""
    if "GenerateUrl" not in outputs:
        raise SmokeTestFailed(f"the stack has no GenerateUrl output (outputs: {sorted(outputs)})")
    summary: dict[str, Any] = {"generate_url": outputs["GenerateUrl"]}
    answer = call_with_retries(outputs["GenerateUrl"], {"prompt": prompt}, api_key, timeout, retries, pause)
    text = check_generate(answer, prompt)
    summary.update(status=answer.status, seconds=round(answer.seconds, 2), generated_text=text)
    summary["details"] = answer.body.get("details")
    if "HealthUrl" in outputs:
        health = call_with_retries(outputs["HealthUrl"], None, api_key, timeout, retries, pause)
        if health.status != 200 or not isinstance(health.body, dict) or health.body.get("loaded") is not True:
            raise SmokeTestFailed(f"GET /health answered {health.status}: {health.body}")
        summary["model_id"] = health.body.get("model_id")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stack", help="CloudFormation stack name (sam deploy --stack-name)")
    parser.add_argument("--region", help="AWS region (default: the AWS CLI/SDK configuration)")
    parser.add_argument("--prompt", default=None, help="prompt to send (default: the seed's prompt)")
    parser.add_argument("--api-key", help="x-api-key value, for a stack deployed with RequireApiKey=true")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per HTTP request")
    parser.add_argument("--retries", type=int, default=3, help="retries on 502/503/504 (cold start)")
    args = parser.parse_args(argv)

    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    cloudformation = boto3.client("cloudformation", region_name=args.region)
    prompt = args.prompt or seed_prompt()
    try:
        summary = run(stack_outputs(args.stack, cloudformation), prompt, args.api_key, args.timeout, args.retries)
    except (SmokeTestFailed, OSError, BotoCoreError, ClientError) as exc:
        print(f"smoke test FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
