"""Write side: ``FrameWriter.write`` + ``flush`` against a naive ``sendall``.

A drain process (``benchmarks.child drain``) reads each connection to EOF
and sends back the byte count.  A trial connects, starts the clock, sends
its frames, shuts down its write side and stops the clock when the count
arrives, so every byte was taken by the receiver.  The number of frames is
calibrated per writer, so that every trial lasts about ``TRIAL_SECONDS``.

- ``compiled`` and ``twin``: ``burst`` calls to ``write`` and then ``flush``
  on a non-blocking socket, waiting in ``poll`` while bytes are pending;
- ``naive``: ``sock.sendall(header + payload)`` per frame on a blocking
  socket, which copies each payload into a new bytes object.
"""

from __future__ import annotations

import os
import select
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks import measure, syscalls
from benchmarks.child import COUNT, HEADER, STDOUT_TYPE
from fcvsock import _core

CONTENDERS = ["compiled", "twin", "naive"]
TRIAL_SECONDS = 0.3
MAX_TRIAL_BYTES = 4 << 30


@dataclass(frozen=True)
class Workload:
    name: str
    payload_bytes: int
    burst: int
    frames_quick: int
    frames_traced: int


WORKLOADS = [
    Workload("16 MiB frames", 16 * 1024 * 1024, 1, 1, 4),
    Workload("4 KiB frames, bursts of 32", 4096, 32, 320, 2048),
    Workload("64 B frames, bursts of 32", 64, 32, 320, 2048),
]


def send_frames(
    contender: str, path: str, payload: bytes, frames: int, burst: int
) -> float:
    """Send ``frames`` frames to the drain at ``path``; return the seconds taken."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    start = time.perf_counter()
    if contender == "naive":
        for _ in range(frames):
            sock.sendall(HEADER.pack(STDOUT_TYPE, len(payload)) + payload)
    else:
        _send_with_writer(contender, sock, payload, frames, burst)
    sock.shutdown(socket.SHUT_WR)
    reply = _receive_exactly(sock, COUNT.size)
    elapsed = time.perf_counter() - start
    sock.close()
    (received,) = COUNT.unpack(reply)
    expected = frames * (len(payload) + HEADER.size)
    if received != expected:
        raise RuntimeError(
            f"write: drain received {received} bytes, expected {expected}"
        )
    return elapsed


def _send_with_writer(
    contender: str, sock: socket.socket, payload: bytes, frames: int, burst: int
) -> None:
    core = _core.cython_core if contender == "compiled" else _core.python_core
    if core is None:
        raise RuntimeError("write: the compiled core is not built")
    sock.setblocking(False)
    writer = core.FrameWriter()
    fd = sock.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    queued = 0
    while queued < frames:
        count = min(burst, frames - queued)
        for _ in range(count):
            writer.write(STDOUT_TYPE, payload)
        queued += count
        while writer.flush(fd):
            poller.poll()
    sock.setblocking(True)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = sock.recv(size - len(received))
        if not chunk:
            raise RuntimeError(f"write: drain closed after {len(received)} bytes")
        received += chunk
    return received


def available_contenders() -> list[str]:
    """Return the writers to compare; ``compiled`` only when it is built."""
    return [c for c in CONTENDERS if c != "compiled" or _core.cython_core is not None]


def run(quick: bool, repetitions: int, trace: bool) -> dict[str, Any]:
    """Measure throughput and system calls per frame of every writer."""
    names = available_contenders()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fcvsock-bench-") as directory:
        path = os.path.join(directory, "drain.sock")
        with measure.server_child("drain", path):
            for workload in WORKLOADS:
                results[workload.name] = _run_workload(
                    workload, path, names, quick, repetitions, trace
                )
    return {
        "unit": "bytes/s of frames (header + payload) sent and drained",
        "contenders": names,
        "trial_seconds": None if quick else TRIAL_SECONDS,
        "compiled_missing": _core.cython_core is None,
        "strace": trace,
        "results": results,
    }


def _run_workload(
    workload: Workload,
    path: str,
    names: Sequence[str],
    quick: bool,
    repetitions: int,
    trace: bool,
) -> dict[str, Any]:
    payload = bytes(workload.payload_bytes)
    wire_size = workload.payload_bytes + HEADER.size
    frames = {
        name: _trial_frames(name, path, payload, workload, quick) for name in names
    }
    trials = {
        name: (
            lambda name=name: send_frames(
                name, path, payload, frames[name], workload.burst
            )
        )
        for name in names
    }
    seconds = measure.run_interleaved(trials, repetitions)
    throughput = {
        name: measure.rates(frames[name] * wire_size, v) for name, v in seconds.items()
    }
    frame_rates = {name: measure.rates(frames[name], v) for name, v in seconds.items()}
    ratios = {
        f"{a}/naive": measure.paired_ratio(throughput[a], throughput["naive"])
        for a in names
        if a != "naive"
    }
    traced_frames = workload.frames_quick if quick else workload.frames_traced
    return {
        "payload_bytes": workload.payload_bytes,
        "burst": workload.burst,
        "frames_per_trial": frames,
        "bytes_per_s": {name: measure.summarize(v) for name, v in throughput.items()},
        "frames_per_s": {name: measure.summarize(v) for name, v in frame_rates.items()},
        "ratios": ratios,
        "syscalls_per_frame_strace": (
            _strace_per_frame(workload, path, names, traced_frames) if trace else None
        ),
        "calls_per_frame_python": _python_calls_per_frame(
            workload, path, names, traced_frames
        ),
    }


def _trial_frames(
    name: str, path: str, payload: bytes, workload: Workload, quick: bool
) -> int:
    if quick:
        return workload.frames_quick
    return measure.calibrate(
        lambda frames: send_frames(name, path, payload, frames, workload.burst),
        workload.frames_quick,
        TRIAL_SECONDS,
        MAX_TRIAL_BYTES // (len(payload) + HEADER.size),
    )


def _strace_per_frame(
    workload: Workload, path: str, names: Sequence[str], frames: int
) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for name in names:

        def command(units: int, name: str = name) -> list[str]:
            return measure.child_command(
                "write", path, "--contender", name,
                "--payload", str(workload.payload_bytes),
                "--frames", str(units), "--burst", str(workload.burst),
            )  # fmt: skip

        counts[name] = syscalls.strace_per_unit(command, frames)
    return counts


def _python_calls_per_frame(
    workload: Workload, path: str, names: Sequence[str], frames: int
) -> dict[str, Any]:
    # The compiled core issues its calls from C, where the wrappers see nothing.
    counts: dict[str, Any] = {}
    payload = bytes(workload.payload_bytes)
    for name in names:
        if name == "compiled":
            counts[name] = None
            continue
        with syscalls.count_python_calls() as calls:
            send_frames(name, path, payload, frames, workload.burst)
        # The trial's own shutdown-and-acknowledge exchange is not per frame.
        calls["recv"] -= 1
        by_call = {k: v / frames for k, v in sorted(calls.items()) if v}
        counts[name] = {"all": sum(by_call.values()), "by_call": by_call}
    return counts
