"""Measure stream throughput through the stand-in VM's two data paths.

Run ``python tests/localvm_throughput.py [MiB] [repeat]`` (default 512 MiB,
5 runs).  It prints the median and best rate of: the agent streaming
``head -c`` output over the handoff path and over the relay path (frame
headers included), the relay alone (a guest thread writes zeros, no agent),
and a plain Unix socket pair as the ceiling.  The numbers depend on the
machine and its load.  They compare paths and are not targets.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from localvm_peers import GuestService, handshake, start_frames

from fcvsock.localvm import LocalVM

CHUNK = 1024 * 1024


def count_to_eof(sock: socket.socket) -> int:
    buffer = bytearray(CHUNK)
    total = 0
    while True:
        count = sock.recv_into(buffer)
        if not count:
            return total
        total += count


def agent_stream(vm: LocalVM, size: int) -> int:
    host, reply = handshake(vm.uds_path, b"CONNECT 52\n")
    if not reply.startswith(b"OK "):
        raise RuntimeError(f"agent stream: expected an OK reply, got {reply!r}")
    with host:
        host.sendall(start_frames(["head", "-c", str(size), "/dev/zero"]))
        return count_to_eof(host)


def write_zeros(sock: socket.socket, size: int) -> None:
    block = bytes(CHUNK)
    with sock:
        for _ in range(size // CHUNK):
            sock.sendall(block)


def relay_stream(vm: LocalVM, guest: GuestService, size: int) -> int:
    host, _ = handshake(vm.uds_path, b"CONNECT 1000\n")
    writer = threading.Thread(target=write_zeros, args=(guest.accept(), size))
    writer.start()
    with host:
        received = count_to_eof(host)
    writer.join()
    return received


def pair_stream(size: int) -> int:
    reader, writer_end = socket.socketpair()
    writer = threading.Thread(target=write_zeros, args=(writer_end, size))
    writer.start()
    with reader:
        received = count_to_eof(reader)
    writer.join()
    return received


def report(name: str, run: Callable[[], int], repeat: int) -> None:
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        received = run()
        rates.append(received / (time.perf_counter() - started) / 1e6)
    rates.sort()
    median = rates[len(rates) // 2]
    print(
        f"{name:30s} {received / 2**20:6.0f} MiB x{repeat}  "
        f"median {median:6.0f} MB/s  best {rates[-1]:6.0f} MB/s"
    )


def main() -> None:
    size = int(sys.argv[1]) * 2**20 if len(sys.argv) > 1 else 512 * 2**20
    repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory(prefix="lvm-") as state:
        guest = GuestService(os.path.join(state, "guest.sock"))
        with LocalVM(os.path.join(state, "vm.sock")) as vm:
            vm.listen(1000, guest.path)
            report("agent, handoff", lambda: agent_stream(vm, size), repeat)
            vm.agent_data_path = "relay"
            report("agent, relay", lambda: agent_stream(vm, size), repeat)
            report("relay only, no agent", lambda: relay_stream(vm, guest, size), repeat)
        guest.close()
    report("socketpair, no VM", lambda: pair_stream(size), repeat)


if __name__ == "__main__":
    main()
