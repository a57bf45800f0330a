"""Safetensors files whose every tensor starts on an `alignment`-byte boundary, read back without a copy.

Why: some CPU kernels assume their operands are aligned. torch's `_weight_int8pack_mm` on the AVX-512 path
segfaults with 4 or more activation rows when the int8 weight or its scales do not start on a 64-byte
boundary, and safetensors' own writer aligns tensor data to 8 bytes only (the int8 SmolLM2 file had every
layer at an address = 40 mod 64). Copying the tensors at load would align them, at the price of a second
copy of the weights in memory (3.7 -> 5.9 GiB for int8 Phi-2): the file itself has to be aligned.

The files stay valid safetensors, readable by any safetensors reader:
- the header JSON is padded with trailing spaces (the format allows it) so that the data buffer starts on a
  multiple of `alignment` from the start of the file;
- the data buffer may have no holes (the format forbids them), so where a tensor's end leaves the next start
  unaligned, a filler tensor named `__pad__.<n>` (uint8, 1 to alignment-1 zero bytes) fills the gap.
  `load_aligned` drops the fillers; other readers see them as small extra tensors.

Reading: safetensors' `safe_open` maps the file privately (copy-on-write, page-aligned) and hands out views
into the mapping, so a tensor's address is the mapping's base plus its offset in the file: aligned in the file
means aligned in memory, and nothing is copied. `load_aligned` checks both (the header before mapping, every
tensor's address after) and raises `MisalignedFileError` on a file that is not aligned: the caller decides
whether that means re-preparing the file (the int8 format does).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch

ALIGNMENT = 64
PAD_PREFIX = "__pad__."
# The format's dtype codes for the torch dtypes we write.
DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_HEADER_SIZE = struct.Struct("<Q")


class MisalignedFileError(ValueError):
    """A tensor of the file does not start on the required boundary (in the file or in memory)."""


def _pad_to(value: int, alignment: int) -> int:
    return -value % alignment


def save_aligned(
    tensors: Mapping[str, torch.Tensor],
    path: Path | str,
    metadata: Mapping[str, str] | None = None,
    alignment: int = ALIGNMENT,
) -> None:
    """Write `tensors` (in their order) as a safetensors file with every tensor's data `alignment`-aligned."""
    if alignment < 1:
        raise ValueError("alignment must be positive")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    layout: list[tuple[int, torch.Tensor | None]] = []  # (padding bytes before, tensor)
    offset = 0
    pads = 0
    for name, tensor in tensors.items():
        if name.startswith(PAD_PREFIX):
            raise ValueError(f"tensor names starting with {PAD_PREFIX!r} are reserved for padding: {name}")
        if tensor.dtype not in DTYPE_CODES:
            raise ValueError(f"{name}: dtype {tensor.dtype} is not supported")
        gap = _pad_to(offset, alignment)
        if gap:
            header[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            pads += 1
            offset += gap
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        layout.append((gap, tensor))
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * _pad_to(_HEADER_SIZE.size + len(encoded), alignment)
    with open(path, "wb") as handle:
        handle.write(_HEADER_SIZE.pack(len(encoded)))
        handle.write(encoded)
        for gap, tensor in layout:
            if gap:
                handle.write(bytes(gap))
            data = tensor.detach().to("cpu").contiguous()
            if data.numel():
                # A byte view of the tensor's own memory: no second copy of a large weight.
                handle.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))


def read_header(path: Path | str) -> tuple[int, dict]:
    """(offset of the data buffer in the file, the header without `__metadata__`) of a safetensors file."""
    with open(path, "rb") as handle:
        raw = handle.read(_HEADER_SIZE.size)
        if len(raw) != _HEADER_SIZE.size:
            raise ValueError(f"{path} is too short to be a safetensors file")
        (size,) = _HEADER_SIZE.unpack(raw)
        if size > 100 * 2**20:
            raise ValueError(f"{path}: header of {size} bytes is not a safetensors header")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return _HEADER_SIZE.size + size, header


def misaligned(path: Path | str, alignment: int = ALIGNMENT) -> list[str]:
    """Names of the tensors whose data does not start on an `alignment` boundary of the file (header only)."""
    start, header = read_header(path)
    return sorted(
        name
        for name, entry in header.items()
        if not name.startswith(PAD_PREFIX) and (start + entry["data_offsets"][0]) % alignment
    )


def load_aligned(path: Path | str, alignment: int = ALIGNMENT) -> dict[str, torch.Tensor]:
    """Every tensor of an aligned file (padding dropped), as views into the memory-mapped file.

    Raises MisalignedFileError if the file is not aligned or a tensor's address is not.
    """
    from safetensors import safe_open

    bad = misaligned(path, alignment)
    if bad:
        raise MisalignedFileError(
            f"{Path(path).name}: {len(bad)} tensors do not start on a {alignment}-byte boundary "
            f"(e.g. {', '.join(bad[:3])})"
        )
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            if name.startswith(PAD_PREFIX):
                continue
            tensor = handle.get_tensor(name)
            if tensor.numel() and tensor.data_ptr() % alignment:
                raise MisalignedFileError(f"{name} sits at address {tensor.data_ptr():#x}, not {alignment}-aligned")
            tensors[name] = tensor
    return tensors
