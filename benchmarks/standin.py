"""Stand-in VMs for the benchmarks, hosted in a child process.

The VMs run in ``benchmarks.child vms``, not in the measuring process, so
their muxer threads take no time slices or memory from the code measured.
With the reference agent present, port 52 reaches it; without it, port 52
is relayed to a listener that accepts and holds connections (enough for
handshakes).  Without :mod:`fcvsock.localvm`, ``benchmarks.child vmm`` answers
handshakes only.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

from benchmarks import measure


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def kind() -> str:
    """Return ``"localvm"``, ``"localvm-no-agent"`` or ``"minimal-vmm"``."""
    if not _importable("fcvsock.localvm"):
        return "minimal-vmm"
    if not _importable("fcvsock.agent"):
        return "localvm-no-agent"
    return "localvm"


def has_agent() -> bool:
    """True when stand-in VMs can run commands."""
    return kind() == "localvm"


@contextmanager
def stand_in_vms(directory: str, count: int) -> Iterator[list[str]]:
    """Start ``count`` stand-in VMs; yield their hybrid-vsock socket paths."""
    current = kind()
    if current == "minimal-vmm":
        if count != 1:
            raise RuntimeError("stand-in: the minimal VMM serves one VM only")
        path = os.path.join(directory, "vmm.sock")
        with measure.server_child("vmm", path):
            yield [path]
        return
    arguments = [directory, "--count", str(count)]
    if current == "localvm-no-agent":
        arguments.append("--no-agent")
    with measure.server_child("vms", *arguments):
        yield [os.path.join(directory, f"vm{index}.sock") for index in range(count)]
