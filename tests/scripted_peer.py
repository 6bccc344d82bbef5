"""A scripted VMM socket for client tests.

Each accepted connection runs a handler in its own thread with the blocking
server-side socket.  Handlers use the helpers below to reply to the handshake
and replay frames, so a test states exactly what the guest side does.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import logging
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Self, TypeVar

from fcvsock.protocol import FrameType, encode_exit

Handler = Callable[[socket.socket], None]
T = TypeVar("T")

OK_REPLY = b"OK 1073741824\n"
HOST_PORT = 1073741824
# Every wait in a test ends after this long; nothing here takes close to it.
WAIT = 5.0
LOOP_KINDS = ["asyncio", "uvloop"]


def frame(frame_type: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BI", frame_type, len(payload)) + payload


def exit_frame(code: int, signal: int | None = None) -> bytes:
    return frame(FrameType.EXIT, encode_exit(code, signal))


def stdout_frame(data: bytes) -> bytes:
    return frame(FrameType.STDOUT, data)


def stderr_frame(data: bytes) -> bytes:
    return frame(FrameType.STDERR, data)


def read_line(conn: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return line


def read_exactly(conn: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = conn.recv(count - len(data))
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {count} bytes")
        data += chunk
    return data


def read_frame(conn: socket.socket) -> tuple[int, bytes]:
    frame_type, length = struct.unpack("<BI", read_exactly(conn, 5))
    return frame_type, read_exactly(conn, length)


def read_frames_until_eof(
    conn: socket.socket, frames: list[tuple[int, bytes]]
) -> None:
    """Append every frame the client sends to ``frames`` until it closes.

    A reset counts as a close: Linux resets a Unix stream when the other
    end closes with unread bytes in its receive queue.
    """
    while True:
        try:
            header = conn.recv(1, socket.MSG_PEEK)
        except ConnectionResetError:
            return
        if not header:
            return
        try:
            frames.append(read_frame(conn))
        except ConnectionResetError:
            return


def wait_until_eof(conn: socket.socket) -> None:
    """Discard what the client sends until it closes the connection."""
    while True:
        try:
            if not conn.recv(65536):
                return
        except ConnectionResetError:
            return


def wait_hangup(conn: socket.socket, timeout: float = WAIT) -> bool:
    """Wait until the client closes, without reading what it sent."""
    poller = select.poll()
    poller.register(conn, select.POLLRDHUP)
    return bool(poller.poll(timeout * 1000))


def accept_start(
    conn: socket.socket, reply: bytes = OK_REPLY
) -> tuple[bytes, tuple[int, bytes]]:
    """Read the CONNECT line, reply, and read the first frame."""
    line = read_line(conn)
    conn.sendall(reply)
    return line, read_frame(conn)


def wait_drained(conn: socket.socket, timeout: float = WAIT) -> None:
    """Wait until the client has read every byte sent on ``conn``.

    For a Unix stream socket SIOCOUTQ (the same number as TIOCOUTQ) counts
    the memory of sent buffers the receiver has not consumed yet.
    """
    deadline = time.monotonic() + timeout
    counter = bytearray(struct.pack("i", 0))
    while True:
        fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, counter)
        if struct.unpack("i", counter)[0] == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError("client did not read the bytes sent")
        time.sleep(0.001)


class Firehose:
    """A handler that sends STDOUT frames until the client stops reading.

    After the handshake and START it writes ``frame_size``-byte frames
    without blocking until the kernel buffers are full, stores the byte
    count in :attr:`sent` and sets :attr:`blocked`.  Then it waits for the
    client to close the connection.
    """

    def __init__(self, frame_size: int) -> None:
        self.frame = stdout_frame(b"x" * frame_size)
        self.pending = memoryview(b"")
        self.sent = 0
        self.blocked = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        accept_start(conn)
        self.sent = self._fill(conn)
        self.blocked.set()
        wait_until_eof(conn)

    def _fill(self, conn: socket.socket) -> int:
        conn.setblocking(False)
        sent = 0
        try:
            while True:
                if not self.pending:
                    self.pending = memoryview(self.frame)
                try:
                    count = conn.send(self.pending)
                except BlockingIOError:
                    return sent
                sent += count
                self.pending = self.pending[count:]
        finally:
            conn.setblocking(True)


class Agent:
    """A handler that plays a guest agent for one or more sessions.

    It replies to the handshake with ``reply``, reads the first frame, sends
    ``script`` (each item in its own write), and then records the client's
    frames until the client closes.  With ``close=True`` it closes right
    after the script instead.  ``wait_for`` delays the script until the
    client sent a frame of that type.
    """

    def __init__(
        self,
        *script: bytes,
        reply: bytes = OK_REPLY,
        close: bool = False,
        wait_for: int | None = None,
    ) -> None:
        self.script = script
        self.reply = reply
        self.close = close
        self.wait_for = wait_for
        self.line = b""
        self.frames: list[tuple[int, bytes]] = []
        self.started = threading.Event()
        self.client_closed = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        self.line = read_line(conn)
        conn.sendall(self.reply)
        self.frames.append(read_frame(conn))
        self.started.set()
        if self.wait_for is not None:
            while self.frames[-1][0] != self.wait_for:
                self.frames.append(read_frame(conn))
        for chunk in self.script:
            conn.sendall(chunk)
        if self.close:
            return
        read_frames_until_eof(conn, self.frames)
        self.client_closed.set()

    def frame_types(self) -> list[int]:
        return [frame_type for frame_type, _ in self.frames]

    def payloads(self, frame_type: int) -> list[bytes]:
        return [payload for kind, payload in self.frames if kind == frame_type]


class ScriptedPeer:
    """Listen at ``path`` and run ``handler`` for every connection.

    A connection is closed when its handler returns.
    """

    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self.connections = 0
        self.served = 0
        self.errors: list[BaseException] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(128)
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._changed:
                if self._closed.is_set():
                    conn.close()
                    return
                self.connections += 1
                self._conns.append(conn)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), daemon=True
                )
                thread.start()
                self._threads.append(thread)
                self._changed.notify_all()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except (OSError, EOFError):
            pass
        except BaseException as exc:  # noqa: BLE001 - re-raised by close()
            self.errors.append(exc)
        finally:
            conn.close()
            with self._changed:
                self.served += 1
                self._changed.notify_all()

    def wait_served(self, count: int, timeout: float = WAIT) -> None:
        """Wait until ``count`` connections were accepted and handled."""
        with self._changed:
            done = self._changed.wait_for(lambda: self.served >= count, timeout)
        if not done:
            raise TimeoutError(
                f"peer: {self.served} of {count} connections handled in time"
            )

    def close(self) -> None:
        with self._changed:
            self._closed.set()
        self._server.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=10)
        self._server.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=10)
        if os.path.exists(self.path):
            os.unlink(self.path)
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Peers:
    """Start peers for one test and close them all at its end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._peers: list[ScriptedPeer] = []

    def start(self, handler: Handler, path: str | None = None) -> ScriptedPeer:
        peer = ScriptedPeer(path or self.path, handler)
        self._peers.append(peer)
        return peer

    def close(self) -> None:
        """Close every peer; the kernel drops connections never accepted."""
        peers, self._peers = self._peers, []
        for peer in peers:
            peer.close()


def open_sockets() -> dict[str, str]:
    """Return the process's open socket fds with their inodes.

    Unreachable socket objects are collected first.  Other fds are left
    out because listing /proc/self/fd opens one itself.
    """
    gc.collect()
    sockets = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            sockets[fd] = target
    return sockets


def run_in_loop(loop_kind: str, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` in a new event loop of ``loop_kind``."""
    if loop_kind == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return asyncio.run(coroutine)


async def wait_event(event: threading.Event, timeout: float = WAIT) -> bool:
    """Wait for a thread's event from a coroutine without blocking the loop."""
    return await asyncio.to_thread(event.wait, timeout)


class RetryWatcher(logging.Handler):
    """Set :attr:`retried` when fcvsock logs a failed connection attempt."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.retried = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "attempt" in record.getMessage():
            self.retried.set()


@contextmanager
def watch_retries() -> Iterator[RetryWatcher]:
    logger = logging.getLogger("fcvsock.handshake")
    watcher = RetryWatcher()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)
