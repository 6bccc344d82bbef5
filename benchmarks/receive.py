"""Receive throughput over a Unix socket, one sender process per frame size.

The sender (``benchmarks.child sender``) pre-builds its frames once and
writes them to every connection.  Each receiver connects, requests a number
of frames, starts the clock, reads them and stops the clock.  The number is
calibrated per receiver, so that every trial lasts about ``TRIAL_SECONDS``:

- ``compiled`` and ``twin``: ``FrameDecoder.read_fd`` on a non-blocking
  socket with the default read budget, waiting in ``poll`` whenever a call
  returns no frame, as :class:`fcvsock.session.SessionCore` does;
- ``asyncio``: ``asyncio.open_unix_connection`` and ``readexactly`` for the
  header, then for the payload (default event loop and stream limit);
- ``raw``: ``recv_into`` on a blocking socket into one preallocated buffer of
  at least a frame, parsing nothing.  This is the ceiling for Python code.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import socket
import struct
import tempfile
import time
from types import ModuleType
from typing import Any

from benchmarks import measure
from benchmarks.child import COUNT, HEADER
from fcvsock import _core

SIZES = [64, 4096, 64 * 1024, 1024 * 1024, 16 * 1024 * 1024]
TRIAL_SECONDS = 0.3
MAX_TRIAL_BYTES = 4 << 30
QUICK_BYTES = 2 << 20
CALIBRATION_BYTES = 1 << 20
RAW_BUFFER_SIZE = 1024 * 1024
# Frames per sendall() in the sender: many small frames, or one large one.
SENDER_BLOB_BYTES = 1024 * 1024
_HEADER = struct.Struct("<BI")


def _frames_in(volume: int, payload_size: int) -> int:
    return max(1, volume // (payload_size + HEADER.size))


def _connect(path: str, frames: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(COUNT.pack(frames))
    return sock


def receive_with_core(
    core: ModuleType, path: str, frames: int, payload_size: int
) -> float:
    sock = _connect(path, frames)
    sock.setblocking(False)
    decoder = core.FrameDecoder()
    fd = sock.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    received = 0
    last: list[tuple[int, bytes]] = []
    start = time.perf_counter()
    while received < frames:
        batch = decoder.read_fd(fd)
        if batch:
            received += len(batch)
            last = batch
        elif decoder.at_eof:
            raise RuntimeError(f"receive: EOF after {received} of {frames} frames")
        else:
            poller.poll()
    elapsed = time.perf_counter() - start
    sock.close()
    _check_payload(last[-1][1], payload_size)
    return elapsed


def receive_raw(path: str, frames: int, payload_size: int) -> float:
    expected = frames * (payload_size + HEADER.size)
    buffer = bytearray(max(RAW_BUFFER_SIZE, payload_size + HEADER.size))
    view = memoryview(buffer)
    sock = _connect(path, frames)
    received = 0
    position = 0
    start = time.perf_counter()
    while received < expected:
        if position == len(buffer):
            position = 0
        count = sock.recv_into(view[position:])
        if not count:
            raise RuntimeError(f"receive: EOF after {received} of {expected} bytes")
        position += count
        received += count
    elapsed = time.perf_counter() - start
    sock.close()
    return elapsed


async def _receive_asyncio(path: str, frames: int, payload_size: int) -> float:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(COUNT.pack(frames))
    await writer.drain()
    payload = b""
    start = time.perf_counter()
    for _ in range(frames):
        header = await reader.readexactly(5)
        _, length = _HEADER.unpack(header)
        payload = await reader.readexactly(length)
    elapsed = time.perf_counter() - start
    writer.close()
    await writer.wait_closed()
    _check_payload(payload, payload_size)
    return elapsed


def receive_asyncio(path: str, frames: int, payload_size: int) -> float:
    return asyncio.run(_receive_asyncio(path, frames, payload_size))


def _check_payload(payload: bytes, payload_size: int) -> None:
    if len(payload) != payload_size:
        raise RuntimeError(
            f"receive: last payload has {len(payload)} bytes, expected {payload_size}"
        )


def contenders() -> dict[str, Any]:
    """Return the receivers, compiled core first when it is built."""
    table: dict[str, Any] = {}
    if _core.cython_core is not None:
        table["compiled"] = lambda *a: receive_with_core(_core.cython_core, *a)
    table["twin"] = lambda *a: receive_with_core(_core.python_core, *a)
    table["asyncio"] = receive_asyncio
    table["raw"] = receive_raw
    return table


def run(quick: bool, repetitions: int) -> dict[str, Any]:
    """Measure every receiver at every frame size."""
    receivers = contenders()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fcvsock-bench-") as directory:
        for size in SIZES:
            results[str(size)] = _run_size(
                os.path.join(directory, f"sender{size}.sock"),
                size,
                quick,
                repetitions,
                receivers,
            )
    return {
        "unit": "bytes/s of frames (header + payload) received",
        "sizes": SIZES,
        "trial_seconds": None if quick else TRIAL_SECONDS,
        "contenders": list(receivers),
        "compiled_missing": _core.cython_core is None,
        "results": results,
    }


def _run_size(
    path: str, size: int, quick: bool, repetitions: int, receivers: dict[str, Any]
) -> dict[str, Any]:
    with measure.server_child(
        "sender", path, "--payload", str(size), "--blob-bytes", str(SENDER_BLOB_BYTES)
    ):
        frames = {
            name: _trial_frames(receiver, path, size, quick)
            for name, receiver in receivers.items()
        }
        trials = {
            name: (lambda r=receiver, n=frames[name]: _measure_trial(r, path, n, size))
            for name, receiver in receivers.items()
        }
        outcomes = measure.run_interleaved(trials, repetitions)
    seconds = {name: [o[0] for o in values] for name, values in outcomes.items()}
    faults = {
        name: [o[1] / frames[name] for o in values] for name, values in outcomes.items()
    }
    wire_size = size + HEADER.size
    cpu_per_gb = {
        name: [o[2] / (frames[name] * wire_size / 1e9) for o in values]
        for name, values in outcomes.items()
    }
    throughput = {
        name: measure.rates(frames[name] * wire_size, values)
        for name, values in seconds.items()
    }
    frame_rates = {
        name: measure.rates(frames[name], values) for name, values in seconds.items()
    }
    ratios = {
        f"{a}/{b}": measure.paired_ratio(throughput[a], throughput[b])
        for a in throughput
        for b in throughput
        if a != b
    }
    return {
        "payload_bytes": size,
        "frames_per_trial": frames,
        "bytes_per_s": {name: measure.summarize(v) for name, v in throughput.items()},
        "frames_per_s": {name: measure.summarize(v) for name, v in frame_rates.items()},
        "minor_faults_per_frame": {
            name: measure.summarize(v) for name, v in faults.items()
        },
        "cpu_s_per_gb": {name: measure.summarize(v) for name, v in cpu_per_gb.items()},
        "ratios": ratios,
        "cpu_ratios": {
            f"{a}/{b}": measure.paired_ratio(cpu_per_gb[a], cpu_per_gb[b])
            for a in cpu_per_gb
            for b in cpu_per_gb
            if a != b
        },
    }


def _measure_trial(
    receiver: Any, path: str, frames: int, size: int
) -> tuple[float, int, float]:
    """Return wall seconds, minor faults and CPU seconds of one trial.

    Minor faults count memory the kernel had to map and zero.  CPU time
    (user + system) of this process depends less on other load than wall
    time does.
    """
    before = resource.getrusage(resource.RUSAGE_SELF)
    seconds = receiver(path, frames, size)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return seconds, after.ru_minflt - before.ru_minflt, cpu


def _trial_frames(receiver: Any, path: str, size: int, quick: bool) -> int:
    if quick:
        return _frames_in(QUICK_BYTES, size)
    return measure.calibrate(
        lambda frames: receiver(path, frames, size),
        _frames_in(CALIBRATION_BYTES, size),
        TRIAL_SECONDS,
        _frames_in(MAX_TRIAL_BYTES, size),
    )
