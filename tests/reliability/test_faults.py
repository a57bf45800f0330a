"""Faults in the prepared model directory, on copies of the tiny Phi-2 model: the real loader refuses each
with one line naming the problem, and under the RIE the function stays up, says not ready, and answers
503 at once instead of hanging or retrying the load."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import load_event
from rie import RieServer, api_body

from phi2.engine.hf_generator import TransformersGenerator
from phi2.engine.model_files import MANIFEST_NAME, describe_files, read_manifest, verify
from phi2.errors import ModelLoadError

WEIGHTS = "model.safetensors"


def _reseal(model: Path) -> None:
    """Rewrite the manifest to match the files, so that only the fault itself is left to find."""
    manifest = read_manifest(model)
    manifest.files = describe_files(model)
    (model / MANIFEST_NAME).write_text(manifest.to_json())


def _edit_manifest(model: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((model / MANIFEST_NAME).read_text())
    change(data)
    (model / MANIFEST_NAME).write_text(json.dumps(data))


def _garbage_same_size(model: Path) -> None:
    size = (model / WEIGHTS).stat().st_size
    (model / WEIGHTS).write_bytes(os.urandom(size))


def _tokenizer_larger_than_the_embedding(model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(1000)])  # 50,295 + 1,000 > 51,200 embedding rows
    tokenizer.save_pretrained(model)
    _reseal(model)


def _corrupt_and_reseal(name: str, content: bytes) -> Callable[[Path], None]:
    def fault(model: Path) -> None:
        (model / name).write_bytes(content)
        _reseal(model)

    return fault


# fault name -> (what it does to a copy of the model, what the one-line reason must say)
FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights missing": (lambda m: (m / WEIGHTS).unlink(), f"{WEIGHTS} is listed in the manifest but missing"),
    "weights empty": (lambda m: (m / WEIGHTS).write_bytes(b""), f"{WEIGHTS} has 0 bytes"),
    "weights truncated": (
        lambda m: os.truncate(m / WEIGHTS, (m / WEIGHTS).stat().st_size // 2),
        "(truncated or replaced)",
    ),
    "weights garbage of the same size": (_garbage_same_size, "weights in model failed to load"),
    "manifest missing": (lambda m: (m / MANIFEST_NAME).unlink(), f"{MANIFEST_NAME} is missing"),
    "manifest not JSON": (lambda m: (m / MANIFEST_NAME).write_text("{not json"), "is not a valid manifest"),
    "manifest lists a file that is not there": (
        lambda m: _edit_manifest(m, lambda d: d["files"].update({"extra.safetensors": {"sha256": "0", "size": 1}})),
        "extra.safetensors is listed in the manifest but missing",
    ),
    "manifest size differs from the file": (
        lambda m: _edit_manifest(m, lambda d: d["files"][WEIGHTS].update(size=123)),
        "the manifest says 123",
    ),
    "manifest of another version": (lambda m: _edit_manifest(m, lambda d: d.update(version=99)), "has version 99"),
    "manifest without safetensors weights": (
        lambda m: _edit_manifest(m, lambda d: d["files"].pop(WEIGHTS)),
        "manifest lists no safetensors weights",
    ),
    "tokenizer larger than the embedding": (
        _tokenizer_larger_than_the_embedding,
        "tokenizer has 51295 tokens but the model's embedding has 51200 rows",
    ),
    "tokenizer garbage": (_corrupt_and_reseal("tokenizer.json", b"\x00garbage{"), "tokenizer in model failed to load"),
    "config garbage": (_corrupt_and_reseal("config.json", b"{not json"), "failed to load"),
    "pickle file present": (
        lambda m: (m / "pytorch_model.bin").write_bytes(b"\x80\x04pickle"),
        "refusing to serve a directory with pickle weights: pytorch_model.bin",
    ),
}


def broken_copy(source: Path, tmp_path: Path, fault: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(source, model)
    FAULTS[fault][0](model)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_loader_refuses_a_broken_model_with_one_line_naming_the_problem(tiny_phi_dir, tmp_path, fault):
    # GIVEN a copy of the prepared model with one fault
    model = broken_copy(tiny_phi_dir, tmp_path, fault)
    # WHEN the real loader loads it
    with pytest.raises(ModelLoadError) as refused:
        TransformersGenerator.load(model, warmup=False)
    # THEN it refuses with one line that names the problem (no stack trace)
    reason = str(refused.value)
    assert FAULTS[fault][1] in reason
    assert "\n" not in reason and "Traceback" not in reason


def test_corruption_inside_the_tensor_data_is_caught_by_the_checksum_check(tiny_phi_dir, tmp_path):
    # GIVEN weights whose tensor bytes (not the header, not the size) were overwritten
    model = tmp_path / "model"
    shutil.copytree(tiny_phi_dir, model)
    with (model / WEIGHTS).open("r+b") as weights:
        weights.seek(-4096, os.SEEK_END)
        weights.write(os.urandom(4096))
    manifest = read_manifest(model)
    # WHEN the files are verified with checksums, as preparation does (cold starts check sizes only)
    # THEN the sha256 names the file
    with pytest.raises(ModelLoadError, match=f"{WEIGHTS} does not match its sha256"):
        verify(model, manifest, checksums=True)
    # AND so does the loader when VERIFY_CHECKSUMS asks it to hash at cold start
    with pytest.raises(ModelLoadError, match=f"{WEIGHTS} does not match its sha256"):
        TransformersGenerator.load(model, warmup=False, verify_checksums=True)


# Under the RIE each start costs an interpreter with torch: one fault per place the check happens.
RIE_FAULTS = ["weights missing", "weights garbage of the same size", "tokenizer larger than the embedding"]


@pytest.mark.e2e
@pytest.mark.parametrize("fault", RIE_FAULTS)
def test_under_the_rie_a_broken_model_means_not_ready_and_fast_503s(tiny_phi_dir, tmp_path, fault):
    # GIVEN the function started under the RIE on a broken model
    rie = RieServer(broken_copy(tiny_phi_dir, tmp_path, fault))
    try:
        # WHEN asked for its health (this invoke runs the init phase, which tries the load)
        health = rie.invoke(load_event("rest-health"), timeout=180)
        # THEN it is up but not ready
        assert health["statusCode"] == 503
        assert api_body(health)["status"] == "not_ready" and api_body(health)["loaded"] is False
        # AND generation answers 503 model_not_ready, every time, without retrying the load (no hang)
        for _ in range(2):
            response = rie.invoke(load_event("rest-generate-greedy"), timeout=30)
            assert response["statusCode"] == 503
            body = api_body(response)
            assert body["error"] == "model_not_ready" and body["request_id"]
            assert str(tmp_path) not in response["body"]  # the reason (with paths) is for the logs only
        assert rie.alive()
        # AND the init logged exactly one line, naming the problem, with no stack trace
        logs = rie.logs()
        failures = [json.loads(line) for line in logs.splitlines() if '"model failed to load"' in line]
        assert len(failures) == 1, logs
        assert FAULTS[fault][1] in failures[0]["reason"]
        assert "Traceback" not in logs
    finally:
        rie.stop()
