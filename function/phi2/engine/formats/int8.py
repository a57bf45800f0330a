"""int8: weight-only int8, quantized once at preparation time, loaded directly at cold start.

Decode on a CPU is memory-bound: every new token reads every weight once. Storing the linear layers' weights
as int8 (per-output-channel symmetric scales, bf16) reads a quarter of fp32's bytes and half of bf16's, and
brings Phi-2 from ~11 GB (fp32) to ~2.8 GB. What runs (`describe` says it at load, /health shows it):
- up to KERNEL_ROWS rows (decode, short prompts): our q8 kernel (engine/kernels): the activations quantized per
  row to int16, exact integer products with the int8 weights, fp32 out, bias fused;
- above (long prompts): the weight widened into the thread's buffer for one GEMM (formats/common.py): bf16
  where the CPU runs it natively (the int8 values are exact in bf16; the scale applies to the fp32 output),
  fp32 elsewhere (the scale folded into the widened weight, exactly: int8 x bf16 fits fp32's mantissa);
- without the kernel library: torch's `_weight_int8pack_mm` (bf16 activations) up to FALLBACK_ROWS rows.
Everything else (norms, attention, biases, residuals) runs in fp32; the embedding table is stored in bf16.

Why int16 activations: int8 activations (llama.cpp's Q8_0, blocks of 32) fail the quality gate on SmolLM2
(teacher-forced greedy agreement 0.943 vs 0.961 for weight-only, per-row int8 0.889); int16 per row keeps it
(0.963) and costs the kernel no more instructions per weight byte (sign-extend, multiply-add in pairs).

The file is safetensors (int8 weights, bf16 scales, bf16 embedding, fp32 norms and biases): no pickle, no
ISA-specific packing, so the same file serves any x86 or ARM CPU. Every tensor starts on a 64-byte boundary
(formats/common.py); a file written before that layout is refused at load with the command to re-prepare it.

Preparation quantizes from the checkpoint's own values (Phi-2: fp16), never from a bf16 rounding of them.

An untied lm_head (Phi-2's, 51200x2560 with a bias) is int8 like the other linears, its bias fp32. Measured on
SmolLM2-135M with its head untied (issue 9): int8 head alone vs fp32, greedy agreement 0.975 and perplexity
ratio 1.0007; a bf16 head was no closer and cost ~17 ms more per decode step on full-size Phi-2's head (AVX2).
A tied head stays the fp32 embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from phi2.engine import kernels
from phi2.engine.aligned_safetensors import ALIGNMENT
from phi2.engine.formats import common

FORMAT = "int8"
# The layout version of the int8 files: 2 = every tensor 64-byte aligned in the file (1 was safetensors' own
# 8-byte layout, which the AVX-512 path of torch's int8 kernel cannot take).
LAYOUT_VERSION = 2
# Up to this many rows our kernel runs; above, the widened GEMM. Measured on Phi-2's layers, 2 threads
# (docs/performance.md, "Rows per kernel"): where they cross with a bf16 GEMM and with an fp32 one.
KERNEL_ROWS = {torch.bfloat16: 32, torch.float32: 64}
# Without our library: torch's int8 kernel up to this many rows (it and the fp32 GEMM cross at about 64 rows
# on a 2-core AVX2 EPYC: 1.9 / 13 / 56 / 110 ms against 12 / 30 / 58 / 85 ms at 1 / 16 / 64 / 128 rows).
FALLBACK_ROWS = 64


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    # The AVX-512 path of _weight_int8pack_mm assumes 64-byte aligned operands; a fresh tensor from torch's
    # CPU allocator is, a view into something else need not be.
    tensor = tensor.contiguous()
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 with one bf16 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device) if bias else None)

    @classmethod
    def like(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.in_features, linear.out_features, linear.bias is not None)

    def kernel(self) -> bool:
        """Whether our kernel can run this layer (the library is loaded and takes its shape)."""
        return kernels.library() is not None and self.in_features % kernels.Q8_COLUMN_MULTIPLE == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        dtype = common.prompt_dtype()
        if x.dtype != torch.float32:
            return nn.functional.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None], self.bias)
        if self.kernel():
            if rows <= common.kernel_rows(KERNEL_ROWS[dtype]):
                return kernels.q8_linear(x, self.weight, self.scale, self.bias)
        elif rows <= common.kernel_rows(FALLBACK_ROWS):
            flat = _aligned(x.reshape(rows, self.in_features).to(torch.bfloat16))
            y = torch._weight_int8pack_mm(flat, self.weight, self.scale).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y
        if dtype == torch.bfloat16:
            # int8 values are exact in bf16; the scale waits for the fp32 output
            return common.widened_linear(
                x, *self.weight.shape, self._widen, dtype=dtype, scale=self.scale, bias=self.bias
            )
        return common.widened_linear(x, *self.weight.shape, self._widen_scaled, dtype=dtype, bias=self.bias)

    def _widen(self, block: torch.Tensor, first: int, last: int) -> None:
        block.copy_(self.weight[first:last])

    def _widen_scaled(self, block: torch.Tensor, first: int, last: int) -> None:
        # int8 x bf16 has at most 15 significant bits: exact in fp32, so folding the scale in loses nothing
        torch.mul(self.weight[first:last], self.scale[first:last, None].float(), out=block)


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


def layer_tensors(name: str, module: nn.Linear) -> dict[str, torch.Tensor]:
    """One linear layer's tensors in this format."""
    q, scale = quantize_weight(module.weight.detach())
    tensors = {f"{name}.weight": q, f"{name}.scale": scale}
    if module.bias is not None:
        tensors[f"{name}.bias"] = module.bias.detach().float()
    return tensors


