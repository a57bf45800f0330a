"""No user text in X-Ray traces: the real handler under the real awslambdaric, traced, with the X-Ray SDK
sending to a UDP listener on 127.0.0.1 that stands in for the X-Ray daemon.

The RIE hands the runtime no trace header (Lambda does: `Lambda-Runtime-Trace-Id`), and without one the
X-Ray SDK records nothing, so the runtime is pointed at the local stand-in of the Runtime API
(tests/runtime_api.py), which hands out a sampled trace header as Lambda does.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import pytest
from conftest import ROOT, load_event
from runtime_api import RuntimeApiStandIn, RuntimeProcess

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# The subsegment Powertools names after the function that runs every generation.
GENERATION = "## phi2.api.serving.generate"


class XrayDaemonStandIn:
    """Collects the UDP datagrams the X-Ray SDK sends (a JSON header line, then the segment document)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(256 * 1024)
            except TimeoutError:
                continue
            self.datagrams.append(data)

    def segments(self) -> list[dict]:
        documents = []
        for data in self.datagrams:
            _, _, body = data.partition(b"\n")
            documents.append(json.loads(body))
        return documents

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _names(segment: dict) -> list[str]:
    return [segment.get("name", "")] + [n for child in segment.get("subsegments", []) for n in _names(child)]


def test_traces_carry_the_generation_but_no_prompt_or_generated_text(tiny_phi_dir):
    daemon = XrayDaemonStandIn()
    stand_in = RuntimeApiStandIn()
    stand_in.sampled = True
    runtime = RuntimeProcess(
        stand_in,
        ["-m", "awslambdaric", "phi2.runtime.handler.lambda_handler"],
        MODEL_DIR=str(tiny_phi_dir),
        MODEL_LOADING="init",
        POWERTOOLS_TRACE_DISABLED="false",
        AWS_XRAY_DAEMON_ADDRESS=daemon.address,
        LAMBDA_TASK_ROOT=str(ROOT / "function"),
    )
    try:
        # GIVEN a traced invocation whose prompt carries a unique canary
        canary = f"canary-{uuid.uuid4().hex}"
        event = load_event("rest-generate-greedy")
        event["body"] = json.dumps({"prompt": f"My secret is {canary}.", "max_new_tokens": 4, "do_sample": False})
        # WHEN it is served
        invocation = stand_in.invoke(event)
        assert json.loads(invocation.data)["statusCode"] == 200, invocation.data[:500]
        waited = time.monotonic() + 10
        while time.monotonic() < waited and not any(GENERATION in n for s in daemon.segments() for n in _names(s)):
            time.sleep(0.2)
        # THEN X-Ray received the generation's subsegment
        segments = daemon.segments()
        assert any(GENERATION in name for s in segments for name in _names(s)), [_names(s) for s in segments]
        # AND the canary appears in no datagram: neither the prompt nor anything generated from it
        assert not [d for d in daemon.datagrams if canary.encode() in d]
        assert canary not in runtime.logs()
    finally:
        runtime.stop()
        stand_in.close()
        daemon.close()
