"""infra/entrypoint.sh, the image's ENTRYPOINT, given the handler the image's CMD and the template name:
it serves the function under the real Lambda RIE and answers the events in events/."""

from __future__ import annotations

import json

import pytest
from conftest import EVENTS, load_event
from deployables import parse_dockerfile
from rie import RieServer, api_body

pytestmark = pytest.mark.e2e


def test_entry_script_serves_the_images_handler_and_answers_sample_events(tiny_phi_dir):
    # GIVEN the entry script started with the handler named by the Dockerfile's CMD (as the image does)
    (handler,) = parse_dockerfile().stage("runtime").exec_form("CMD")
    rie = RieServer(tiny_phi_dir, HANDLER=handler)
    try:
        # WHEN the seed's event is sent, as `curl -d @events/rest-generate-seed-prompt.json` sends it
        seed = rie.invoke_raw((EVENTS / "rest-generate-seed-prompt.json").read_bytes())
        # AND then a bad input
        bad = rie.invoke(load_event("rest-generate-missing-prompt"))
        # THEN the seed gets its generated text
        prompt = json.loads(load_event("rest-generate-seed-prompt")["body"])["prompt"]
        assert seed["statusCode"] == 200
        assert api_body(seed)["generated_text"].startswith(prompt)
        # AND the bad input a JSON 422, and the runtime stays up
        assert bad["statusCode"] == 422 and api_body(bad)["error"] == "validation_error"
        assert rie.alive()
    finally:
        rie.stop()
