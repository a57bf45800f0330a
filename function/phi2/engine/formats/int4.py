"""int4 and int4-mixed: 4-bit weights in groups of 64 or 128 columns, for the smallest memory and fastest decode.

    int4        every linear layer 4-bit except the output head (int8, as in the int8 format)
    int4-mixed  the MLP 4-bit; attention and the head int8 (the mixed precision to try when pure 4-bit is
                not good enough: the MLP holds two thirds of a transformer block's weights)

Each group of `group` columns of a row has an fp16 scale and an fp16 minimum, w = q x scale + min with q in
0..15 (asymmetric, like GGUF's Q4_1, but in groups of 64 or 128: SmolLM2's own weights are Q4_1 blocks of 32, so
a 32-column format would reproduce them exactly and prove nothing). Scale and minimum are chosen per group by a
small search: a range of candidate steps, each refitted by least squares to the values it rounds to, the pair
with the least squared error kept (HQQ and llama.cpp's k-quants round the same way; min/max rounding loses
clearly more: SmolLM2 perplexity ratio 1.41 vs 1.26 at groups of 64).

Layout, made for one load to unpack with an AND and a shift: a row is units of 64 columns, 32 bytes each,
byte j holding column j in its low nibble and column 32 + j in its high nibble (engine/kernels: an AVX2
load is one unit, an AVX-512 load two). The group is 128 where a layer's input width allows it (Phi-2:
everywhere), else 64.

What runs: up to KERNEL_ROWS rows our q4 kernel (activations int8 per 64 columns, exact integer products);
above, the weight de-quantized by the library a block at a time into the thread's buffer, and one bf16 or fp32
GEMM (formats/common.py). Without the library both paths de-quantize with torch ops, slowly: a safety net,
not a way to serve.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from phi2.engine import kernels
from phi2.engine.formats import common, int8

FORMATS = ("int4", "int4-mixed")
LAYOUT_VERSION = 1
GROUPS = (128, 64)
UNIT = 64
LEVELS = 15
# Up to this many rows our kernel runs; above, the de-quantized weight's GEMM (docs/performance.md).
KERNEL_ROWS = {torch.bfloat16: 32, torch.float32: 64}
# Candidate steps of the search: the range divided by 15 - 1 ... 15 + 6 in halves (narrower steps clip the
# extremes for finer steps everywhere else; the least-squares refit then moves both ends).
CANDIDATES = tuple(LEVELS + 0.5 * i for i in range(-2, 13))


def group_of(in_features: int) -> int | None:
    """The group size of a layer with this input width (None: no 4-bit group divides it)."""
    return next((g for g in GROUPS if in_features % g == 0), None)


def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 (uint8) -> [N, K / 2]: per 64 columns, byte j = column j | column 32 + j << 4."""
    rows, columns = q.shape
    units = q.reshape(rows, columns // UNIT, 2, UNIT // 2)
    return (units[:, :, 0] | (units[:, :, 1] << 4)).reshape(rows, columns // 2).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: [N, K / 2] -> q [N, K] (uint8, 0..15)."""
    rows, half = packed.shape
    units = packed.reshape(rows, half // (UNIT // 2), 1, UNIT // 2)
    return torch.cat((units & 0x0F, units >> 4), dim=2).reshape(rows, half * 2)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] in fp32, with torch ops (the reference the kernels are tested against)."""
    q = unpack(packed)
    rows, columns = q.shape
    groups = scales.shape[1]
    w = q.reshape(rows, groups, columns // groups).float() * scales.float()[..., None] + mins.float()[..., None]
    return w.reshape(rows, columns)


def quantize_weight(
    weight: torch.Tensor, group: int, rows_per_chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed [N, K/2] uint8, scales [N, K/group] fp16, mins [N, K/group] fp16) from `weight` as given."""
    rows, columns = weight.shape
    if columns % group:
        raise ValueError(f"{columns} columns are not a whole number of groups of {group}")
    packed = torch.empty(rows, columns // 2, dtype=torch.uint8)
    scales = torch.empty(rows, columns // group, dtype=torch.float16)
    mins = torch.empty(rows, columns // group, dtype=torch.float16)
    for start in range(0, rows, rows_per_chunk):
        end = min(rows, start + rows_per_chunk)
        w = weight[start:end].to(torch.float32, copy=True).reshape(end - start, columns // group, group)
        q, s, m = _search(w)
        packed[start:end] = pack(q.reshape(end - start, columns))
        scales[start:end], mins[start:end] = s.squeeze(-1), m.squeeze(-1)
    return packed, scales, mins


def _levels(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return ((w - m) / s.clamp(min=1e-12)).round_().clamp_(0, LEVELS)


def _search(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (last dim): q (uint8), scale and min (fp16, [..., 1]) with the least squared error found."""
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    span = high - low
    n = w.shape[-1]
    sum_w = w.sum(-1, keepdim=True)
    best_s, best_m = (span / LEVELS).half(), low.half()
    best_err = _error(w, best_s, best_m)
    for steps in CANDIDATES:
        q = _levels(w, span / steps, low)
        sum_q, sum_qq, sum_qw = q.sum(-1, keepdim=True), (q * q).sum(-1, keepdim=True), (q * w).sum(-1, keepdim=True)
        det = n * sum_qq - sum_q * sum_q
        ok = det > 0
        det = det.clamp(min=1e-12)
        s = torch.where(ok, (n * sum_qw - sum_q * sum_w) / det, span / steps).clamp(min=0).half()
        m = torch.where(ok, (sum_qq * sum_w - sum_q * sum_qw) / det, low).half()
        err = _error(w, s, m)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return _levels(w, best_s.float(), best_m.float()).to(torch.uint8), best_s, best_m


def _error(w: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    s, m = s.float(), m.float()
    return ((_levels(w, s, m) * s + m - w) ** 2).sum(-1, keepdim=True)


class Int4Linear(nn.Module):
    """A Linear layer whose weight is 4-bit in groups, with an fp16 scale and minimum per group."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        groups = in_features // group
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("mins", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32, device=device) if bias else None)

    def kernel(self) -> bool:
        return kernels.library() is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        dtype = common.prompt_dtype()
        if self.kernel() and rows <= common.kernel_rows(KERNEL_ROWS[dtype]):
            return kernels.q4_linear(x.float(), self.packed, self.scales, self.mins, self.group, self.bias)
        widen = self._widen if self.kernel() else self._widen_torch
        return common.widened_linear(x.float(), self.out_features, self.in_features, widen, dtype=dtype, bias=self.bias)

    def _widen(self, block: torch.Tensor, first: int, last: int) -> None:
        kernels.q4_widen(self.packed, self.scales, self.mins, self.group, block, first)

    def _widen_torch(self, block: torch.Tensor, first: int, last: int) -> None:
        block.copy_(dequantize(self.packed[first:last], self.scales[first:last], self.mins[first:last]))


def _is_mlp(name: str) -> bool:
    return ".mlp." in f".{name}."


def plan(model: nn.Module, fmt: str) -> dict[str, str]:
    """Each linear layer's precision in format `fmt`: "int4" or "int8"."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown 4-bit format {fmt!r}")
    out = {}
    for name in common.linear_names(model):
        module = model.get_submodule(name)
        four = group_of(module.in_features) is not None and not name.endswith("lm_head")
        if fmt == "int4-mixed":
            four = four and _is_mlp(name)
        out[name] = "int4" if four else "int8"
    return out


def save(model: nn.Module, directory: Path, fmt: str = "int4") -> None:
    """Write a 4-bit format of a loaded model (ValueError if the written file is not aligned)."""
    precision = plan(model, fmt)
    tensors: dict[str, torch.Tensor] = {}
    groups = {}
    for name, kind in precision.items():
        module = model.get_submodule(name)
        if kind == "int8":
            tensors.update(int8.layer_tensors(name, module))
            continue
        group = group_of(module.in_features)
        packed, scales, mins = quantize_weight(module.weight.detach(), group)
        tensors.update({f"{name}.packed": packed, f"{name}.scales": scales, f"{name}.mins": mins})
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().float()
        groups[name] = group
    tensors.update(common.other_tensors(model, set(precision)))
    scheme = (
        "4-bit weights, asymmetric (fp16 scale and minimum per group of 128 columns, or 64 where 128 does not "
        "divide), least-squares rounding; "
        + ("MLP 4-bit, attention and head int8" if fmt == "int4-mixed" else "the head int8")
        + "; our q4 kernel (int8 activations per 64 columns) up to the kernel threshold, a bf16 or fp32 GEMM of "
        "the de-quantized weight above; fp32 elsewhere"
    )
    manifest = {
        "format": fmt,
        "layout_version": LAYOUT_VERSION,
        "scheme": scheme,
        "linears": sorted(precision),
        "int4_groups": groups,
        "int8_linears": sorted(n for n, k in precision.items() if k == "int8"),
    }
    common.write(model, directory, tensors, manifest)


def layout_problem(directory: Path) -> str | None:
    return common.layout_problem(directory, LAYOUT_VERSION)


def load(directory: Path, config, fmt: str = "int4") -> nn.Module:
    def layers(info: dict) -> dict:
        out = {name: int8.Int8Linear.like for name in info["int8_linears"]}
        for name, group in info["int4_groups"].items():
            out[name] = lambda linear, g=group: Int4Linear(
                linear.in_features, linear.out_features, linear.bias is not None, g
            )
        return out

    return common.load_model(directory, config, fmt, LAYOUT_VERSION, layers)


def describe(layers: list[Int4Linear]) -> dict[str, object]:
    """What runs for these 4-bit layers, for /health and the init log line."""
    dtype = common.prompt_dtype()
    lib = kernels.library()
    return {
        "count": len(layers),
        "groups": sorted({layer.group for layer in layers}),
        "up_to_threshold": f"phi2 q4 kernel ({lib.variant}): 4-bit weights, int8 activations per 64 columns"
        if lib is not None
        else "weight de-quantized with torch ops (no kernel library: slow)",
        "above_threshold": f"weight de-quantized to {common.dtype_name(dtype)} a block at a time, "
        f"{common.dtype_name(dtype)} GEMM, fp32 out",
        "row_threshold": common.kernel_rows(KERNEL_ROWS[dtype]) if lib is not None else 0,
    }
