"""A runtime that dies by a signal under the real RIE is reported as a crash naming the signal.

The int8 kernel's SIGSEGV on AVX-512 (issue 9) showed only as `HTTP Error 502: Bad Gateway`. Here a handler
that kills its own process stands in for any native crash: the RIE, the runtime client and the signal are real.
"""

from __future__ import annotations

import signal

import pytest
from rie import RieServer, RuntimeCrashed, signal_named

pytestmark = pytest.mark.e2e

HANDLER = """
import os
import signal


def handler(event, context):
    if event.get("die_by"):
        os.kill(os.getpid(), getattr(signal, event["die_by"]))
    return {"alive": True}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("crashing-function")
    (root / "crashing.py").write_text(HANDLER)
    rie = RieServer(root, HANDLER="crashing.handler", LAMBDA_TASK_ROOT=str(root))
    yield rie
    rie.stop()


@pytest.mark.parametrize("name", ["SIGSEGV", "SIGILL", "SIGABRT"])
def test_an_invoke_whose_runtime_dies_by_a_signal_fails_naming_the_signal(server, name):
    # GIVEN a warm runtime
    assert server.invoke({}) == {"alive": True}
    # WHEN an invoke kills it with the signal THEN the failure names the signal, with the RIE's log
    with pytest.raises(RuntimeCrashed, match=rf"died by {name}\b") as crash:
        server.invoke({"die_by": name})
    assert "Runtime.ExitError" in str(crash.value)
    # AND the RIE starts a new runtime for the next invoke (a cold start, as Lambda does)
    assert server.invoke({}) == {"alive": True}


def test_go_signal_wording_maps_to_signal_names():
    assert signal_named("segmentation fault") == "SIGSEGV"
    assert signal_named("illegal instruction") == "SIGILL"
    assert signal_named("killed") == signal.SIGKILL.name
    assert signal_named("not a signal") is None
