"""The 4-bit formats (int4, int4-mixed): packing, rounding, both paths of a layer against its de-quantized weight,
and prepared models that load without copies and generate."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import prepared_model
from mapped import inside, mappings_of
from safetensors.torch import load_file

from phi2.engine import formats, kernels
from phi2.engine.aligned_safetensors import misaligned
from phi2.engine.formats import common, int4, int8
from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.engine.model_files import read_manifest

GREEDY = GenerationParams(max_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module")
def tiny_phi_int4_dir():
    return prepared_model("tiny-phi", "int4")


@pytest.fixture(scope="module")
def tiny_phi_int4_mixed_dir():
    return prepared_model("tiny-phi", "int4-mixed")


def test_packing_puts_column_j_in_the_low_and_column_32_plus_j_in_the_high_nibble_of_byte_j():
    q = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = int4.pack(q)
    assert packed.shape == (3, 64) and packed.dtype == torch.uint8
    for unit in range(2):
        for j in range(32):
            byte = packed[:, unit * 32 + j]
            assert torch.equal(byte & 15, q[:, unit * 64 + j]) and torch.equal(byte >> 4, q[:, unit * 64 + 32 + j])
    assert torch.equal(int4.unpack(packed), q)


@pytest.mark.parametrize("group", int4.GROUPS)
def test_the_rounding_search_is_never_worse_than_min_max_rounding_and_stays_in_fp16(group):
    # GIVEN rows of very different ranges, with outliers
    torch.manual_seed(0)
    weight = torch.randn(96, 512) * torch.linspace(0.01, 2, 96)[:, None]
    weight[::7, ::13] *= 8
    packed, scales, mins = int4.quantize_weight(weight, group, rows_per_chunk=40)
    assert scales.dtype == mins.dtype == torch.float16 and scales.shape == (96, 512 // group)
    # WHEN de-quantized
    error = (int4.dequantize(packed, scales, mins) - weight).reshape(96, -1, group).pow(2).sum(-1)
    # THEN each group's squared error is at most that of plain min/max rounding (the search starts from it)
    w = weight.reshape(96, -1, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    s, m = ((high - low) / 15).half().float(), low.half().float()
    plain = (((w - m) / s).round().clamp(0, 15) * s + m - w).pow(2).sum(-1)
    assert (error <= plain * (1 + 1e-5) + 1e-12).all()
    assert error.sum() < 0.9 * plain.sum()  # and better overall (measured: 14 % less at groups of 128)


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32-gemm", "bf16-gemm"])
def prompt_gemm(request, monkeypatch) -> torch.dtype:
    monkeypatch.setattr(common, "prompt_dtype", lambda: request.param)
    return request.param


def int4_layer(weight: torch.Tensor, bias: torch.Tensor | None, group: int) -> int4.Int4Linear:
    layer = int4.Int4Linear(weight.shape[1], weight.shape[0], bias is not None, group)
    layer.packed, layer.scales, layer.mins = int4.quantize_weight(weight, group)
    layer.bias = bias
    return layer


def bound_of(path, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The largest error each output may have against x @ w.T, from the path's numerics: the kernel rounds x to
    int8 per 64 columns (half a step: max|x| of the block / 254), a bf16 GEMM rounds x, w and the output to 8
    bits (2^-8 relative, each), an fp32 GEMM only its sums."""
    magnitude = x.abs().double() @ w.abs().double().T
    if path == "kernel":
        blocks = x.reshape(x.shape[0], -1, 64)
        half_step = (blocks.abs().amax(-1, keepdim=True) / 254).expand_as(blocks).reshape(x.shape)
        return half_step.double() @ w.abs().double().T + 1e-5 * magnitude + 1e-6
    return magnitude * (2**-7 if path == torch.bfloat16 else 1e-5) + 1e-6


@pytest.mark.parametrize("group", int4.GROUPS)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_int4_linear_matches_its_dequantized_weight_on_every_path(rows, group, prompt_gemm):
    torch.manual_seed(rows + group)
    dense = torch.nn.Linear(384, 100)
    layer = int4_layer(dense.weight.detach(), dense.bias.detach(), group)
    w = int4.dequantize(layer.packed, layer.scales, layer.mins)
    x = torch.randn(rows, 384) * torch.rand(384) * 3
    y = layer(x)
    path = "kernel" if kernels.library() is not None and rows <= int4.KERNEL_ROWS[prompt_gemm] else prompt_gemm
    expected = x.double() @ w.double().T + layer.bias.double()
    assert y.shape == (rows, 100) and y.dtype == torch.float32
    assert ((y.double() - expected).abs() <= bound_of(path, x, w)).all()


