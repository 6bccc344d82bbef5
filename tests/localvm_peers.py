"""Both ends of a stand-in VM's streams, driven with blocking Unix sockets.

The host side speaks the hybrid-vsock handshake by hand, and a guest
service is a plain listening socket that the test accepts from itself, so
one thread drives both ends without relying on the fcvsock client.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

from fcvsock._core import FrameDecoder, encode_frame
from fcvsock.protocol import FrameType, StartRequest

T = TypeVar("T")

TIMEOUT = 10.0


def connect_host(uds_path: str, timeout: float = TIMEOUT) -> socket.socket:
    """Connect to the VMM socket, with a deadline on every later call."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(uds_path)
    except OSError:
        sock.close()
        raise
    return sock


def read_line(sock: socket.socket, limit: int = 64) -> bytes:
    """Read up to and including LF, one byte at a time; b"" on EOF."""
    line = b""
    while not line.endswith(b"\n") and len(line) < limit:
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def handshake(uds_path: str, command: bytes) -> tuple[socket.socket, bytes]:
    """Connect, send ``command`` in one write, return the socket and reply line."""
    sock = connect_host(uds_path)
    sock.sendall(command)
    return sock, read_line(sock)


def end_of_stream(sock: socket.socket) -> str:
    """Read until the stream ends; return ``"eof"`` or ``"reset"`` (ECONNRESET)."""
    try:
        read_to_eof(sock)
    except ConnectionResetError:
        return "reset"
    return "eof"


def read_to_eof(sock: socket.socket) -> bytes:
    """Read until EOF and return every byte."""
    chunks: list[bytes] = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def wait_queued(sock: socket.socket, count: int) -> bytes:
    """Wait until ``count`` bytes are readable; return them without reading."""
    queued: bytes = sock.recv(count, socket.MSG_PEEK | socket.MSG_WAITALL)
    return queued


def wait_for(predicate: Callable[[], T], timeout: float = TIMEOUT) -> T:
    """Poll ``predicate`` until it returns a true value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"wait for {predicate!r}: still false after {timeout} s")
        time.sleep(0.005)


def open_fd_count() -> int:
    """Number of file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def child_pids() -> set[int]:
    """Process ids of this process's living children."""
    pids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as children:
            pids.update(int(pid) for pid in children.read().split())
    return pids


def process_exited(pid: int) -> bool:
    """Return whether ``pid`` has exited: a zombie or no process at all."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except FileNotFoundError:
        return True
    return fields[0] == "Z"


class GuestService:
    """A guest port's service: a Unix stream listener the test accepts from."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(64)
        self.listener.settimeout(TIMEOUT)
        self.accepted: list[socket.socket] = []

    def accept(self) -> socket.socket:
        """Return the next connection the muxer opened to this service."""
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        self.accepted.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.listener.close()
        os.unlink(self.path)


def start_frames(cmd: list[str]) -> bytes:
    """START for ``cmd`` followed by EOF, as one buffer."""
    start: bytes = encode_frame(FrameType.START, StartRequest(cmd=cmd).encode())
    end: bytes = encode_frame(FrameType.EOF)
    return start + end


def read_session(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Read frames until EXIT (inclusive) or EOF."""
    decoder = FrameDecoder()
    frames: list[tuple[int, bytes]] = []
    while not frames or frames[-1][0] != FrameType.EXIT:
        chunk = sock.recv(65536)
        if not chunk:
            break
        frames += decoder.feed(chunk)
    return frames
