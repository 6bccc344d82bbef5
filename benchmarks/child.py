"""Roles the benchmarks run in child processes: ``python -m benchmarks.child ROLE``.

Every server role listens on a Unix socket path, writes ``ready`` to stdout
once it accepts connections, and exits when its stdin reaches EOF, so the
parent stops it by closing the pipe and never has to signal it.  Workload
roles print one JSON object to stdout and exit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("<BI")
STDOUT_TYPE = 0x10
# A u64 count: frames a receiver requests from a sender, bytes a drain received.
COUNT = struct.Struct("<Q")
# One recv on a Unix stream socket returns at most the sender's SO_SNDBUF
# (net.core.wmem_default, 208 KiB unless raised), so 1 MiB never limits it.
DRAIN_BUFFER_SIZE = 1024 * 1024


def build_frames(payload_size: int, count: int) -> bytes:
    """Return ``count`` STDOUT frames of ``payload_size`` bytes, back to back."""
    payload = bytes(range(256)) * (payload_size // 256) + bytes(payload_size % 256)
    return (HEADER.pack(STDOUT_TYPE, payload_size) + payload) * count


def _announce_ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


def _listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


def _serve(path: str, handle: Callable[[socket.socket], None]) -> None:
    """Accept connections one at a time until stdin reaches EOF."""
    listener = _listen(path)
    _announce_ready()
    stdin_fd = sys.stdin.fileno()
    try:
        while True:
            readable, _, _ = select.select([listener, stdin_fd], [], [])
            if stdin_fd in readable and not os.read(stdin_fd, 4096):
                return
            if listener in readable:
                conn, _ = listener.accept()
                with conn:
                    try:
                        handle(conn)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
    finally:
        listener.close()
        os.unlink(path)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = conn.recv(size - len(received))
        if not chunk:
            raise ConnectionResetError("peer closed before sending a frame count")
        received += chunk
    return received


def run_sender(args: argparse.Namespace) -> None:
    """Send each connection the number of frames it requests, then close it.

    The receiver sends the count (``COUNT``) right after connecting.
    """
    wire_size = args.payload + HEADER.size
    blob_frames = max(1, args.blob_bytes // wire_size)
    blob = build_frames(args.payload, blob_frames)
    view = memoryview(blob)

    def send_frames(conn: socket.socket) -> None:
        (frames,) = COUNT.unpack(_receive_exactly(conn, COUNT.size))
        for _ in range(frames // blob_frames):
            conn.sendall(blob)
        conn.sendall(view[: (frames % blob_frames) * wire_size])

    _serve(args.path, send_frames)


def run_drain(args: argparse.Namespace) -> None:
    """Read every connection to EOF, then send back the byte count."""
    buffer = bytearray(DRAIN_BUFFER_SIZE)

    def drain(conn: socket.socket) -> None:
        total = 0
        while True:
            count = conn.recv_into(buffer)
            if not count:
                break
            total += count
        conn.sendall(COUNT.pack(total))

    _serve(args.path, drain)


def _hold_connections(listener: socket.socket) -> None:
    # A guest service that accepts and then waits for the host to close.
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_read_to_eof, args=(conn,), daemon=True).start()


def _read_to_eof(conn: socket.socket) -> None:
    with conn:
        while conn.recv(65536):
            pass


def run_vms(args: argparse.Namespace) -> None:
    """Start ``count`` stand-in VMs in ``directory``; close them on stdin EOF."""
    from fcvsock.localvm import LocalVM

    vms = []
    listeners = []
    try:
        for index in range(args.count):
            uds_path = os.path.join(args.directory, f"vm{index}.sock")
            vm = LocalVM(uds_path, agent=not args.no_agent).start()
            vms.append(vm)
            if args.no_agent:
                service_path = os.path.join(args.directory, f"guest{index}.sock")
                listener = _listen(service_path)
                listeners.append(listener)
                threading.Thread(
                    target=_hold_connections, args=(listener,), daemon=True
                ).start()
                vm.listen(52, service_path)
        _announce_ready()
        while os.read(sys.stdin.fileno(), 4096):
            pass
    finally:
        for listener in listeners:
            listener.close()
        for vm in vms:
            vm.close()


def run_vmm(args: argparse.Namespace) -> None:
    """Reply ``OK <n>`` to ``CONNECT <port>`` and hold each connection.

    A minimal emulated VMM, used only when :mod:`fcvsock.localvm` is missing.
    """
    listener = _listen(args.path)
    _announce_ready()
    next_port = 1 << 30
    stdin_fd = sys.stdin.fileno()
    try:
        while True:
            readable, _, _ = select.select([listener, stdin_fd], [], [])
            if stdin_fd in readable and not os.read(stdin_fd, 4096):
                return
            if listener in readable:
                conn, _ = listener.accept()
                line = conn.recv(64)
                if line.startswith(b"CONNECT ") and line.endswith(b"\n"):
                    conn.sendall(b"OK %d\n" % next_port)
                    next_port += 1
                    threading.Thread(
                        target=_read_to_eof, args=(conn,), daemon=True
                    ).start()
                else:
                    conn.close()
    finally:
        listener.close()
        os.unlink(args.path)


def run_write(args: argparse.Namespace) -> None:
    """Send ``frames`` frames to a drain server with one writer, for strace."""
    from benchmarks import write

    payload = bytes(args.payload)
    write.send_frames(args.contender, args.path, payload, args.frames, args.burst)
    json.dump({"frames": args.frames}, sys.stdout)


def run_handshake(args: argparse.Namespace) -> None:
    """Do ``count`` handshakes with one reply reader, for strace."""
    from benchmarks import handshake

    connect = handshake.READERS[args.reader]
    for _ in range(args.count):
        connect(args.path, args.port).close()
    json.dump({"handshakes": args.count}, sys.stdout)


def _rss_bytes() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("read /proc/self/status: no VmRSS line")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("read /proc/self/status: no VmHWM line")


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class _RssSampler(threading.Thread):
    """Record (seconds since start, VmRSS bytes) every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.stop_event.is_set():
            elapsed = round(time.perf_counter() - self.start_time, 4)
            self.samples.append((elapsed, _rss_bytes()))
            self.stop_event.wait(self.interval)


