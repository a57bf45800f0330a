"""The catalogue of hostile events in events/hostile/: each file describes one bad (or valid-but-unusual)
invocation and the answer it must get.

A file holds `description`, `expect`, and one way to build the invoke payload:

- `event`: the event itself (any JSON value: direct invocations may be garbage), or
- `base`: the name of a sample event in events/, changed by `set` ({"dotted.path": value}) and `unset`;
- `expand`: for inputs too big to commit: {"at": dotted path, "template": "...@FILL@...", "unit": text,
  "times": n} puts `unit` repeated n times (with @I@ replaced by the repetition's index) into the template;
- `payload` / `payload_base64`: raw invoke bytes that are not a JSON event at all.

`expect` is {"status", "error", "mentions": [...]} (a 4xx error whose message names the problem), {"status":
200} (with "details": {...}, fields the answer's details must have), or {"runtime_error": "Runtime.UnmarshalError"}
(the Lambda runtime rejects the payload itself). On the OpenAI routes it is {"status", "openai": {"type", "code",
"param"}, "mentions": [...]}: OpenAI's error shape, with the request id in the x-request-id header ({"status": 200,
"openai": null}: a served OpenAI request; with "choice": {...}, fields its first choice must have).

`"real_model": true` marks a case whose answer needs the real model and its constrained decoder (a schema the
library refuses, a cut-short structured answer): the in-process tests with a fake generator leave it out.

To send one by hand:  python tests/reliability/hostile.py rest-body-json-array | curl --data-binary @- <invoke url>
"""

from __future__ import annotations

import base64
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
CATALOGUE = EVENTS / "hostile"


@dataclass(frozen=True)
class HostileCase:
    name: str
    description: str
    expect: dict[str, Any]
    payload: bytes
    real_model: bool = False


def names() -> list[str]:
    return sorted(path.stem for path in CATALOGUE.glob("*.json"))


def _walk(target: Any, dotted: str) -> tuple[Any, str]:
    *parents, last = dotted.split(".")
    for key in parents:
        target = target[key]
    return target, last


def _expanded(spec: dict[str, Any]) -> str:
    unit, times = spec["unit"], spec["times"]
    fill = "".join(unit.replace("@I@", str(i)) for i in range(times)) if "@I@" in unit else unit * times
    return spec["template"].replace("@FILL@", fill)


def load(name: str) -> HostileCase:
    spec = json.loads((CATALOGUE / f"{name}.json").read_text(encoding="utf-8"))
    if "payload" in spec:
        payload = spec["payload"].encode("utf-8")
    elif "payload_base64" in spec:
        payload = base64.b64decode(spec["payload_base64"])
    else:
        if "base" in spec:
            event = json.loads((EVENTS / f"{spec['base']}.json").read_text(encoding="utf-8"))
        else:
            event = copy.deepcopy(spec["event"])
        for dotted in spec.get("unset", []):
            parent, key = _walk(event, dotted)
            del parent[key]
        for dotted, value in spec.get("set", {}).items():
            parent, key = _walk(event, dotted)
            parent[key] = value
        if "expand" in spec:
            parent, key = _walk(event, spec["expand"]["at"])
            parent[key] = _expanded(spec["expand"])
        payload = json.dumps(event, ensure_ascii=False).encode("utf-8")
    return HostileCase(name, spec["description"], spec["expect"], payload, bool(spec.get("real_model")))


@dataclass(frozen=True)
class Outcome:
    """What an invoke answered, whatever its shape."""

    status: int | None  # HTTP status (API Gateway proxy response or direct error object); None: runtime error
    body: dict[str, Any] | None
    runtime_error: str | None
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names


def _headers(response: dict[str, Any]) -> dict[str, str]:
    headers = {name.lower(): values[-1] for name, values in (response.get("multiValueHeaders") or {}).items()}
    headers.update({name.lower(): value for name, value in (response.get("headers") or {}).items()})
    return headers


def outcome(response: Any) -> Outcome:
    if isinstance(response, dict) and "errorType" in response:
        return Outcome(None, None, response["errorType"])
    if isinstance(response, dict) and "statusCode" in response:
        return Outcome(response["statusCode"], json.loads(response["body"]), None, _headers(response))
    if isinstance(response, dict) and "status_code" in response:
        return Outcome(response["status_code"], response, None)
    return Outcome(200, response, None)


def assert_openai_answer(got: Outcome, expect: dict[str, Any]) -> None:
    """An answer on the OpenAI routes is what `expect` says, in OpenAI's shape."""
    assert got.status == expect["status"], got
    if expect["status"] == 200:
        assert got.body["choices"] and got.body["object"] in ("chat.completion", "text_completion"), got.body
        first = got.body["choices"][0]
        assert {key: first.get(key) for key in expect.get("choice", {})} == expect.get("choice", {}), first
        return
    assert set(got.body) == {"error"}, got.body
    error = got.body["error"]
    assert {key: error[key] for key in ("type", "code", "param")} == expect["openai"], error
    assert got.headers.get("x-request-id"), got.headers
    for mention in expect.get("mentions", []):
        assert mention in error["message"], (mention, error["message"])
    assert len(error["message"]) < 2000  # input is named, not echoed back in bulk


if __name__ == "__main__":
    sys.stdout.buffer.write(load(sys.argv[1]).payload)
