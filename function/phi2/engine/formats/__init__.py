"""The quantized serving formats a prepared model directory may hold (manifest.json's `format`).

    int8        weight-only int8 (formats/int8.py): the default the image bakes
    int4        4-bit weights in groups, the head int8 (formats/int4.py): the smallest, fastest decode
    int4-mixed  4-bit MLP, int8 attention and head (formats/int4.py)

`safetensors` (weights in one float dtype) is transformers' own and is not listed here. Every format here
computes in fp32, runs its linear layers on our kernels (engine/kernels) where the library loads, and loads
its weights without a copy (formats/common.py).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from phi2.engine import kernels
from phi2.engine.formats import common, int4, int8

QUANTIZED = (int8.FORMAT, *int4.FORMATS)


def is_quantized(fmt: str) -> bool:
    return fmt in QUANTIZED


def load(directory: Path, config, fmt: str) -> nn.Module:
    """Load a quantized format (MisalignedFileError, with the command to re-prepare, for files this code
    cannot serve as they are)."""
    if fmt == int8.FORMAT:
        return int8.load(directory, config)
    if fmt in int4.FORMATS:
        return int4.load(directory, config, fmt)
    raise ValueError(f"{fmt!r} is not a quantized format ({', '.join(QUANTIZED)})")


def save(model: nn.Module, directory: Path, fmt: str) -> None:
    if fmt == int8.FORMAT:
        int8.save(model, directory)
    elif fmt in int4.FORMATS:
        int4.save(model, directory, fmt)
    else:
        raise ValueError(f"{fmt!r} is not a quantized format ({', '.join(QUANTIZED)})")


def layout_problem(directory: Path, fmt: str) -> str | None:
    """Why the files of format `fmt` in `directory` cannot be served as they are (None: they can)."""
    return int8.layout_problem(directory) if fmt == int8.FORMAT else int4.layout_problem(directory)


def _describe_head(head: nn.Module | None, embedding: nn.Module | None) -> str | None:
    if head is None:
        return None
    bias = ", fp32 bias" if getattr(head, "bias", None) is not None else ""
    if isinstance(head, int8.Int8Linear):
        return f"int8, as int8_linears{bias}"
    if isinstance(head, int4.Int4Linear):
        return f"4-bit, as int4_linears{bias}"
    dtype = common.dtype_name(head.weight.dtype)
    if embedding is not None and head.weight is embedding.weight:
        return f"tied to the {dtype} embedding: F.linear in {dtype}"
    return f"{dtype}: F.linear in {dtype}{bias}"


def kernels_in_use(model: nn.Module) -> dict[str, object]:
    """Which kernels the loaded model runs, per kind of layer, for /health and the init log line."""
    eight = [m for m in model.modules() if isinstance(m, int8.Int8Linear)]
    four = [m for m in model.modules() if isinstance(m, int4.Int4Linear)]
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    embedding = model.get_input_embeddings()
    out: dict[str, object] = {}
    if eight:
        out["int8_linears"] = int8.describe(eight)
    if four:
        out["int4_linears"] = int4.describe(four)
    if eight or four:
        out["kernel_library"] = kernels.describe()
        out["prompt_gemm"] = common.dtype_name(common.prompt_dtype())
    if dense:
        dtypes = sorted({common.dtype_name(m.weight.dtype) for m in dense})
        out["dense_linears"] = {"count": len(dense), "dtypes": dtypes}
    out["lm_head"] = _describe_head(model.get_output_embeddings(), embedding)
    if isinstance(embedding, common.Bf16Embedding):
        out["embedding"] = "bf16 table, rows widened to fp32"
    elif embedding is not None:
        out["embedding"] = f"{common.dtype_name(embedding.weight.dtype)} table"
    operands = [t for m in eight for t in (m.weight, m.scale)] + [t for m in four for t in (m.packed, m.scales, m.mins)]
    # No misaligned operand may reach a kernel: checked on what was actually adopted (None: no quantized layer).
    out["quantized_operands_64_byte_aligned"] = (
        all(t.data_ptr() % common.ALIGNMENT == 0 for t in operands) if operands else None
    )
    return out
