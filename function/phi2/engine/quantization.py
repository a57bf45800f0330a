"""Weight-only int8: quantized once at preparation time, loaded directly at cold start.

Decode on a CPU is memory-bound: every new token reads every weight once. Storing the linear layers'
weights as int8 (per-output-channel symmetric scales) reads a quarter of fp32's bytes and half of
bf16's, and brings Phi-2 from ~11 GB (fp32) to ~2.8 GB. What runs (`kernels_in_use` says it at load):
- up to DECODE_ROWS rows (decode, short prompts): torch's `_weight_int8pack_mm`, int8 weights times
  **bf16 activations** (the fp32 input is rounded to bf16), fp32 out;
- above DECODE_ROWS rows (long prompts): the weight **widened to fp32** for one fp32 GEMM, its scale applied
  to the GEMM's output;
- everything else (norms, attention, biases, residuals) in fp32; the embedding table is stored in bf16.

The file is safetensors (int8 weights, bf16 scales, bf16 embedding, fp32 norms and biases): no pickle,
no ISA-specific packing, so the same file serves any x86 or ARM CPU. It is written by
`aligned_safetensors.save_aligned`: every tensor starts on a 64-byte boundary of the file, because the
AVX-512 path of `_weight_int8pack_mm` faults (SIGSEGV) on a weight or scale that does not, with 4 or more
rows. Loading builds the model skeleton on the meta device and adopts the memory-mapped tensors as they
are (no copy; pages are read from disk as the warm-up pass touches them), so in memory they are aligned
too. A file that is not aligned (written before the aligned layout) is refused at load with a message to
re-prepare it: copying it would align it at the cost of a second copy of the weights (3.7 -> 5.9 GiB for
Phi-2), which is how the int8 format would silently lose its point.

Preparation quantizes from the checkpoint's own values (Phi-2: fp16), never from a bf16 rounding of them.

An untied lm_head (Phi-2's, 51200x2560 with a bias) is int8 like the other linears, its bias fp32. Measured
on SmolLM2-135M with its head untied (issue 9): int8 head alone vs fp32, greedy agreement 0.975 and
perplexity ratio 1.0007; with the int8 body, 0.951 / 1.009 against 0.961 / 1.009 with an fp32 head; a bf16
head was no closer (0.957 / 1.010) and cost ~17 ms more per decode step on full-size Phi-2's head (AVX2).
A tied head stays the fp32 embedding.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from phi2.engine.aligned_safetensors import ALIGNMENT, MisalignedFileError, load_aligned, misaligned, save_aligned

FORMAT = "int8"
# The layout version of the int8 files: 2 = every tensor 64-byte aligned in the file (1 was safetensors'
# own 8-byte layout, which the AVX-512 int8 kernel cannot take).
LAYOUT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
QUANTIZATION_FILE = "quantization.json"
# Up to this many rows (tokens x batch) the int8 kernel is used (decode, short prompts) with bf16
# activations; above it, the weight is widened to fp32 for one fp32 GEMM (long prompts). Measured on Phi-2's
# fc1 (10240x2560), 2 threads, AVX2 EPYC: int8 kernel 1.9 / 13 / 56 / 110 ms at 1 / 16 / 64 / 128 rows,
# widen + fp32 GEMM 12 / 30 / 58 / 85 ms: they cross at about 64 rows.
DECODE_ROWS = 64


# Long prompts widen the int8 weight to fp32 a block of output rows at a time, into one buffer per thread
# of this many elements (32 MB), reused by every block of every layer: a whole widened fc1 would be 105 MB,
# and fresh tensors of that size cost a page fault per 4 kB on every layer of every pass. Measured on
# Phi-2's layers (512 rows, 2 threads, AVX2): as fast as whole-layer buffers (749 vs 740 ms per block of
# the model), 0.14 GiB less peak memory; 16 MB blocks split the attention layers and cost 16 % more.
WIDEN_BLOCK_ELEMENTS = 8 * 2**20
_scratch = threading.local()


def widened_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x @ (weight x scale).T` in fp32, for an int8 `weight` with one scale per output row.

    The scale applies to whole output columns, so it waits for the GEMM's output and the weight only needs
    widening: one block of rows at a time, each block one fp32 GEMM."""
    rows, columns = weight.shape
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None:
        # A normal tensor even when the first long prompt runs under inference_mode (generate does): an
        # inference tensor could never again be written outside it.
        with torch.inference_mode(False):
            buffer = _scratch.buffer = torch.empty(WIDEN_BLOCK_ELEMENTS, dtype=torch.float32)
    step = max(1, min(rows, WIDEN_BLOCK_ELEMENTS // columns))
    if step * columns > buffer.numel():  # a single row wider than the buffer: widen it afresh
        return F.linear(x, weight.float()) * scale.float()
    out = x.new_empty(*x.shape[:-1], rows)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        block = buffer[: (last - first) * columns].view(last - first, columns).copy_(weight[first:last])
        out[..., first:last] = F.linear(x, block)
    return out.mul_(scale.float())


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    # The AVX-512 path of _weight_int8pack_mm assumes 64-byte aligned operands; a fresh tensor from torch's
    # CPU allocator is, a view into something else need not be.
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 with one bf16 scale per output row.

    Up to DECODE_ROWS rows: `_weight_int8pack_mm` with bf16 activations; above: the weight widened to fp32
    for an fp32 GEMM whose output is scaled.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= DECODE_ROWS:
            flat = _aligned(x.reshape(rows, self.in_features).to(torch.bfloat16))
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif x.dtype == torch.float32:
            # (A fresh 100 MB de-quantized weight per layer and pass, from a broadcast multiply, made a 512-token
            # Phi-2 pass 1.8x the fp32 model's; widening into a reused buffer costs almost nothing.)
            y = widened_linear(x, self.weight, self.scale)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        return y + self.bias if self.bias is not None else y


class Bf16Embedding(nn.Embedding):
    """An embedding stored in bf16 (half of fp32's memory) that hands fp32 vectors to the model."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).float()


def quantize_weight(weight: torch.Tensor, rows_per_chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, bf16 scale), computed in fp32 from `weight` as given.

    A few rows at a time: full-layer fp32 temporaries (105 MB for Phi-2's fc1) left the allocator's heap so
    fragmented that preparing full-size Phi-2 peaked at ~17 GB; small ones are reused and it stays low.
    """
    rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.bfloat16)
    for start in range(0, rows, rows_per_chunk):
        w = weight[start : start + rows_per_chunk].to(torch.float32, copy=True)  # never scale `weight` in place
        chunk_scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
        q[start : start + rows_per_chunk] = w.div_(chunk_scale.float()[:, None]).round_().clamp_(-127, 127)
        scale[start : start + rows_per_chunk] = chunk_scale
    return q, scale


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def _linears(model: nn.Module) -> list[str]:
    """Names of the linear layers to quantize: every one, except an lm_head tied to the embedding."""
    tied = _tied(model)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (tied and name.endswith("lm_head"))
    ]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of the int8 format for a loaded model, and the quantized layer names.

    Every value comes from the model's own tensors as loaded (Phi-2: fp16): int8 weights and their scales
    are computed in fp32 from them, norms and biases are widened to fp32 exactly, the embedding is
    rounded once, to bf16.
    """
    linears = set(_linears(model))
    embedding = model.get_input_embeddings()
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name in linears:
            q, scale = quantize_weight(module.weight.detach())
            tensors[f"{name}.weight"], tensors[f"{name}.scale"] = q, scale
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach().float()
        elif module is embedding and not _tied(model):
            tensors[f"{name}.weight"] = module.weight.detach().to(torch.bfloat16)
        elif _tied(model) and module is model.get_output_embeddings():
            continue  # the same tensor as the embedding, restored by tie_weights() at load
        else:
            for key, tensor in module.named_parameters(recurse=False):
                tensors[f"{name}.{key}" if name else key] = tensor.detach().float()
    return {k: v.contiguous() for k, v in tensors.items()}, sorted(linears)


def build_skeleton(config, linears: list[str]) -> nn.Module:
    """The model with int8 linears and a bf16 embedding, all on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for name in linears:
        linear = model.get_submodule(name)
        _set(model, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, "meta"))
    if not _tied(model):  # a tied embedding is also the fp32 lm_head: it stays fp32
        embedding = model.get_input_embeddings()
        model.set_input_embeddings(
            Bf16Embedding(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, device="meta")
        )
    return model


