"""Listening sockets, and the seqpacket channels that hand over host sockets."""

from __future__ import annotations

import array
import asyncio
import errno
import functools
import json
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .server import Agent

log = logging.getLogger("fcvsock.agent")

_ACCEPTS_PER_EVENT = 16
_ACCEPT_RETRY_DELAY = 0.5
# Firecracker's vsock muxer keeps at most 1023 connections (MAX_CONNECTIONS in
# src/vmm/src/devices/virtio/vsock/unix/mod.rs), so a burst of them all fits.
_LISTEN_BACKLOG = 1024
_HANDOFF_MAX_FDS = 16
_HANDOFF_MAX_MESSAGE = 4096
_HANDOFF_MESSAGES_PER_EVENT = 32


# Listeners.


class _Listener:
    """Accepts connections on a listening socket and passes each on."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_accept: Callable[[socket.socket], None],
        path: str | None = None,
    ) -> None:
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._on_accept = on_accept
        self._path = path
        self._retry: asyncio.TimerHandle | None = None
        loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self._path is not None:
            _unlink_quietly(self._path)

    def _on_readable(self) -> None:
        for _ in range(_ACCEPTS_PER_EVENT):
            try:
                connection, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._on_accept_error(exc)
                return
            self._on_accept(connection)

    def _on_accept_error(self, exc: OSError) -> None:
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.warning("accept failed: %s", exc)
            return
        # The pending connection stays readable, so pause instead of spinning.
        log.warning("accept failed: %s; retrying in %g s", exc, _ACCEPT_RETRY_DELAY)
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(_ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self._loop.add_reader(self._sock.fileno(), self._on_readable)


def _listen_unix(path: str, sock_type: socket.SocketKind) -> socket.socket:
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, sock_type)
    try:
        sock.bind(path)
        sock.listen(_LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(
            errno.EEXIST, "listen: path exists and is not a socket", path
        )
    os.unlink(path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        log.debug("remove %s: %s", path, exc)


# Handoff of pre-connected sockets.


class _HandoffChannel:
    """A seqpacket connection over which a VMM stand-in hands over host sockets.

    Each message carries one fd in SCM_RIGHTS and ``{"host_port": N, ...}``
    as UTF-8 JSON, and the agent writes the optional ``"reply"`` text to
    the socket before any frame.  When the agent closes that host socket it
    replies with ``{"closed": N}`` on this connection.
    """

    def __init__(
        self, agent: Agent, loop: asyncio.AbstractEventLoop, sock: socket.socket
    ) -> None:
        sock.setblocking(False)
        self._agent = agent
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._replies: deque[bytes] = deque()
        self._writing = False
        self.closed = False
        loop.add_reader(self._fd, self._on_readable)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._replies.clear()
        self._sock.close()
        self._agent._handoff_closed(self)

    def _on_readable(self) -> None:
        for _ in range(_HANDOFF_MESSAGES_PER_EVENT):
            if self.closed:
                return
            try:
                message, ancdata, flags, _ = self._sock.recvmsg(
                    _HANDOFF_MAX_MESSAGE,
                    socket.CMSG_SPACE(_HANDOFF_MAX_FDS * 4),
                    socket.MSG_CMSG_CLOEXEC,
                )
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError as exc:
                # Linux sets ECONNRESET on the peer of a Unix seqpacket socket
                # closed with messages unread (unix_release_sock in
                # net/unix/af_unix.c).  A stopping VMM stand-in does that when
                # it leaves the last {"closed": N} replies unread.
                log.debug("handoff: the peer closed the channel: %s", exc)
                self.close()
                return
            except OSError as exc:
                log.warning("handoff: receive failed: %s", exc)
                self.close()
                return
            fds = _received_fds(ancdata)
            if not message and not fds:
                self.close()
                return
            self._take_connection(message, fds, flags)

    def _take_connection(self, message: bytes, fds: list[int], flags: int) -> None:
        host_port: int | None = None
        try:
            document = _parse_handoff_payload(message, flags)
            host_port = _integer_field(document, "host_port")
            if host_port is None:
                raise ValueError("host_port is missing")
            _integer_field(document, "guest_port")
            reply = _reply_field(document)
            _check_handoff_fds(fds, flags)
            sock = _stream_socket(fds[0])
        except (ValueError, OSError) as exc:
            log.warning(
                "handoff: dropping message for host port %s: %s", host_port, exc
            )
            for fd in fds:
                os.close(fd)
            # The sender counts this connection as live until it reads the reply.
            if host_port is not None and fds:
                self._reply_closed(host_port)
            return
        on_close = functools.partial(self._reply_closed, host_port)
        self._agent.serve_connection(sock, on_close=on_close, reply=reply)

    def _reply_closed(self, host_port: int) -> None:
        if self.closed:
            return
        self._replies.append(json.dumps({"closed": host_port}).encode())
        self._send_replies()

    def _send_replies(self) -> None:
        while self._replies:
            try:
                self._sock.send(self._replies[0])
            except (BlockingIOError, InterruptedError):
                self._set_writing(True)
                return
            except OSError as exc:
                log.debug("handoff: reply failed: %s", exc)
                self.close()
                return
            self._replies.popleft()
        self._set_writing(False)

    def _set_writing(self, writing: bool) -> None:
        if writing == self._writing:
            return
        if writing:
            self._loop.add_writer(self._fd, self._send_replies)
        else:
            self._loop.remove_writer(self._fd)
        self._writing = writing


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            whole = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:whole]))
    return fds


def _check_handoff_fds(fds: list[int], flags: int) -> None:
    if flags & socket.MSG_CTRUNC:
        raise ValueError(f"expected 1 fd, got more than {_HANDOFF_MAX_FDS}")
    if len(fds) != 1:
        raise ValueError(f"expected 1 fd, got {len(fds)}")


def _parse_handoff_payload(message: bytes, flags: int) -> dict[str, object]:
    """Return the JSON object of a handoff message; raise ``ValueError`` if invalid."""
    if flags & socket.MSG_TRUNC:
        raise ValueError(f"payload is longer than {_HANDOFF_MAX_MESSAGE} bytes")
    try:
        document = json.loads(message)
    except ValueError as exc:
        raise ValueError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, got {document!r}")  # noqa: TRY004
    return document


def _integer_field(document: dict[str, object], name: str) -> int | None:
    """Return field ``name``, or ``None`` if absent; it must be an integer."""
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")  # noqa: TRY004
    return value


def _reply_field(document: dict[str, object]) -> bytes:
    """Return the ``"reply"`` string encoded as UTF-8, or ``b""`` if absent."""
    reply = document.get("reply", "")
    if not isinstance(reply, str):
        raise ValueError(f"reply must be a string, got {reply!r}")  # noqa: TRY004
    try:
        return reply.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"reply is not valid UTF-8 text: {exc}") from None


def _stream_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"expected a stream socket, got {sock.type!r}")
    return sock
