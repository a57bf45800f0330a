"""What the quantized formats share: their files, the model skeleton, adoption without copies, the prompt path.

Files: one safetensors file written by `aligned_safetensors.save_aligned` (every tensor 64-byte aligned: no
misaligned operand ever reaches a kernel, and none is copied at load), config.json, generation_config.json and
quantization.json (format, layout version, scheme, the quantized layers). Loading builds the model skeleton on
the meta device and adopts the memory-mapped tensors as they are: pages are read from disk as the warm-up
pass touches them, and the weights are never copied.

Two ways to run a quantized linear layer, chosen per call by its rows (tokens x batch):
- up to the format's kernel threshold (decode, short prompts): our kernels (engine/kernels), which stream the
  quantized weights once per call;
- above it (long prompts): the weight widened, a block of rows at a time, into one reused per-thread buffer,
  and one GEMM on the CPU's fastest units: bf16 where oneDNN runs bf16 natively (AVX512-BF16 or AMX;
  `cpu.bf16_gemm()`), fp32 elsewhere. The buffer (WIDEN_BLOCK_BYTES) is the only memory the widening adds,
  and it counts in the resident set like everything else.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from phi2.engine import cpu
from phi2.engine.aligned_safetensors import ALIGNMENT, MisalignedFileError, load_aligned, misaligned, save_aligned

WEIGHTS_FILE = "model.safetensors"
QUANTIZATION_FILE = "quantization.json"
# PHI2_PROMPT_GEMM=fp32|bf16 overrides the prompt path's GEMM (tests, the bench); unset: cpu.bf16_gemm().
PROMPT_GEMM_VARIABLE = "PHI2_PROMPT_GEMM"
# PHI2_KERNEL_MAX_ROWS=N moves every format's kernel threshold to N rows (the quality gate runs the decode
# kernel over whole sequences with it; tests force one path or the other).
KERNEL_ROWS_VARIABLE = "PHI2_KERNEL_MAX_ROWS"

# Long prompts widen a block of output rows at a time into one buffer per thread of this many bytes, reused by
# every block of every layer: fresh tensors of a layer's size cost a page fault per 4 kB on every layer of every
# pass, and a whole widened fc1 would be 105 MB in fp32. Measured on Phi-2's layers (512 rows, 2 threads,
# AVX2): as fast as whole-layer buffers, 0.14 GiB less peak memory; 16 MB blocks split the attention layers
# and cost 16 % more.
WIDEN_BLOCK_BYTES = 32 * 2**20
_scratch = threading.local()


@functools.cache
def prompt_dtype() -> torch.dtype:
    """The dtype of the prompt path's GEMM: bf16 where oneDNN runs it natively, fp32 elsewhere."""
    setting = os.environ.get(PROMPT_GEMM_VARIABLE, "").strip().lower()
    if setting in ("fp32", "float32"):
        return torch.float32
    if setting in ("bf16", "bfloat16"):
        return torch.bfloat16
    return torch.bfloat16 if cpu.bf16_gemm() else torch.float32


def kernel_rows(default: int) -> int:
    """The row threshold of a format (its measured `default`, unless PHI2_KERNEL_MAX_ROWS says otherwise)."""
    value = os.environ.get(KERNEL_ROWS_VARIABLE, "").strip()
    return int(value) if value.isdigit() else default


def _buffer(dtype: torch.dtype) -> torch.Tensor:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None:
        # A normal tensor even when the first long prompt runs under inference_mode (generate does): an
        # inference tensor could never again be written outside it.
        with torch.inference_mode(False):
            buffer = _scratch.buffer = torch.empty(WIDEN_BLOCK_BYTES, dtype=torch.uint8)
    return buffer.view(dtype)