def test_without_the_library_int4_layers_fall_back_to_torch_ops(monkeypatch):
    monkeypatch.setattr(kernels, "library", lambda: None)
    monkeypatch.setattr(common, "prompt_dtype", lambda: torch.float32)
    torch.manual_seed(0)
    layer = int4_layer(torch.randn(64, 256), None, 64)
    x = torch.randn(3, 256)
    w = int4.dequantize(layer.packed, layer.scales, layer.mins)
    assert ((layer(x).double() - x.double() @ w.double().T).abs() <= bound_of(torch.float32, x, w)).all()
    assert int4.describe([layer])["up_to_threshold"].startswith("weight de-quantized with torch ops")


def test_the_formats_plan_says_which_layers_are_4_bit():
    from transformers import PhiConfig, PhiForCausalLM

    sizes = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = PhiConfig(vocab_size=512, **sizes)
    with torch.device("meta"):
        model = PhiForCausalLM(config)
    pure, mixed = int4.plan(model, "int4"), int4.plan(model, "int4-mixed")
    assert pure["lm_head"] == mixed["lm_head"] == "int8"
    assert all(kind == "int4" for name, kind in pure.items() if name != "lm_head")
    assert {name for name, kind in mixed.items() if kind == "int4"} == {n for n in mixed if ".mlp." in n}


@pytest.mark.parametrize("fmt", int4.FORMATS)
def test_a_prepared_4_bit_model_is_aligned_adopted_without_copies_and_generates(
    fmt, tiny_phi_int4_dir, tiny_phi_int4_mixed_dir
):
    directory = tiny_phi_int4_dir if fmt == "int4" else tiny_phi_int4_mixed_dir
    manifest = read_manifest(directory)
    assert (manifest.format, manifest.dtype) == (fmt, "float32")
    path = directory / common.WEIGHTS_FILE
    assert misaligned(path, 64) == [] and formats.layout_problem(directory, fmt) is None
    info = json.loads((directory / common.QUANTIZATION_FILE).read_text())
    assert info["int8_linears"] and all(group in int4.GROUPS for group in info["int4_groups"].values())
    # WHEN the function's loader loads it
    generator = TransformersGenerator.load(directory, warmup=False)
    model = generator.model
    # THEN each layer is in the precision the plan gave it, and every stored tensor is a view of the mapping
    for name in info["int4_groups"]:
        assert isinstance(model.get_submodule(name), int4.Int4Linear)
    for name in info["int8_linears"]:
        assert isinstance(model.get_submodule(name), int8.Int8Linear)
    tensors = dict(model.state_dict(keep_vars=True))
    ranges = mappings_of(path)
    for name in (n for n in load_file(path) if not n.startswith("__pad__")):
        assert inside(tensors[name], ranges), f"{name} was copied out of the file"
        assert tensors[name].data_ptr() % 64 == 0, name
    described = generator.info.kernels
    assert described["int4_linears"]["count"] == len(info["int4_groups"])
    assert described["quantized_operands_64_byte_aligned"] is True
    assert generator.info.dtype == f"{fmt} weights, float32 compute"
    # AND it generates, alone and in a batch, the same text for the same prompt
    alone = generator.generate(["Hello world"], GREEDY, time.monotonic() + 60).completions[0]
    batch = generator.generate(["Hello world", "A longer second prompt"], GREEDY, time.monotonic() + 60)
    assert alone.generated_tokens == 8 and batch.completions[0].text == alone.text


def test_int4_is_smaller_than_int8_on_disk(tiny_phi_int4_dir, tiny_phi_int8_dir):
    def linears(directory) -> int:
        tensors = load_file(directory / common.WEIGHTS_FILE)
        return sum(t.numel() * t.element_size() for n, t in tensors.items() if ".mlp." in n or "self_attn" in n)

    # the tiny model's linear layers: 4-bit weights + fp16 scale and minimum per 64 columns vs int8 + bf16 scale
    assert linears(tiny_phi_int4_dir) < 0.65 * linears(tiny_phi_int8_dir)
