"""A scripted VMM socket for client tests.

Each accepted connection runs a handler in its own thread with the blocking
server-side socket.  Handlers use the helpers below to answer the handshake
and replay frames, so a test states exactly what the guest side does.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable

from fcvsock.protocol import FrameType, encode_exit

Handler = Callable[[socket.socket], None]

OK_REPLY = b"OK 1073741824\n"


def frame(frame_type: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BI", frame_type, len(payload)) + payload


def exit_frame(code: int, signal: int | None = None) -> bytes:
    return frame(FrameType.EXIT, encode_exit(code, signal))


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


def accept_start(conn: socket.socket, reply: bytes = OK_REPLY) -> tuple[bytes, tuple[int, bytes]]:
    """Read the CONNECT line, reply, and read the first frame."""
    line = read_line(conn)
    conn.sendall(reply)
    return line, read_frame(conn)


class ScriptedPeer:
    """Listen at ``path`` and run ``handler`` for every connection."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self.connections = 0
        self.errors: list[BaseException] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.path)
        self._server.listen(128)
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except (OSError, EOFError):
            pass
        except BaseException as exc:  # reported by close()
            self.errors.append(exc)

    def close(self) -> None:
        self._closed.set()
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=10)
        for conn in self._conns:
            conn.close()
        self._acceptor.join(timeout=10)
        if os.path.exists(self.path):
            os.unlink(self.path)
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> ScriptedPeer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
