"""`infra/prepare_model.py microsoft/phi-2`, run exactly as the Dockerfile runs it, against a local stand-in
for the Hugging Face Hub (the Hub is unreachable here; see hub_standin.py for what it serves and why).

The stand-in serves a checkpoint with Phi-2's config keys, tensor names, fp16 storage, two shards and the
index, plus Phi-2's tokenizer files, at tiny sizes. The real snapshot_download fetches it at the pinned
revision (any other revision 404s), Xet disabled (HF_HUB_DISABLE_XET=1; the stand-in serves no Xet
metadata either), then the project's loader loads each prepared format and generates from it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import hub_standin
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

from phi2.engine import quantization
from phi2.engine.aligned_safetensors import misaligned
from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.engine.model_files import read_manifest

PREPARE = ROOT / "infra" / "prepare_model.py"
WRONG_REVISION = "0" * 40


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """GIVEN the Hub stand-in serving a tiny Phi-2-layout fp16 checkpoint at the pinned revision."""
    import prepare_model

    repo = tmp_path_factory.mktemp("hub-repo")
    stored = hub_standin.build_checkpoint(repo, prepare_model.phi2_tokenizer())
    server = hub_standin.HubStandIn(repo)
    yield server, stored
    server.close()


def prepare(hub_server, out: Path, fmt: str, revision: str = hub_standin.PINNED) -> subprocess.CompletedProcess:
    """The Dockerfile's command line (MODEL_ID=microsoft/phi-2, MODEL_DTYPE=auto), in a fresh HF_HOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(
        HF_ENDPOINT=hub_server.endpoint,
        HF_HOME=str(out.parent / f"hf-{out.name}"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    command = [sys.executable, str(PREPARE), "microsoft/phi-2", "--dtype", "auto", "--format", fmt]
    command += ["--out", str(out), "--revision", revision]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def assert_ran(completed: subprocess.CompletedProcess) -> None:
    assert completed.returncode >= 0, f"prepare_model.py died by signal {-completed.returncode}"
    assert completed.returncode == 0, completed.stderr[-4000:]


@pytest.fixture(scope="module")
def prepared(hub, tmp_path_factory):
    """WHEN prepare_model.py prepares microsoft/phi-2 from it in both formats, then verifies each output."""
    server, _ = hub
    base = tmp_path_factory.mktemp("prepared")
    outputs = {}
    for fmt in ("safetensors", "int8"):
        out = base / fmt
        server.requests.clear()
        assert_ran(prepare(server, out, fmt))
        requests = list(server.requests)
        verified = subprocess.run(
            [sys.executable, str(PREPARE), "microsoft/phi-2", "--out", str(out), "--verify"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert_ran(verified)
        outputs[fmt] = (out, requests)
    return outputs


def test_the_checkpoint_is_downloaded_at_the_pinned_revision_and_only_the_files_preparation_needs(prepared):
    _, requests = prepared["int8"]
    paths = {path for _, path in requests}
    # THEN the tree listing was asked at the pinned commit, and every file came from that commit
    assert f"/api/models/microsoft/phi-2/tree/{hub_standin.PINNED}" in paths
    resolved = {p.rsplit("/", 1)[1] for p in paths if "/resolve/" in p}
    assert all(f"/resolve/{hub_standin.PINNED}/" in p for p in paths if "/resolve/" in p)
    # AND the weights came from the "CDN" the Hub redirected to, the README and LICENSE were never fetched
    assert {p.rsplit("/", 1)[1] for method, p in requests if method == "CDN GET"} == set(hub_standin.SHARDS)
    assert set(hub_standin.SHARDS) | {"config.json", "model.safetensors.index.json"} <= resolved
    assert not resolved & set(hub_standin.EXTRA_FILES)


def test_both_formats_record_the_hub_source_and_pinned_revision(prepared):
    for fmt, (out, _) in prepared.items():
        manifest = read_manifest(out)
        assert (manifest.model_id, manifest.source, manifest.revision) == ("microsoft/phi-2", "hub", hub_standin.PINNED)
        assert manifest.format == fmt
        assert manifest.dtype == ("bfloat16" if fmt == "safetensors" else "float32")


def test_int8_is_quantized_from_the_fp16_values_not_from_a_bf16_rounding(hub, prepared):
    _, stored = hub
    out, _ = prepared["int8"]
    written = load_file(out / quantization.WEIGHTS_FILE)
    linears = json.loads((out / quantization.QUANTIZATION_FILE).read_text())["linears"]
    assert "lm_head" in linears
    rounded_through_bf16 = 0
    for name in linears:
        fp16 = stored[f"{name}.weight"]
        q, scale = quantization.quantize_weight(fp16)
        # THEN int8 weights and scales are exactly those of the fp16 values
        assert torch.equal(written[f"{name}.weight"], q) and torch.equal(written[f"{name}.scale"], scale), name
        assert torch.equal(written[f"{name}.bias"], stored[f"{name}.bias"].float()), name
        bf16_q, _ = quantization.quantize_weight(fp16.to(torch.bfloat16))
        rounded_through_bf16 += int((bf16_q != q).sum())
    # (and they differ from what a bf16 rounding first would have given: the check can tell them apart)
    assert rounded_through_bf16 > 0
    # AND norms are the fp16 values widened exactly, the embedding their one rounding to bf16
    for name in ("model.final_layernorm.weight", "model.layers.0.input_layernorm.bias"):
        assert torch.equal(written[name], stored[name].float())
    embedding = "model.embed_tokens.weight"
    assert torch.equal(written[embedding], stored[embedding].to(torch.bfloat16))


def test_the_prepared_int8_file_is_64_byte_aligned(prepared):
    out, _ = prepared["int8"]
    assert misaligned(out / quantization.WEIGHTS_FILE, 64) == []
    assert quantization.layout_problem(out) is None


def test_the_int8_output_keeps_phi2s_generation_config(prepared):
    out, _ = prepared["int8"]
    generator = TransformersGenerator.load(out, warmup=False)
    assert generator.model.generation_config.eos_token_id == 50256
    assert generator.model.generation_config.bos_token_id == 50256


@pytest.mark.parametrize("fmt", ["safetensors", "int8"])
def test_the_function_loads_each_prepared_format_and_generates(prepared, fmt):
    out, _ = prepared[fmt]
    # WHEN the function's loader loads the output and generates greedily
    generator = TransformersGenerator.load(out, warmup=False)
    result = generator.generate(
        ["The capital of France is"], GenerationParams(max_new_tokens=4, do_sample=False), time.monotonic() + 60
    )
    # THEN it is Phi-2's architecture in the format asked for, and it produced tokens
    config = generator.model.config
    assert type(generator.model).__name__ == "PhiForCausalLM" and config.rope_parameters["partial_rotary_factor"] == 0.4
    assert len(generator.tokenizer) == 50295
    completion = result.completions[0]
    assert completion.prompt_tokens == 5
    assert 1 <= completion.generated_tokens <= 4 or completion.finish_reason == "eos_token"
    expected = quantization.Int8Linear if fmt == "int8" else torch.nn.Linear
    assert isinstance(generator.model.lm_head, expected)
    if fmt == "safetensors":
        assert generator.model.lm_head.weight.dtype == torch.bfloat16


def test_a_revision_other_than_the_pinned_one_is_refused_by_the_hub_and_nothing_is_written(hub, tmp_path):
    server, _ = hub
    out = tmp_path / "model"
    completed = prepare(server, out, "int8", revision=WRONG_REVISION)
    assert completed.returncode > 0
    assert "RevisionNotFound" in completed.stderr or "Invalid rev id" in completed.stderr
    assert not out.exists()


def test_a_weight_file_that_does_not_match_the_hubs_sha256_fails_the_preparation(hub, tmp_path):
    server, _ = hub
    server.tampered.add(hub_standin.SHARDS[1])
    try:
        completed = prepare(server, tmp_path / "model", "int8")
    finally:
        server.tampered.clear()
    assert completed.returncode > 0
    assert "do not match the hub's hashes" in completed.stderr and hub_standin.SHARDS[1] in completed.stderr
    assert not (tmp_path / "model").exists()