def adopt(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put the loaded tensors into the skeleton as they are (no copy), and rebuild what files never hold."""
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = sorted(set(missing) - ({"lm_head.weight"} if _tied(model) else set()))
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if _tied(model):
        model.tie_weights()
    # Rotary frequencies are computed buffers, not weights: build them for real.
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            _set(model, name, type(module)(config=model.config))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"tensors left unloaded: {leftover[:5]}")
    return model.eval()


def save(model: nn.Module, directory: Path) -> None:
    """Write the int8 format of a loaded model: aligned weights, config, generation config.

    Raises ValueError if the written file is not aligned (it then must not be served).
    """
    tensors, linears = quantized_state_dict(model)
    path = directory / WEIGHTS_FILE
    save_aligned(tensors, path, metadata={"format": FORMAT}, alignment=ALIGNMENT)
    del tensors
    bad = misaligned(path, ALIGNMENT)
    if bad:
        raise ValueError(f"{path.name} was written with {len(bad)} unaligned tensors, e.g. {bad[:3]}")
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    scheme = (
        "weight-only, symmetric per output channel, bf16 scales; int8 kernel with bf16 activations up to "
        f"{DECODE_ROWS} rows, fp32 GEMM of the widened weight above (output scaled); fp32 elsewhere"
    )
    manifest = {
        "format": FORMAT,
        "layout_version": LAYOUT_VERSION,
        "alignment": ALIGNMENT,
        "scheme": scheme,
        "linears": linears,
    }
    (directory / QUANTIZATION_FILE).write_text(json.dumps(manifest))


def layout_problem(directory: Path) -> str | None:
    """Why the int8 files in `directory` cannot be served as they are (None: they can). Reads headers only."""
    try:
        info = json.loads((directory / QUANTIZATION_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{QUANTIZATION_FILE} is unreadable: {exc}"
    if info.get("layout_version") != LAYOUT_VERSION:
        return f"layout version {info.get('layout_version', 1)}, this code needs {LAYOUT_VERSION} (64-byte aligned)"
    for path in sorted(directory.glob("*.safetensors")):
        bad = misaligned(path, ALIGNMENT)
        if bad:
            return f"{path.name} has {len(bad)} tensors not on a {ALIGNMENT}-byte boundary (e.g. {bad[0]})"
    return None


def load(directory: Path, config) -> nn.Module:
    """Load the int8 format: the skeleton on meta, the memory-mapped tensors adopted as they are, the
    generation config from generation_config.json (as transformers' own loader does).

    Raises MisalignedFileError (with the command to re-prepare) for files written before the aligned layout.
    """
    problem = layout_problem(directory)
    if problem:
        raise MisalignedFileError(
            f"the int8 files in {directory} cannot be served without copying them: {problem}. Prepare them "
            f"again: infra/prepare_model.py MODEL --format int8 --out {directory} --force"
        )
    linears = json.loads((directory / QUANTIZATION_FILE).read_text())["linears"]
    model = build_skeleton(config, linears)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_aligned(path, ALIGNMENT))
    model = adopt(model, tensors)
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _describe_head(head: nn.Module | None, embedding: nn.Module | None) -> str | None:
    if head is None:
        return None
    bias = ", fp32 bias" if getattr(head, "bias", None) is not None else ""
    if isinstance(head, Int8Linear):
        return f"int8, as int8_linears{bias}"
    if embedding is not None and head.weight is embedding.weight:
        return f"tied to the {_dtype(head.weight)} embedding: F.linear in {_dtype(head.weight)}"
    return f"{_dtype(head.weight)}: F.linear in {_dtype(head.weight)}{bias}"


def kernels_in_use(model: nn.Module) -> dict[str, object]:
    """Which kernels the loaded model runs, per kind of layer, for /health and the init log line."""
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    embedding = model.get_input_embeddings()
    kernels: dict[str, object] = {}
    if int8:
        kernels["int8_linears"] = {
            "count": len(int8),
            "up_to_threshold": "torch._weight_int8pack_mm: int8 weights, bf16 per-row scales, bf16 activations",
            "above_threshold": "weight widened to fp32, fp32 GEMM, output scaled per channel",
            "row_threshold": DECODE_ROWS,
        }
    if dense:
        kernels["dense_linears"] = {"count": len(dense), "dtypes": sorted({_dtype(m.weight) for m in dense})}
    kernels["lm_head"] = _describe_head(model.get_output_embeddings(), embedding)
    if isinstance(embedding, Bf16Embedding):
        kernels["embedding"] = "bf16 table, rows widened to fp32"
    elif embedding is not None:
        kernels["embedding"] = f"{_dtype(embedding.weight)} table"
    operands = [t for m in int8 for t in (m.weight, m.scale)]
    # The AVX-512 int8 kernel's assumption, checked on what was actually adopted (None: no int8 kernel).
    kernels["int8_operands_64_byte_aligned"] = all(t.data_ptr() % ALIGNMENT == 0 for t in operands) if int8 else None
    return kernels
