"""The int8 serving format: quantized at preparation, adopted as stored at load, close to full precision.

The int8 kernel's AVX-512 path (torch._weight_int8pack_mm) faults with 4 or more rows on operands that do
not start on a 64-byte boundary; an AVX2 CPU never shows it. So the layout is asserted here on any CPU:
every tensor 64-byte aligned in the prepared file and, adopted without a copy, in memory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace

import prepare_model
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from mapped import inside, mappings_of
from safetensors.torch import load_file, save_file

from phi2.engine import quantization
from phi2.engine.aligned_safetensors import load_aligned, misaligned, save_aligned
from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
from phi2.engine.model_files import MANIFEST_NAME, describe_files, read_manifest
from phi2.errors import ModelLoadError

GREEDY = GenerationParams(max_new_tokens=8, do_sample=False)


def rewrite_manifest(directory) -> None:
    """After a test edits a copy of a prepared directory: the manifest describes the edited files."""
    manifest = replace(read_manifest(directory), files=describe_files(directory))
    (directory / MANIFEST_NAME).write_text(manifest.to_json())


def test_per_channel_int8_round_trips_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(64, 32) * torch.linspace(0.01, 3, 64)[:, None]  # rows of very different ranges
    q, scale = quantization.quantize_weight(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (64,)
    error = (q.float() * scale.float()[:, None] - weight).abs()
    assert (error <= scale.float()[:, None] * 0.51 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantizing_in_row_chunks_is_exact_and_leaves_the_weight_untouched(dtype):
    torch.manual_seed(0)
    weight = (torch.randn(300, 48) * torch.linspace(0.01, 3, 300)[:, None]).to(dtype)
    before = weight.clone()
    chunked = quantization.quantize_weight(weight, rows_per_chunk=7)
    whole = quantization.quantize_weight(weight, rows_per_chunk=300)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    assert torch.equal(weight, before)


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
    assert layer.weight.data_ptr() % 64 == 0 and layer.scale.data_ptr() % 64 == 0  # fresh allocations
    # WHEN it runs decode-sized (int8 kernel) or prefill-sized (widened fp32 GEMM) inputs
    y = layer(x)
    # THEN it agrees with the de-quantized weight (bf16 activations on the int8 path cost ~3 digits)
    expected = F.linear(x, reference_weight, layer.bias)
    assert y.dtype == torch.float32 and y.shape == (rows, 128)
    assert torch.allclose(y, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("shape", [(128, 256), (3000, 256), (40, 5000), (3, 2**22 + 1)])
def test_the_long_prompt_path_widens_block_by_block_and_matches_the_dequantized_layer(shape):
    # GIVEN int8 layers of shapes that fit the widening buffer whole, in several blocks of rows (with a
    # partial last one), in blocks of a single row, and with rows wider than the buffer
    torch.manual_seed(0)
    rows, columns = shape
    weight = torch.randint(-127, 128, shape, dtype=torch.int8)
    scale = torch.rand(rows).bfloat16()
    x = torch.randn(2, 3, columns)
    # WHEN a prefill-sized input goes through the widened path
    y = quantization.widened_linear(x, weight, scale)
    # THEN it is the de-quantized layer's output (fp32 all the way: only the order of rounding differs)
    expected = F.linear(x, weight.float() * scale.float()[:, None])
    assert y.shape == (2, 3, rows)
    assert torch.allclose(y, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_the_widening_buffer_serves_inside_and_outside_inference_mode_whichever_came_first():
    # GIVEN a thread whose first long prompt ran under inference_mode (as generate runs), then one that did not
    weight = torch.randint(-127, 128, (128, 256), dtype=torch.int8)
    scale = torch.rand(128).bfloat16()
    x = torch.randn(quantization.DECODE_ROWS + 1, 256)
    expected = F.linear(x, weight.float() * scale.float()[:, None])

    def first_in(modes: list[bool]) -> list[torch.Tensor]:
        outputs = []
        for inference in modes:
            with torch.inference_mode(inference):
                outputs.append(quantization.widened_linear(x, weight, scale))
        return outputs

    for modes in ([True, False], [False, True]):
        thread_outputs: list[torch.Tensor] = []
        # a fresh thread: a fresh buffer, created in the first mode
        worker = threading.Thread(target=lambda m=modes, out=thread_outputs: out.extend(first_in(m)))
        worker.start()
        worker.join()
        # THEN both calls answered, in either order
        assert len(thread_outputs) == 2, f"a call failed after one under inference_mode={modes[0]}"
        for output in thread_outputs:
            assert torch.allclose(output, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_layers_take_turns_in_one_widening_buffer_and_each_gets_its_own_weights():
    # GIVEN two int8 layers of the same shape (as Phi-2's 32 blocks are), quantized from different weights
    torch.manual_seed(0)
    layers, references = [], []
    for _ in range(2):
        dense = torch.nn.Linear(256, 128, bias=False)
        layer = quantization.Int8Linear(256, 128, bias=False)
        layer.weight, layer.scale = quantization.quantize_weight(dense.weight.detach())
        layers.append(layer)
        references.append(layer.weight.float() * layer.scale.float()[:, None])
    x = torch.randn(quantization.DECODE_ROWS + 1, 256)
    # WHEN prefill-sized inputs go through them alternately
    outputs = [layer(x) for layer in (*layers, *layers)]
    # THEN each output is its own layer's: nothing of the other layer's weights is left in the shared buffer
    for output, reference in zip(outputs, [*references, *references], strict=True):
        assert torch.allclose(output, F.linear(x, reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [4, 5, 16, quantization.DECODE_ROWS])
def test_the_int8_kernel_takes_4_or_more_rows_from_weights_adopted_from_an_aligned_file(tmp_path, rows):
    # GIVEN a layer's int8 weight, scales and bias written to an aligned file and adopted from its mapping
    torch.manual_seed(0)
    dense = torch.nn.Linear(576, 200)
    q, scale = quantization.quantize_weight(dense.weight.detach())
    # A 40-byte tensor first: with safetensors' own 8-byte layout the weight would then sit at 40 mod 64.
    tensors = {"first": torch.zeros(10), "weight": q, "scale": scale, "bias": dense.bias.detach().float()}
    save_aligned(tensors, tmp_path / "layer.safetensors")
    adopted = load_aligned(tmp_path / "layer.safetensors")
    layer = quantization.Int8Linear(576, 200, bias=True)
    layer.weight, layer.scale, layer.bias = adopted["weight"], adopted["scale"], adopted["bias"]
    # THEN the kernel's operands start on 64-byte boundaries: the assumption of its AVX-512 path, made explicit
    assert layer.weight.data_ptr() % 64 == 0 and layer.scale.data_ptr() % 64 == 0
    # WHEN 4 or more rows go through the int8 kernel (the case that faulted on AVX-512 with misaligned weights)
    x = torch.randn(rows, 576)
    y = layer(x)
    # THEN it agrees with the de-quantized layer
    expected = F.linear(x, q.float() * scale.float()[:, None], layer.bias)
    assert torch.allclose(y, expected, rtol=2e-2, atol=2e-2)


def test_the_prepared_int8_files_data_offsets_are_all_64_byte_aligned(tiny_phi_int8_dir):
    path = tiny_phi_int8_dir / quantization.WEIGHTS_FILE
    assert misaligned(path, 64) == []
    assert json.loads((tiny_phi_int8_dir / quantization.QUANTIZATION_FILE).read_text())["alignment"] == 64


def test_every_tensor_of_the_loaded_int8_model_lies_inside_the_mapped_file_on_a_64_byte_boundary(tiny_phi_int8_dir):
    # GIVEN the tiny Phi-2 in the int8 format WHEN the function's loader loads it
    path = tiny_phi_int8_dir / quantization.WEIGHTS_FILE
    generator = TransformersGenerator.load(tiny_phi_int8_dir, warmup=False)
    stored = {name for name in load_file(path) if not name.startswith("__pad__")}
    model_tensors = dict(generator.model.state_dict(keep_vars=True))
    assert stored <= set(model_tensors)
    # THEN every tensor that came from the file is a view into its mapping (no copy) and 64-byte aligned
    ranges = mappings_of(path)
    assert ranges
    for name in stored:
        tensor = model_tensors[name]
        assert inside(tensor, ranges), f"{name} was copied out of the file"
        assert tensor.data_ptr() % 64 == 0, name


def test_an_int8_directory_prepared_before_the_aligned_layout_is_refused_and_prepared_again(
    tiny_phi_int8_dir, tmp_path
):
    # GIVEN an int8 directory in the old layout: safetensors' own writer, no layout version
    old = tmp_path / "old"
    shutil.copytree(tiny_phi_int8_dir, old)
    tensors = {
        k: v.clone() for k, v in load_file(old / quantization.WEIGHTS_FILE).items() if not k.startswith("__pad__")
    }
    save_file(tensors, old / quantization.WEIGHTS_FILE, metadata={"format": "int8"})
    info = json.loads((old / quantization.QUANTIZATION_FILE).read_text())
    info.pop("layout_version"), info.pop("alignment")
    (old / quantization.QUANTIZATION_FILE).write_text(json.dumps(info))
    rewrite_manifest(old)
    # WHEN the function loads it THEN it is refused with the command that fixes it, not copied
    with pytest.raises(ModelLoadError, match=r"Prepare them again.*--force"):
        TransformersGenerator.load(old, warmup=False)
    # AND prepare_model.py does not take it for a complete output
    wanted = ("tiny-random-phi", "seed-0", "float32", "int8")
    assert not prepare_model.is_complete(old, wanted, checksums=False)
    assert prepare_model.is_complete(tiny_phi_int8_dir, wanted, checksums=False)


def test_the_int8_loader_reads_generation_config_json(tiny_phi_int8_dir, tmp_path):
    # GIVEN an int8 directory whose generation_config.json says something the model config does not
    copy = tmp_path / "model"
    shutil.copytree(tiny_phi_int8_dir, copy)
    path = copy / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": [50256, 198], "max_length": 77}))
    rewrite_manifest(copy)
    # WHEN it is loaded THEN the model carries that generation config, as transformers' own loader does
    generator = TransformersGenerator.load(copy, warmup=False)
    assert generator.model.generation_config.eos_token_id == [50256, 198]
    assert generator.model.generation_config.max_length == 77
    assert 198 in generator.eos_ids


def test_kernels_in_use_say_what_runs_on_the_int8_model(tiny_phi_int8_dir):
    generator = TransformersGenerator.load(tiny_phi_int8_dir, warmup=False)
    kernels = json.loads(json.dumps(quantization.kernels_in_use(generator.model)))
    linears = json.loads((tiny_phi_int8_dir / quantization.QUANTIZATION_FILE).read_text())["linears"]
    int8 = kernels["int8_linears"]
    assert int8["count"] == len(linears) and int8["row_threshold"] == quantization.DECODE_ROWS
    assert "_weight_int8pack_mm" in int8["up_to_threshold"] and "bf16 activations" in int8["up_to_threshold"]
    assert int8["above_threshold"] == "weight widened to fp32, fp32 GEMM, output scaled per channel"
    assert kernels["lm_head"] == "int8, as int8_linears, fp32 bias"  # Phi-2's head: untied, with a bias
    assert kernels["embedding"] == "bf16 table, rows widened to fp32"
    assert kernels["int8_operands_64_byte_aligned"] is True


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


PEAK_RSS = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

from phi2.engine.generator import GenerationParams
from phi2.engine.hf_generator import TransformersGenerator
before = {field: status(field) for field in ("VmRSS", "RssAnon", "RssFile")}
generator = TransformersGenerator.load(Path(sys.argv[1]))
params = GenerationParams(max_new_tokens=8, do_sample=False)
generator.generate(["The capital of France is"], params, time.monotonic() + 120)
print(json.dumps({
    "peak_growth": status("VmHWM") - before["VmRSS"],
    "anon_growth": status("RssAnon") - before["RssAnon"],
    "file_growth": status("RssFile") - before["RssFile"],
}))
"""


