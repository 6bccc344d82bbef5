"""Receive throughput over a Unix socket, one sender process per frame size.

The sender (``benchmarks.child sender``) pre-builds its frames and writes the
same bytes to every connection.  Each receiver connects, starts the clock,
reads ``frames`` frames and stops the clock:

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
import select
import socket
import struct
import tempfile
import time
from types import ModuleType
from typing import Any

from benchmarks import measure
from benchmarks.child import HEADER
from fcvsock import _core

SIZES = [64, 4096, 64 * 1024, 1024 * 1024, 16 * 1024 * 1024]
# Wire bytes per trial: enough for ~0.1 s at the fastest contender here.
FULL_VOLUME = {64: 24_000_000, 4096: 160_000_000}
FULL_DEFAULT_VOLUME = 512 * 1024 * 1024
QUICK_VOLUME = 2 * 1024 * 1024
RAW_BUFFER_SIZE = 1024 * 1024
# Frames per sendall() in the sender: many small frames, or one large one.
SENDER_BLOB_BYTES = 1024 * 1024
_HEADER = struct.Struct("<BI")


def frame_count(payload_size: int, quick: bool) -> int:
    """Return how many frames one trial receives at this payload size."""
    wire_size = payload_size + HEADER.size
    volume = (
        QUICK_VOLUME if quick else FULL_VOLUME.get(payload_size, FULL_DEFAULT_VOLUME)
    )
    frames = max(1, volume // wire_size)
    per_blob = max(1, SENDER_BLOB_BYTES // wire_size)
    if frames > per_blob:
        frames -= frames % per_blob
    return frames


def receive_with_core(
    core: ModuleType, path: str, frames: int, payload_size: int
) -> float:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
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
        "contenders": list(receivers),
        "compiled_missing": _core.cython_core is None,
        "results": results,
    }


def _run_size(
    path: str, size: int, quick: bool, repetitions: int, receivers: dict[str, Any]
) -> dict[str, Any]:
    frames = frame_count(size, quick)
    wire_bytes = frames * (size + HEADER.size)
    arguments = ["--payload", str(size), "--frames", str(frames)]
    arguments += ["--blob-bytes", str(SENDER_BLOB_BYTES)]
    with measure.server_child("sender", path, *arguments):
        trials = {
            name: (lambda receiver=receiver: receiver(path, frames, size))
            for name, receiver in receivers.items()
        }
        seconds = measure.run_interleaved(trials, repetitions)
    throughput = {
        name: measure.rates(wire_bytes, values) for name, values in seconds.items()
    }
    frame_rates = {
        name: measure.rates(frames, values) for name, values in seconds.items()
    }
    ratios = {
        f"{a}/{b}": measure.paired_ratio(throughput[a], throughput[b])
        for a in throughput
        for b in throughput
        if a != b
    }
    return {
        "payload_bytes": size,
        "frames": frames,
        "wire_bytes": wire_bytes,
        "bytes_per_s": {name: measure.summarize(v) for name, v in throughput.items()},
        "frames_per_s": {name: measure.summarize(v) for name, v in frame_rates.items()},
        "ratios": ratios,
    }
