"""Shared fixtures: sample events from events/, prepared models, a fake generator, a Lambda context."""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EVENTS = ROOT / "events"
MODEL_CACHE = Path(os.environ.get("MODEL_CACHE", ROOT / ".cache" / "models"))

# Unit tests never talk to AWS: Powertools and boto3 get a region and no tracing daemon.
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "true")


def load_event(name: str) -> dict:
    """A sample event from events/ (the same files `sam local invoke -e` uses)."""
    return json.loads((EVENTS / f"{name}.json").read_text())


def openai_event(name: str, **changes) -> dict:
    """A sample event from events/openai/ with fields of its JSON body changed (None removes one)."""
    event = load_event(f"openai/{name}")
    body = json.loads(event["body"])
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    event["body"] = json.dumps(body)
    return event


AWS_REGION = "us-east-1"


@pytest.fixture
def moto_credentials(monkeypatch) -> str:
    """Fake credentials and a region for moto (never real ones); returns the region."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": AWS_REGION,
    }.items():
        monkeypatch.setenv(name, value)
    return AWS_REGION


@pytest.fixture
def event():
    return load_event


@dataclass
class LambdaContext:
    """The attributes of the runtime's context object that the handler reads."""

    remaining_ms: int = 60_000
    function_name: str = "phi2-generate"
    memory_limit_in_mb: int = 10240
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:phi2-generate"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        self._deadline = time.monotonic() + self.remaining_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


@pytest.fixture
def lambda_context():
    return LambdaContext()


def prepared_model(name: str, fmt: str = "safetensors") -> Path:
    """Prepare a model with the project's own script (cached across runs, like `make serve` does)."""
    import prepare_model

    suffix = "auto" if fmt == "safetensors" else fmt
    return prepare_model.prepare(name, MODEL_CACHE / f"{name}-{suffix}", None, "auto", force=False, fmt=fmt)


@pytest.fixture(scope="session")
def tiny_phi_dir() -> Path:
    return prepared_model("tiny-phi")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return prepared_model("smollm2")


@pytest.fixture(scope="session")
def tiny_phi_int8_dir() -> Path:
    return prepared_model("tiny-phi", "int8")


@pytest.fixture(scope="session")
def smollm2_int8_dir() -> Path:
    return prepared_model("smollm2", "int8")
