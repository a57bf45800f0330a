"""Run the streaming runtime (`phi2.runtime.stream_runtime.main`, unchanged) with the FakeGenerator in place of the
model, for tests of the runtime loop that need no model: `FAKE_GENERATOR` holds the fake's fields as JSON."""

from __future__ import annotations

import json
import os

from fakes import FakeGenerator

from phi2.engine import generator

fields = json.loads(os.environ.get("FAKE_GENERATOR", "{}"))
if "tokens" in fields:
    fields["tokens"] = tuple(fields["tokens"])
if "fail_with" in fields:  # the message of a RuntimeError raised where the model would fail
    fields["fail_with"] = RuntimeError(fields["fail_with"])
fake = FakeGenerator(**fields)
# In place of the model, before the handler's init phase would start loading one.
generator._generator = fake
generator.get_generator = lambda wait_s=None: fake

if __name__ == "__main__":
    from phi2.runtime import stream_runtime

    stream_runtime.main()
