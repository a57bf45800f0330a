"""The model-preparation script: manifest, idempotence, verification, pinned revisions."""

from __future__ import annotations

import json
import shutil

import prepare_model
import pytest

from phi2.engine.model_files import read_manifest, sha256_of
from phi2.engine.planner import CALIBRATION_FILE, Calibration


def test_manifest_records_source_dtype_and_the_sha256_of_every_file_but_the_calibration(tiny_phi_dir):
    manifest = read_manifest(tiny_phi_dir)
    assert (manifest.model_id, manifest.source, manifest.dtype) == ("tiny-random-phi", "random", "float32")
    on_disk = {p.name for p in tiny_phi_dir.iterdir()} - {"manifest.json"}
    # THEN every file of the model is listed; the calibration is a measurement of the preparing machine,
    # different every time, so it stays out (the weights, and the image layer holding them, do not change)
    assert CALIBRATION_FILE in on_disk and Calibration.read(tiny_phi_dir) is not None
    assert set(manifest.files) == on_disk - {CALIBRATION_FILE}
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in on_disk)  # safetensors only
    for name, meta in manifest.files.items():
        assert sha256_of(tiny_phi_dir / name) == meta["sha256"]


def test_rerunning_on_a_complete_output_does_nothing(tiny_phi_dir):
    before = {p.name: p.stat().st_mtime_ns for p in tiny_phi_dir.iterdir()}
    prepare_model.prepare("tiny-phi", tiny_phi_dir, None, "auto", force=False)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_phi_dir.iterdir()} == before


def test_verify_catches_a_corrupted_file(tiny_phi_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_phi_dir, copy)
    assert prepare_model.main(["tiny-phi", "--out", str(copy), "--verify"]) == 0
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 64', '"hidden_size": 65'))
    assert prepare_model.main(["tiny-phi", "--out", str(copy), "--verify"]) == 1


def test_an_incomplete_output_is_prepared_again(tiny_phi_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_phi_dir, copy)
    (copy / "tokenizer.json").unlink()
    prepare_model.prepare("tiny-phi", copy, None, "auto", force=False)
    assert (copy / "tokenizer.json").is_file()
    assert json.loads((copy / "manifest.json").read_text())["model_id"] == "tiny-random-phi"


def test_hub_models_are_pinned_to_a_commit():
    model_id, source, revision = prepare_model.resolve_source("microsoft/phi-2", None)
    assert (model_id, source) == ("microsoft/phi-2", "hub")
    assert len(revision) == 40 and int(revision, 16) >= 0
    with pytest.raises(SystemExit, match="no pinned revision"):
        prepare_model.resolve_source("someone/unpinned-model", None)


def test_phi2_defaults_to_bfloat16_because_fp32_does_not_fit_lambda():
    assert prepare_model.default_dtype("microsoft/phi-2", "hub", "safetensors") == "bfloat16"
