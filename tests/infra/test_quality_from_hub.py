"""`make quality MODEL_ID=microsoft/phi-2` against the Hub stand-in (hub_standin.py: the Hub is unreachable here):
the reference and every format are prepared from the pinned checkpoint, and the gate is measured on both paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hub_standin
import pytest
from conftest import ROOT
from test_prepare_phi2_from_hub import hub  # noqa: F401 - the Hub stand-in fixture, shared

QUALITY = ROOT / "infra" / "bench" / "quality.py"


@pytest.mark.slow
def test_quality_measures_every_format_of_phi2_against_its_checkpoint(hub, tmp_path):  # noqa: F811
    server, _ = hub
    server.requests.clear()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=server.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1")
    command = [sys.executable, str(QUALITY), "microsoft/phi-2", "--formats", "int8,int4"]
    command += ["--cache-dir", str(tmp_path / "models"), "--out-dir", str(tmp_path / "out")]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert completed.returncode >= 0, f"died by signal {-completed.returncode}"
    assert completed.returncode == 0, completed.stderr[-4000:]
    # THEN the checkpoint came from the Hub at the pinned revision
    assert any(f"/tree/{hub_standin.PINNED}" in path for _, path in server.requests)
    # AND the report has every format, on both paths, with the gate's verdict
    report = json.loads(Path(completed.stdout.strip().splitlines()[-1]).read_text())
    assert set(report["by_format"]) == {"int8", "int4"}
    for name, quality in report["by_format"].items():
        assert set(quality["numerics"]) == {"decode", "prompt"}, name
        for measured in (quality, *quality["numerics"].values()):
            assert 0.0 <= measured["greedy_agreement"] <= 1.0 and measured["perplexity_ratio"] > 0
        assert quality["greedy_agreement"] == min(n["greedy_agreement"] for n in quality["numerics"].values())
        assert quality["passes"] == (quality["greedy_agreement"] >= 0.95 and quality["perplexity_ratio"] <= 1.02)
    assert "| int4 | worse of both |" in completed.stdout