def widened_linear(
    x: torch.Tensor,
    rows: int,
    columns: int,
    widen: Callable[[torch.Tensor, int, int], None],
    *,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T (x scale per output) + bias` in fp32 out, W widened block by block by `widen(block, first, last)`
    (which fills `block` with rows first..last of W in `dtype`) into the thread's buffer, one GEMM per block.

    In fp32 the bias is fused into each block's GEMM when there is no `scale` to apply after it; a bf16 GEMM
    rounds its output to bf16, so the scale and the bias are applied to the fp32 output in place."""
    buffer = _buffer(dtype)
    step = max(1, min(rows, buffer.numel() // columns))
    if step * columns > buffer.numel():  # a single row wider than the buffer: widen it afresh
        whole = torch.empty(rows, columns, dtype=dtype)
        widen(whole, 0, rows)
        y = F.linear(x.to(dtype), whole).float()
        y = y * scale.float() if scale is not None else y
        return y + bias if bias is not None else y
    xc = x.to(dtype)
    fused = dtype == torch.float32 and scale is None
    out = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        block = buffer[: (last - first) * columns].view(last - first, columns)
        widen(block, first, last)
        out[..., first:last] = F.linear(xc, block, bias[first:last] if fused and bias is not None else None)
    if scale is not None:
        out.mul_(scale.float())
    if bias is not None and not fused:
        out.add_(bias)
    return out


class Bf16Embedding(nn.Embedding):
    """An embedding stored in bf16 (half of fp32's memory) that hands fp32 vectors to the model."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).float()


def tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers to quantize: every one, except an lm_head tied to the embedding."""
    is_tied = tied(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (is_tied and name.endswith("lm_head"))
    ]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def other_tensors(model: nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """The tensors of every module that is not quantized: norms and biases in fp32 (exactly), an untied
    embedding rounded once, to bf16; a tied head is left out (tie_weights() restores it at load)."""
    embedding = model.get_input_embeddings()
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name in quantized:
            continue
        if module is embedding and not tied(model):
            tensors[f"{name}.weight"] = module.weight.detach().to(torch.bfloat16)
        elif tied(model) and module is model.get_output_embeddings():
            continue
        else:
            for key, tensor in module.named_parameters(recurse=False):
                tensors[f"{name}.{key}" if name else key] = tensor.detach().float()
    return tensors


def build_skeleton(config, layers: dict[str, Callable[[nn.Linear], nn.Module]]) -> nn.Module:
    """The model on the meta device (no memory), each named linear replaced by what its factory makes of it,
    and an untied embedding in bf16."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        for name, make in layers.items():
            set_module(model, name, make(model.get_submodule(name)))
        if not tied(model):  # a tied embedding is also the fp32 lm_head: it stays fp32
            embedding = model.get_input_embeddings()
            model.set_input_embeddings(
                Bf16Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx)
            )
    return model


def adopt(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put the loaded tensors into the skeleton as they are (no copy), and rebuild what files never hold."""
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = sorted(set(missing) - ({"lm_head.weight"} if tied(model) else set()))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied(model):
        model.tie_weights()
    # Rotary frequencies are computed buffers, not weights: build them for real.
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            set_module(model, name, type(module)(config=model.config))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"tensors left unloaded: {leftover[:5]}")
    return model.eval()


def write(model: nn.Module, directory: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, object]) -> None:
    """Write a quantized format: the aligned weights file, config, generation config and quantization.json.

    Raises ValueError if the written file is not aligned (it then must not be served).
    """
    path = directory / WEIGHTS_FILE
    save_aligned({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": str(manifest["format"])})
    bad = misaligned(path, ALIGNMENT)
    if bad:
        raise ValueError(f"{path.name} was written with {len(bad)} unaligned tensors, e.g. {bad[:3]}")
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    (directory / QUANTIZATION_FILE).write_text(json.dumps({**manifest, "alignment": ALIGNMENT}))


def read_info(directory: Path) -> dict:
    return json.loads((directory / QUANTIZATION_FILE).read_text())


def layout_problem(directory: Path, layout_version: int) -> str | None:
    """Why the files in `directory` cannot be served as they are (None: they can). Reads headers only."""
    try:
        info = read_info(directory)
    except (OSError, ValueError) as exc:
        return f"{QUANTIZATION_FILE} is unreadable: {exc}"
    if info.get("layout_version") != layout_version:
        return f"layout version {info.get('layout_version', 1)}, this code needs {layout_version}"
    for path in sorted(directory.glob("*.safetensors")):
        bad = misaligned(path, ALIGNMENT)
        if bad:
            return f"{path.name} has {len(bad)} tensors not on a {ALIGNMENT}-byte boundary (e.g. {bad[0]})"
    return None


def load_model(
    directory: Path, config, fmt: str, layout_version: int, layers: Callable[[dict], dict[str, Callable]]
) -> nn.Module:
    """Load a quantized format: the skeleton on meta (`layers(info)` names each quantized layer's factory),
    the memory-mapped tensors adopted as they are, the generation config from generation_config.json (as
    transformers' own loader does).

    Raises MisalignedFileError (with the command to re-prepare) for files this code cannot serve as they are.
    """
    problem = layout_problem(directory, layout_version)
    if problem:
        raise MisalignedFileError(
            f"the {fmt} files in {directory} cannot be served without copying them: {problem}. Prepare them "
            f"again: infra/prepare_model.py MODEL --format {fmt} --out {directory} --force"
        )
    model = build_skeleton(config, layers(read_info(directory)))
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_aligned(path, ALIGNMENT))
    model = adopt(model, tensors)
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
