"""Where a file is memory-mapped in this process: to tell a view into the mapping from a copy."""

from __future__ import annotations

from pathlib import Path


def mappings_of(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process has `path` memory-mapped (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def inside(tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether all of the tensor's bytes lie inside one of the ranges."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)
