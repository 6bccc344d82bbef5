"""Handshake latency and system calls: fcvsock against a byte-at-a-time reader.

Both connect to a stand-in VM, send ``CONNECT 52\\n`` and read ``OK <n>\\n``.
``fcvsock`` is :func:`fcvsock.handshake.connect_blocking`, which polls and
then reads the reply with one ``recv``.  ``bytewise`` calls ``recv(1)`` until
the line feed on a blocking socket, the simplest correct reader and a common
one in vsock clients.  ``SO_RCVTIMEO`` bounds its reads without adding calls.
A trial runs ``count`` handshakes back to back, closing each socket.
"""

from __future__ import annotations

import socket
import struct
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks import measure, standin, syscalls
from fcvsock.handshake import connect_blocking

PORT = 52
MAX_REPLY = 32
RECEIVE_TIMEOUT = struct.pack("ll", 10, 0)
FULL_COUNT = 300
QUICK_COUNT = 10
TRACED_COUNT = 200
# Every call after CONNECT is sent, up to the reply: reads and waits.
REPLY_CALLS = syscalls.IO_CALLS - {"write", "writev", "sendto", "sendmsg"}
PYTHON_REPLY_CALLS = {"recv", "recv_into", "recvmsg", "read", "readv", "poll"}


def connect_fcvsock(path: str, port: int) -> socket.socket:
    return connect_blocking(path, port, timeout=10.0).sock


def connect_bytewise(path: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, RECEIVE_TIMEOUT)
    try:
        sock.connect(path)
        sock.sendall(b"CONNECT %d\n" % port)
        reply = bytearray()
        while not reply.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte or len(reply) >= MAX_REPLY:
                raise RuntimeError(
                    f"handshake: expected 'OK <port>\\n', got {bytes(reply)!r}"
                )
            reply += byte
        if not reply.startswith(b"OK "):
            raise RuntimeError(
                f"handshake: expected 'OK <port>\\n', got {bytes(reply)!r}"
            )
    except BaseException:
        sock.close()
        raise
    return sock


READERS: dict[str, Callable[[str, int], socket.socket]] = {
    "fcvsock": connect_fcvsock,
    "bytewise": connect_bytewise,
}


def _trial(
    connect: Callable[[str, int], socket.socket], path: str, count: int
) -> float:
    start = time.perf_counter()
    for _ in range(count):
        connect(path, PORT).close()
    return time.perf_counter() - start


def run(quick: bool, repetitions: int, trace: bool) -> dict[str, Any]:
    """Measure latency per handshake and system calls per handshake."""
    count = QUICK_COUNT if quick else FULL_COUNT
    traced = QUICK_COUNT if quick else TRACED_COUNT
    with (
        tempfile.TemporaryDirectory(prefix="fcvsock-bench-") as directory,
        standin.stand_in_vms(directory, 1) as (path,),
    ):
        trials = {
            name: (lambda connect=connect: _trial(connect, path, count))
            for name, connect in READERS.items()
        }
        seconds = measure.run_interleaved(trials, repetitions)
        strace_counts = _strace(path, traced) if trace else None
        python_counts = _python_counts(path, traced)
    latency = {name: [s / count for s in values] for name, values in seconds.items()}
    return {
        "unit": "seconds per handshake",
        "stand_in": standin.kind(),
        "handshakes_per_trial": count,
        "latency_s": {name: measure.summarize(v) for name, v in latency.items()},
        "ratios": {
            "fcvsock/bytewise latency": measure.paired_ratio(
                latency["fcvsock"], latency["bytewise"]
            )
        },
        "syscalls_per_handshake_strace": strace_counts,
        "calls_per_handshake_python": python_counts,
    }


def _strace(path: str, traced: int) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for name in READERS:

        def command(units: int, name: str = name) -> list[str]:
            return measure.child_command(
                "handshake", path, "--reader", name, "--count", str(units)
            )

        summary = syscalls.strace_per_unit(command, traced)
        summary["reply_read"] = sum(
            v for k, v in summary["by_call"].items() if k in REPLY_CALLS
        )
        counts[name] = summary
    return counts


def _python_counts(path: str, traced: int) -> dict[str, Any]:
    counts: dict[str, Any] = {}
    for name, connect in READERS.items():
        with syscalls.count_python_calls() as calls:
            for _ in range(traced):
                connect(path, PORT).close()
        by_call = {k: v / traced for k, v in sorted(calls.items()) if v}
        counts[name] = {
            "all": sum(by_call.values()),
            "reply_read": sum(v for k, v in by_call.items() if k in PYTHON_REPLY_CALLS),
            "by_call": by_call,
        }
    return counts
