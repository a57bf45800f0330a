"""Run the function under the real Lambda Runtime Interface Emulator, started by the project's own
entry script (the one `make serve` and the container image run), and invoke it over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INVOKE_PATH = "/2015-03-31/functions/function/invocations"


class RuntimeCrashed(AssertionError):
    """The function's runtime process died by a signal during an invoke (the RIE answered 502)."""


def signal_named(description: str) -> str | None:
    """SIGSEGV for "segmentation fault": Go's (the RIE's) wording of a signal, as its name."""
    wanted = description.strip().lower()
    for sig in signal.Signals:
        if (signal.strsignal(sig) or "").lower() == wanted:
            return sig.name
    return None


def runtime_signal(text: str) -> str | None:
    """The signal the RIE says the runtime died by ("Runtime exited with error: signal: segmentation fault")."""
    match = re.search(r"exited(?: with error)?: signal: ([a-z -]+)", text)
    if not match:
        return None
    return signal_named(match.group(1)) or f"signal: {match.group(1).strip()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RieServer:
    """One RIE process. It serves one invoke at a time, so callers invoke sequentially."""

    def __init__(self, model_dir: Path, **env: str) -> None:
        rie = os.environ.get("RIE_BIN", str(ROOT / ".cache" / "rie" / "aws-lambda-rie"))
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="rie-", suffix=".log", delete=False)  # noqa: SIM115
        environment = {
            **os.environ,
            "MODEL_DIR": str(model_dir),
            "RIE_BIN": rie,
            "PYTHON": sys.executable,
            "RIE_ADDRESS": f"127.0.0.1:{self.port}",
            "RUNTIME_API_ADDRESS": f"127.0.0.1:{free_port()}",
            "POWERTOOLS_TRACE_DISABLED": "true",
            # The model loads within init, so a test's first invoke finds it ready (tests/e2e/test_init_rie.py
            # covers on-demand environments, whose init returns at once while the model loads behind it).
            "MODEL_LOADING": "init",
            **env,
        }
        self.process = subprocess.Popen(
            [str(ROOT / "infra" / "entrypoint.sh")],
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"RIE exited early:\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"RIE did not listen on {self.port}:\n{self.logs()}")

    def invoke_raw(self, payload: bytes, timeout: float = 300) -> dict | list | str:
        """The function's response; raises RuntimeCrashed, naming the signal, if the runtime died by one."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{INVOKE_PATH}", data=payload, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            name = runtime_signal(body) or runtime_signal(self.logs())
            if name:
                tail = "\n".join(self.logs().splitlines()[-40:])
                raise RuntimeCrashed(
                    f"the function's runtime died by {name} during the invoke (RIE: HTTP {error.code} {body})\n"
                    f"last lines of the RIE's log:\n{tail}"
                ) from None
            raise

    def invoke(self, event: object, timeout: float = 300) -> dict:
        return self.invoke_raw(json.dumps(event).encode(), timeout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def slowed(**delays: str) -> dict[str, str]:
    """RieServer settings that serve the function with its model slowed by construction (tests/slowed_function.py:
    SLOW_PASS_S, SLOW_PROMPT_PASS_S, SLOW_LOAD_S, FROZEN_BETWEEN_REQUESTS), for tests that must not depend on
    how fast the CPU is."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return {"HANDLER": "slowed_function.lambda_handler", "PYTHONPATH": path, **delays}


def api_body(response: dict) -> dict:
    """The JSON body of an API Gateway proxy response."""
    return json.loads(response["body"])
