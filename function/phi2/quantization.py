"""Weight-only int8: quantized once at preparation time, loaded directly at cold start.

Decode on a CPU is memory-bound: every new token reads every weight once. Storing the linear layers'
weights as int8 (per-output-channel symmetric scales) reads a quarter of fp32's bytes and half of
bf16's, and brings Phi-2 from ~11 GB (fp32) to ~2.9 GB. The rest of the model computes in fp32: on
CPUs without native bf16 matrix units, fp32 prefill is several times faster than bf16.

The file is plain safetensors (int8 weights, bf16 scales, bf16 embeddings, fp32 norms and biases):
no pickle, no ISA-specific packing, so the same file serves any x86 or ARM CPU. Loading builds the
model skeleton on the meta device and adopts the memory-mapped tensors as they are: no full-precision
copy ever exists, and pages are read from disk as the warm-up pass touches them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "int8"
# Up to this many rows (tokens x batch) the int8 kernel is used (decode, short prompts); above it, the
# weight is de-quantized to fp32 for one GEMM (long prompts), which pays off only once the matmul is
# large: de-quantizing a 10240x2560 layer costs about as much as 128 rows through the int8 kernel on
# an AVX2 CPU (measured with /proc-level noise; see the README's performance section).
DECODE_ROWS = 128


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 with one bf16 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= DECODE_ROWS:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            weight = self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
            y = F.linear(x, weight)
        return y + self.bias if self.bias is not None else y


class Bf16Embedding(nn.Embedding):
    """An embedding stored in bf16 (half of fp32's memory) that hands fp32 vectors to the model."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids).float()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (int8 weight, bf16 scale)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
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
    """The tensors of the int8 format for a loaded full-precision model, and the quantized layer names."""
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


QUANTIZATION_FILE = "quantization.json"


def save(model: nn.Module, directory: Path) -> None:
    """Write the int8 format of a loaded full-precision model: weights, config, generation config."""
    tensors, linears = quantized_state_dict(model)
    save_file(tensors, directory / "model.safetensors", metadata={"format": FORMAT})
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    scheme = "weight-only, symmetric per output channel, bf16 scales; fp32 compute"
    (directory / QUANTIZATION_FILE).write_text(json.dumps({"format": FORMAT, "scheme": scheme, "linears": linears}))


def load(directory: Path, config) -> nn.Module:
    """Load the int8 format: the skeleton on meta, then the memory-mapped tensors adopted as they are."""
    linears = json.loads((directory / QUANTIZATION_FILE).read_text())["linears"]
    model = build_skeleton(config, linears)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = handle.get_tensor(key)
    return adopt(model, tensors)
