"""The function with its model slowed by construction, for tests whose outcome must not depend on how fast
the CPU is: a fast CPU finishes the tiny model's 1,024 tokens inside a 1.5 s budget, a slow one may not even
load SmolLM2 before a test's next request. The delays go through the engine's documented extension point
(`phi2.engine.extensions.before_each_pass`, inside each pass's timing, as a slower CPU would be), and only
in processes that import this module: production code has no knob for them.

Used in place of the function's entry point, from a process whose PYTHONPATH holds tests/:
- `slowed_function.lambda_handler`, the buffered surface's handler (`HANDLER=...` for tests/rie.py's RieServer),
- `python -m slowed_function`, the streaming surface's runtime loop (`phi2.runtime.stream_runtime.main`).

Read from the environment (test-only names, never set in the template):
- `SLOW_PASS_S`: seconds added to every forward pass (prompt, decode and the warm-up's own);
- `SLOW_PROMPT_PASS_S`: seconds added to every pass that reads the prompt (its only pass, or each chunk of it);
- `SLOW_LOAD_S`: seconds added to the model's load (spent in the warm-up's first pass, before the model is
  ready), so that a load takes that long at least, whatever the CPU;
- `FROZEN_BETWEEN_REQUESTS=true`: the load's added seconds elapse only while an invocation is in flight, as on
  Lambda, which freezes an execution environment (background threads included) when no request is in flight.
  The RIE never freezes: this stands in for it, so a test can show what a request-driven load needs.
"""

from __future__ import annotations

import os
import threading
import time

from phi2.engine import extensions
from phi2.engine import generator as generator_module

PASS_S = float(os.environ.get("SLOW_PASS_S", "0") or 0)
PROMPT_PASS_S = float(os.environ.get("SLOW_PROMPT_PASS_S", "0") or 0)
LOAD_S = float(os.environ.get("SLOW_LOAD_S", "0") or 0)
FROZEN_BETWEEN_REQUESTS = os.environ.get("FROZEN_BETWEEN_REQUESTS", "").lower() == "true"
TICK_S = 0.05

_thawed = threading.Event()  # set while an invocation is in flight
_load_left = {"s": LOAD_S}


def _spend_load_delay() -> None:
    """Spend what is left of the load's added seconds: only while thawed when frozen between requests."""
    while _load_left["s"] > 0:
        if FROZEN_BETWEEN_REQUESTS:
            _thawed.wait()
        tick = min(TICK_S, _load_left["s"])
        time.sleep(tick)
        _load_left["s"] -= tick


def _before_pass(batch: int, start: int, tokens: int, prompt: bool) -> None:
    if generator_module.load_status() == (None, None):  # still loading: a warm-up pass
        _spend_load_delay()
    time.sleep(PASS_S + (PROMPT_PASS_S if prompt else 0.0))


extensions.before_each_pass(_before_pass)

# Imported after the observer is registered: importing the handler starts the load (the init phase).
from phi2.runtime import handler  # noqa: E402

_serve = handler.lambda_handler


def lambda_handler(event, context):
    """The function's handler, with the environment thawed while it runs."""
    _thawed.set()
    try:
        return _serve(event, context)
    finally:
        _thawed.clear()


if __name__ == "__main__":
    from phi2.runtime import stream_runtime

    handler.lambda_handler = lambda_handler  # the runtime loop reads it when it starts, below
    stream_runtime.main()
