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


@pytest.fixture(scope="session")
def smollm2_openai_transport(smollm2_dir):
    """One SmolLM2 function under the real RIE, reached through an API Gateway-shaped transport, for the modules
    that drive it with the `openai` SDK (tests/e2e/test_openai_sdk_rie.py, test_structured_output_rie.py)."""
    from apigateway_transport import ApiGatewayTransport
    from rie import RieServer

    # The protocol is under test there, not the deadline (tests/e2e/test_time_promise_rie.py owns that): a budget
    # just under the invoke's own 300 s timeout keeps a loaded machine (three sampled rows of a schema took 117 s
    # on a 2-vCPU host shared with three benchmarks; seconds on a quiet one) from turning answers into time limits.
    rie = RieServer(smollm2_dir, API_TIMEOUT_MS="280000")
    yield ApiGatewayTransport(rie)
    rie.stop()


@pytest.fixture(scope="session")
def smollm2_openai_client(smollm2_openai_transport):
    """The real `openai` SDK on that function. As the README tells a user: the API key goes in x-api-key (API
    Gateway checks it); the SDK's own api_key is required by the SDK and ignored. No retries: every answer is the
    function's first."""
    import httpx2
    import openai
    from apigateway_transport import BASE_URL

    with openai.OpenAI(
        base_url=BASE_URL,
        api_key="unused",
        default_headers={"x-api-key": "test-key"},
        http_client=httpx2.Client(transport=smollm2_openai_transport),
        max_retries=0,
    ) as sdk:
        yield sdk