def quantized_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of the int8 format for a loaded model, and the quantized layer names.

    Every value comes from the model's own tensors as loaded (Phi-2: fp16): int8 weights and their scales are
    computed in fp32 from them, norms and biases are widened to fp32 exactly, the embedding is rounded once,
    to bf16.
    """
    linears = common.linear_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for name in linears:
        tensors.update(layer_tensors(name, model.get_submodule(name)))
    tensors.update(common.other_tensors(model, set(linears)))
    return tensors, sorted(linears)


SCHEME = (
    "weight-only, symmetric per output channel, bf16 scales; our q8 kernel (int16 activations per row) up to the "
    "kernel threshold, a bf16 or fp32 GEMM of the widened weight above; fp32 elsewhere"
)


def save(model: nn.Module, directory: Path) -> None:
    """Write the int8 format of a loaded model (ValueError if the written file is not aligned)."""
    tensors, linears = quantized_state_dict(model)
    manifest = {"format": FORMAT, "layout_version": LAYOUT_VERSION, "scheme": SCHEME, "linears": linears}
    common.write(model, directory, tensors, manifest)


def layout_problem(directory: Path) -> str | None:
    return common.layout_problem(directory, LAYOUT_VERSION)


def load(directory: Path, config) -> nn.Module:
    def layers(info: dict) -> dict:
        return {name: Int8Linear.like for name in info["linears"]}

    return common.load_model(directory, config, FORMAT, LAYOUT_VERSION, layers)


def describe(layers: list[Int8Linear]) -> dict[str, object]:
    """What runs for these int8 layers, for /health and the init log line."""
    dtype = common.prompt_dtype()
    lib = kernels.library()
    kernel = sum(layer.kernel() for layer in layers)
    up_to = (
        f"phi2 q8 kernel ({lib.variant}): int8 weights, int16 activations per row, exact integer products"
        if lib is not None
        else "torch._weight_int8pack_mm: int8 weights, bf16 per-row scales, bf16 activations"
    )
    if lib is not None and kernel < len(layers):
        up_to += f" ({len(layers) - kernel} layers of unsupported shape: torch's widened GEMM)"
    return {
        "count": len(layers),
        "up_to_threshold": up_to,
        "above_threshold": f"weight widened to {common.dtype_name(dtype)} a block at a time, "
        f"{common.dtype_name(dtype)} GEMM, fp32 out",
        "row_threshold": common.kernel_rows(KERNEL_ROWS[dtype] if lib is not None else FALLBACK_ROWS),
    }
