"""The runtime's Python process under the RIE (the RIE's child): its pid and resident memory, from /proc."""

from __future__ import annotations

from pathlib import Path

from rie import RieServer


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.extend(int(child) for child in (task / "children").read_text().split())
    return found


def runtime_pid(server: RieServer) -> int:
    """The pid of `python -m awslambdaric` (the entry script execs the RIE, which starts the runtime)."""
    pythons = [
        pid for pid in _children(server.process.pid) if b"awslambdaric" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(pythons) == 1, f"expected one runtime process under the RIE, found {pythons}"
    return pythons[0]


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