@pytest.mark.slow
def test_int8_smollm2_serves_its_weights_from_the_mapped_file_and_peaks_at_todays_level(smollm2_int8_dir):
    # GIVEN a fresh process that has imported the function (torch, transformers)
    weights = (smollm2_int8_dir / quantization.WEIGHTS_FILE).stat().st_size
    # WHEN it loads the int8 SmolLM2 (warm-up included) and generates once
    completed = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(smollm2_int8_dir), str(ROOT / "function")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode >= 0, f"died by signal {-completed.returncode}"
    assert completed.returncode == 0, completed.stderr[-3000:]
    grew = json.loads(completed.stdout.strip().splitlines()[-1])
    mib = {k: f"{v / 2**20:.0f} MiB" for k, v in grew.items()} | {"file": f"{weights / 2**20:.0f} MiB"}
    # THEN the weights are resident as pages of the mapped file, not as anonymous copies: measured on a 2-vCPU
    # EPYC, file-backed +230 MiB and anonymous +128 MiB for the 210 MiB file; cloning the tensors at load
    # instead gave file-backed +20 MiB and anonymous +322 MiB
    assert grew["file_growth"] > 0.9 * weights, mib
    assert grew["anon_growth"] < weights, mib
    # AND the peak stays at the level of the unaligned layout before it (+356 MiB; cloning: +536 MiB)
    assert grew["peak_growth"] < 2 * weights, mib


@pytest.mark.slow
def test_int8_smollm2_still_knows_the_capital_of_france(smollm2_int8_dir):
    generator = TransformersGenerator.load(smollm2_int8_dir)
    result = generator.generate(["The capital of France is"], GREEDY, time.monotonic() + 120).completions[0]
    assert "Paris" in result.text
