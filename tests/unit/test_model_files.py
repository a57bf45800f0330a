"""Reading the weights ahead of the loader: the page cache is checked with the kernel's own mincore(2)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from phi2.engine.model_files import prefetch

ROOT = Path(__file__).resolve().parents[2]
PAGE = mmap.PAGESIZE


def resident_share(path: Path) -> float:
    """The share of the file's pages that are in the page cache now (mincore on a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    pages = -(-size // PAGE)
    with path.open("rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vector = ctypes.create_string_buffer(pages)
            assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vector.raw) / pages
        finally:
            libc.munmap(address, size)


@pytest.fixture
def cold_weights():
    """A 64 MiB weights file on the repository's disk (not tmpfs, where every page is always resident),
    written, synced and evicted from the page cache."""
    directory = ROOT / ".cache" / "test-prefetch"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.safetensors"
    path.write_bytes(os.urandom(64 * 2**20))
    with path.open("rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    yield path
    path.unlink()
    directory.rmdir()


def test_prefetch_brings_every_weight_page_into_the_page_cache(cold_weights):
    # GIVEN a weights file whose pages the kernel has dropped
    assert resident_share(cold_weights) < 0.5, "the file could not be evicted: this test would prove nothing"
    # WHEN it is prefetched (as the loader does before importing torch)
    thread = prefetch(cold_weights.parent)
    thread.join(timeout=60)
    # THEN the reading ran in the background and every page is now in memory
    assert thread.daemon and not thread.is_alive()
    assert resident_share(cold_weights) == 1.0


def test_prefetch_of_a_missing_directory_does_nothing(tmp_path):
    thread = prefetch(tmp_path / "absent")
    thread.join(timeout=10)
    assert not thread.is_alive()
