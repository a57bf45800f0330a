"""The prepared model directory: its manifest, and the checks that it is complete and untampered.

Shared by `infra/prepare_model.py` (which writes it) and the generator (which reads it).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phi2.errors import ModelLoadError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Weights are only ever read from safetensors: a pickle can run code at load time.
FORBIDDEN_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class Manifest:
    """What was prepared, from where, and the sha256 and size of every file."""

    model_id: str
    source: str
    revision: str | None
    dtype: str
    format: str = "safetensors"
    files: dict[str, dict[str, int | str]] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def summary(self) -> dict[str, object]:
        """The public part, as `/health` reports it."""
        weights = sorted(name for name in self.files if name.endswith(".safetensors"))
        return {
            "model_id": self.model_id,
            "source": self.source,
            "revision": self.revision,
            "dtype": self.dtype,
            "format": self.format,
            "weights_sha256": {name: self.files[name]["sha256"] for name in weights},
        }


def sha256_of(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path) -> dict[str, dict[str, int | str]]:
    """sha256 and size of every regular file in `directory` except the manifest."""
    return {
        path.name: {"sha256": sha256_of(path), "size": path.stat().st_size}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }


def read_manifest(directory: Path) -> Manifest:
    """Parse `manifest.json`, or raise ModelLoadError naming what is wrong."""
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist; run infra/prepare_model.py")
    if not path.is_file():
        raise ModelLoadError(f"{MANIFEST_NAME} is missing in {directory}; the preparation did not finish")
    try:
        data = json.loads(path.read_text())
        manifest = Manifest(**data)
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{MANIFEST_NAME} in {directory} is not a valid manifest: {exc}") from None
    if manifest.version != MANIFEST_VERSION:
        raise ModelLoadError(f"{MANIFEST_NAME} has version {manifest.version}, expected {MANIFEST_VERSION}")
    return manifest


def verify(directory: Path, manifest: Manifest, *, checksums: bool) -> None:
    """Check the files against the manifest: presence and size always, sha256 when `checksums`.

    Sizes are cheap enough for every cold start; hashing gigabytes is not, so the full check runs at
    preparation time (and on demand).
    """
    if not any(name.endswith(".safetensors") for name in manifest.files):
        raise ModelLoadError("manifest lists no safetensors weights")
    for path in directory.iterdir():
        if path.suffix in FORBIDDEN_SUFFIXES:
            raise ModelLoadError(f"refusing to serve a directory with pickle weights: {path.name}")
    for name, meta in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ModelLoadError(f"{name} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise ModelLoadError(f"{name} has {size} bytes, the manifest says {meta['size']} (truncated or replaced)")
        if checksums and sha256_of(path) != meta["sha256"]:
            raise ModelLoadError(f"{name} does not match its sha256 in the manifest (corrupted or replaced)")


PREFETCH_CHUNK = 16 * 2**20


def prefetch(model_dir: Path) -> threading.Thread:
    """Start reading the weight files into the page cache, in a background thread.

    At a cold start the weights come from a cold disk (on Lambda, an image fetched on demand), and importing
    torch and transformers takes seconds of one core: read this way, the disk works while the imports run,
    and the loader then maps pages already in memory. Plain reads into one small buffer (not posix_fadvise,
    which some file systems ignore); the memory they fill is page cache, which the kernel may reclaim, not
    the process's. Errors are ignored: the load that follows reports them properly.
    """

    def read() -> None:
        buffer = bytearray(PREFETCH_CHUNK)
        for path in sorted(model_dir.glob("*.safetensors")):
            try:
                with path.open("rb", buffering=0) as f:
                    while f.readinto(buffer):
                        pass
            except OSError:
                return

    thread = threading.Thread(target=read, name="weights-prefetch", daemon=True)
    thread.start()
    return thread
