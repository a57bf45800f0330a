"""The int8 serving format: quantized at preparation, adopted as stored at load, close to full precision."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from phi2 import quantization
from phi2.generator import GenerationParams
from phi2.hf_generator import TransformersGenerator
from phi2.model_files import read_manifest

GREEDY = GenerationParams(max_new_tokens=8, do_sample=False)


def test_per_channel_int8_round_trips_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(64, 32) * torch.linspace(0.01, 3, 64)[:, None]  # rows of very different ranges
    q, scale = quantization.quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (64,)
    error = (q.float() * scale.float()[:, None] - weight).abs()
    assert (error <= scale.float()[:, None] * 0.51 + 1e-6).all()


@pytest.mark.parametrize("rows", [1, 3, quantization.DECODE_ROWS + 1, 64])
def test_int8_linear_matches_the_dequantized_layer_on_both_paths(rows):
    # GIVEN a layer quantized from a float one
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 128)
    layer = quantization.Int8Linear(256, 128, bias=True)
    layer.weight, layer.scale = quantization.quantize_weight(dense.weight.detach())
    layer.bias = dense.bias.detach().float()
    reference_weight = layer.weight.float() * layer.scale.float()[:, None]
    x = torch.randn(rows, 256)
    # WHEN it runs decode-sized (int8 kernel) or prefill-sized (de-quantized GEMM) inputs
    y = layer(x)
    # THEN it agrees with the de-quantized weight (bf16 activations on the int8 path cost ~3 digits)
    expected = F.linear(x, reference_weight, layer.bias)
    assert y.dtype == torch.float32 and y.shape == (rows, 128)
    assert torch.allclose(y, expected, rtol=2e-2, atol=2e-2)


def test_prepared_int8_model_is_int8_on_disk_and_loads_without_full_precision_copies(tiny_phi_int8_dir):
    # GIVEN the tiny Phi-2 prepared in the int8 format
    manifest = read_manifest(tiny_phi_int8_dir)
    assert (manifest.format, manifest.dtype) == ("int8", "float32")
    linears = json.loads((tiny_phi_int8_dir / quantization.QUANTIZATION_FILE).read_text())["linears"]
    assert "lm_head" in linears and any(name.endswith("fc1") for name in linears)
    # WHEN the function's loader loads it
    generator = TransformersGenerator.load(tiny_phi_int8_dir, warmup=False)
    model = generator.model
    # THEN every linear layer is int8, the embedding bf16, and nothing was left on the meta device
    assert all(isinstance(model.get_submodule(name), quantization.Int8Linear) for name in linears)
    assert not [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(model.get_input_embeddings(), quantization.Bf16Embedding)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert generator.info.dtype == "int8 weights, float32 compute"
    # AND it generates, batched or not, with the same text for the same prompt
    alone = generator.generate(["Hello world"], GREEDY, time.monotonic() + 60).completions[0]
    batch = generator.generate(["Hello world", "A longer second prompt"], GREEDY, time.monotonic() + 60)
    assert alone.generated_tokens == 8 and batch.completions[0].text == alone.text


def test_int8_is_a_quarter_of_fp32_on_disk(tiny_phi_dir, tiny_phi_int8_dir):
    def weights(directory):
        return (directory / "model.safetensors").stat().st_size

    # the tiny model is mostly embedding (kept bf16): the ratio is about 0.38; for Phi-2 it is about 0.27
    assert weights(tiny_phi_int8_dir) < 0.45 * weights(tiny_phi_dir)


@pytest.mark.slow
def test_int8_smollm2_still_knows_the_capital_of_france(smollm2_int8_dir):
    generator = TransformersGenerator.load(smollm2_int8_dir)
    result = generator.generate(["The capital of France is"], GREEDY, time.monotonic() + 120).completions[0]
    assert "Paris" in result.text
