"""Extension points of the engine, for code running in the same process (a profiler, fault injection in tests).

`before_each_pass(observer)` registers `observer(batch, start, tokens, prompt)`, called at the start of every
forward pass of the served model (the warm-up's passes included), inside the pass's own timing: whatever it spends
counts as the pass's cost for the planner and the timings, exactly as a slower CPU would. The tests use it to
make work long by construction instead of relying on how fast the machine is (tests/slowed_function.py).
Nothing registers an observer in production; a pass then pays one loop over an empty tuple. No torch here:
registering must not import it (the init phase imports torch only in the loading thread).
"""

from __future__ import annotations

from collections.abc import Callable

PassObserver = Callable[[int, int, int, bool], None]
"""Called with (batch rows, position of the pass's first token, tokens per row in the pass, whether the pass
reads the prompt: its only pass, or one of its chunks; False for a decode step, or a step verifying drafted
tokens)."""

_before_pass: tuple[PassObserver, ...] = ()


def before_each_pass(observer: PassObserver) -> Callable[[], None]:
    """Call `observer` before every forward pass from now on; returns the function that removes it."""
    global _before_pass
    _before_pass = (*_before_pass, observer)

    def remove() -> None:
        global _before_pass
        _before_pass = tuple(o for o in _before_pass if o is not observer)

    return remove


def run_before_pass(batch: int, start: int, tokens: int, prompt: bool) -> None:
    """Called by the engine's forward hook (engine/hooks.py) at the start of each pass."""
    for observer in _before_pass:
        observer(batch, start, tokens, prompt)