def run_stream(args: argparse.Namespace) -> None:
    """Stream ``head -c BYTES /dev/zero`` from a stand-in VM and report RSS."""
    import fcvsock
    from fcvsock import _core

    command = ["head", "-c", str(args.bytes), "/dev/zero"]
    rss_before = _rss_bytes()
    hwm_reset = _reset_peak_rss()
    sampler = _RssSampler(args.sample_interval)
    sampler.start()
    received = 0
    chunks = 0
    exit_code = None
    start = time.perf_counter()
    for item in fcvsock.stream(args.path, command, timeout=args.timeout):
        if isinstance(item, fcvsock.Output):
            received += len(item.data)
            chunks += 1
            if args.sleep and chunks % args.sleep_every == 0:
                time.sleep(args.sleep)
        else:
            exit_code = item.exit_code
    elapsed = time.perf_counter() - start
    sampler.stop_event.set()
    sampler.join()
    result: dict[str, Any] = {
        "core": _core.core_impl,
        "bytes": received,
        "chunks": chunks,
        "seconds": elapsed,
        "exit_code": exit_code,
        "rss_before": rss_before,
        "rss_peak_sampled": max(rss for _, rss in sampler.samples),
        "rss_peak_hwm": _peak_rss_bytes() if hwm_reset else None,
        "maxrss_getrusage": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_samples": sampler.samples,
    }
    json.dump(result, sys.stdout)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.child")
    roles = parser.add_subparsers(dest="role", required=True)

    sender = roles.add_parser("sender", help="send pre-built frames")
    sender.add_argument("path")
    sender.add_argument("--payload", type=int, required=True)
    sender.add_argument("--blob-bytes", type=int, default=1024 * 1024)
    sender.set_defaults(run=run_sender)

    drain = roles.add_parser("drain", help="read connections to EOF")
    drain.add_argument("path")
    drain.set_defaults(run=run_drain)

    vms = roles.add_parser("vms", help="host stand-in VMs")
    vms.add_argument("directory")
    vms.add_argument("--count", type=int, default=1)
    vms.add_argument("--no-agent", action="store_true")
    vms.set_defaults(run=run_vms)

    vmm = roles.add_parser("vmm", help="minimal handshake-only VMM")
    vmm.add_argument("path")
    vmm.set_defaults(run=run_vmm)

    write = roles.add_parser("write", help="send frames with one writer")
    write.add_argument("path")
    write.add_argument("--contender", required=True)
    write.add_argument("--payload", type=int, required=True)
    write.add_argument("--frames", type=int, required=True)
    write.add_argument("--burst", type=int, default=1)
    write.set_defaults(run=run_write)

    handshake = roles.add_parser("handshake", help="repeat one handshake reader")
    handshake.add_argument("path")
    handshake.add_argument("--reader", required=True)
    handshake.add_argument("--port", type=int, default=52)
    handshake.add_argument("--count", type=int, required=True)
    handshake.set_defaults(run=run_handshake)

    stream = roles.add_parser("stream", help="stream output and sample RSS")
    stream.add_argument("path")
    stream.add_argument("--bytes", type=int, required=True)
    stream.add_argument("--sleep", type=float, default=0.0)
    stream.add_argument("--sleep-every", type=int, default=1)
    stream.add_argument("--sample-interval", type=float, default=0.02)
    stream.add_argument("--timeout", type=float, default=600.0)
    stream.set_defaults(run=run_stream)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
