"""Aligned safetensors: valid for safetensors itself, every tensor on the boundary, read back without a copy."""

from __future__ import annotations

import pytest
import torch
from mapped import inside, mappings_of
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from phi2.engine.aligned_safetensors import (
    PAD_PREFIX,
    MisalignedFileError,
    load_aligned,
    misaligned,
    read_header,
    save_aligned,
)


def awkward_tensors() -> dict[str, torch.Tensor]:
    """Sizes that leave every next tensor unaligned, every dtype the int8 format uses, and edge cases."""
    torch.manual_seed(0)
    return {
        "w.weight": torch.randint(-127, 128, (37, 29), dtype=torch.int8),
        "w.scale": torch.rand(37).bfloat16(),
        "w.bias": torch.randn(37),
        "norm": torch.randn(13).half(),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.fixture
def aligned_file(tmp_path):
    tensors = awkward_tensors()
    path = tmp_path / "aligned.safetensors"
    save_aligned(tensors, path, metadata={"format": "int8"})
    return tensors, path


@pytest.mark.parametrize("alignment", [64, 4096])
def test_every_tensor_and_the_data_buffer_start_on_the_boundary(tmp_path, alignment):
    path = tmp_path / "x.safetensors"
    save_aligned(awkward_tensors(), path, alignment=alignment)
    start, header = read_header(path)
    assert start % alignment == 0
    tensors = {name: entry for name, entry in header.items() if not name.startswith(PAD_PREFIX)}
    assert set(tensors) == set(awkward_tensors())
    assert all((start + entry["data_offsets"][0]) % alignment == 0 for entry in tensors.values())
    assert misaligned(path, alignment) == []


def test_safetensors_itself_reads_the_file_back_unchanged_with_the_padding_as_extra_tensors(aligned_file):
    tensors, path = aligned_file
    loaded = load_file(path)
    pads = {name for name in loaded if name.startswith(PAD_PREFIX)}
    assert pads and all(loaded[name].dtype == torch.uint8 and not loaded[name].any() for name in pads)
    assert set(loaded) - pads == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "int8"}


def test_load_aligned_adopts_views_into_the_mapped_file_on_the_boundary(aligned_file):
    tensors, path = aligned_file
    # WHEN the file is loaded
    loaded = load_aligned(path)
    # THEN no padding comes back, the values are the saved ones,
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    # AND every tensor lies inside the file's memory mapping (not a fresh allocation), 64-byte aligned
    ranges = mappings_of(path)
    assert ranges, "the file is not memory-mapped"
    for name, tensor in loaded.items():
        if tensor.numel():
            assert inside(tensor, ranges), name
            assert tensor.data_ptr() % 64 == 0, name


def test_a_file_written_by_safetensors_own_writer_is_refused_as_misaligned(tmp_path):
    # GIVEN a file from safetensors' save_file, which aligns data to 8 bytes only
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(3, dtype=torch.int8), "b": torch.zeros(40, dtype=torch.int8)}, path)
    assert misaligned(path)
    # WHEN it is loaded as an aligned file THEN it is refused, naming the boundary
    with pytest.raises(MisalignedFileError, match="64-byte boundary"):
        load_aligned(path)


def test_padding_names_are_reserved(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_aligned({f"{PAD_PREFIX}0": torch.zeros(1)}, tmp_path / "x.safetensors")
