"""The hybrid-vsock handshake: ``CONNECT <port>\\n`` answered by ``OK <n>\\n``.

Firecracker and Cloud Hypervisor never say why a connection failed: a missing
socket file, a stale one, a guest port with no listener yet and a full
connection table all look like a refused connect or an EOF before the reply.
Those are retried with exponential backoff until one overall deadline, which
also bounds ``connect()`` and every read of the reply, because a VMM whose
guest driver is not up accepts and then says nothing at all.  A reply that is
not ``OK <digits>\\n`` means something else listens at the path; it is not
retried.

The reply is read with one ``recv`` where possible, not byte by byte; bytes
after the LF already belong to the guest stream and are returned with the
socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import re
import select
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import (
    ConnectFailedError,
    HandshakeError,
    HandshakeTimeoutError,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "Handshake",
    "check_guest_port",
    "check_timeout",
    "connect_async",
    "connect_blocking",
]

log = logging.getLogger("fcvsock.handshake")

DEFAULT_CONNECT_TIMEOUT = 30.0
# Firecracker considers at most 32 bytes of a CONNECT line.  A valid reply is
# at most "OK 4294967295\n" (14 bytes), so error messages quote 32 bytes.
MAX_REPLY = 32
# Enough to take the reply and a few guest frames in one recv.
_RECV_SIZE = 64 * 1024
_FIRST_BACKOFF = 0.005
_MAX_BACKOFF = 0.2
_REPLY = re.compile(rb"OK ([0-9]{1,10})\n")
_OK_PREFIX = re.compile(rb"(O|OK|OK [0-9]{0,10})")

# connect() errors that mean "the VMM or the guest is not ready yet".
_RETRY_ERRNOS = frozenset(
    {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ECONNRESET}
)


@dataclass
class Handshake:
    """A connected guest stream: the socket, and what the handshake left.

    ``host_port`` is the number the VMM put in its ``OK`` reply (opaque:
    Firecracker and Cloud Hypervisor assign one, vhost-device-vsock echoes
    the guest port).  ``initial_data`` contains guest bytes that arrived in the
    same read as the reply.  ``attempts`` counts connection attempts.
    """

    sock: socket.socket
    host_port: int
    initial_data: bytes
    attempts: int


class _NotReady(Exception):
    """One attempt failed in a way that retrying may fix."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def check_guest_port(port: int) -> int:
    """Return ``port`` if it is a valid u32 guest port, else raise."""
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"connect: guest port must be an int, got {port!r}")
    if not 0 <= port <= 0xFFFFFFFF:
        raise ValueError(f"connect: guest port must be in 0..4294967295, got {port}")
    return port


def check_timeout(timeout: float) -> float:
    """Return ``timeout`` if it is a number of seconds >= 0, else raise."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"connect: timeout must be a number, got {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"connect: timeout must be >= 0 seconds, got {timeout}")
    return timeout


def _connect_line(port: int) -> bytes:
    return b"CONNECT %d\n" % port


def _parse_reply(received: bytes) -> tuple[int, bytes] | None:
    """Return ``(host_port, rest)`` once the reply is complete, else None."""
    newline = received.find(b"\n", 0, MAX_REPLY)
    if newline < 0:
        # Another service may send a banner and then wait, so reject the
        # reply as soon as its bytes can no longer become a valid one.
        if not _OK_PREFIX.fullmatch(received):
            shown = received[:MAX_REPLY]
            raise HandshakeError(
                f"handshake: expected 'OK <port>\\n', got {shown!r}", shown
            )
        return None
    line = received[: newline + 1]
    match = _REPLY.fullmatch(line)
    if match is None or int(match.group(1)) > 0xFFFFFFFF:
        raise HandshakeError(
            f"handshake: expected 'OK <port>\\n', got {line!r}", line
        )
    return int(match.group(1)), received[newline + 1:]


def _ended_early(received: bytes) -> Exception:
    """Classify an EOF before the whole reply arrived."""
    if not received or _OK_PREFIX.fullmatch(received):
        return _NotReady(ConnectionResetError("connection closed before the reply"))
    return HandshakeError(
        f"handshake: expected 'OK <port>\\n', got {received!r} and then EOF",
        received,
    )


def _backoff_delays() -> Iterator[float]:
    delay = _FIRST_BACKOFF
    while True:
        yield delay
        delay = min(delay * 2, _MAX_BACKOFF)


def _give_up(
    uds_path: str, port: int, timeout: float, attempts: int,
    last_error: BaseException | None,
) -> HandshakeTimeoutError:
    cause = f": last error: {last_error}" if last_error else ""
    return HandshakeTimeoutError(
        f"connect to guest port {port} via {uds_path}: not ready within "
        f"{timeout:g} s after {attempts} attempt{'' if attempts == 1 else 's'}"
        f"{cause}",
        attempts,
        last_error,
    )


def _fatal_connect_error(
    uds_path: str, exc: OSError, attempts: int
) -> ConnectFailedError:
    reason = exc.strerror or str(exc)
    error = ConnectFailedError(f"connect to {uds_path}: {reason}", attempts)
    error.__cause__ = exc
    return error


def _not_a_socket(path: str) -> OSError | None:
    """Return an error if ``path`` exists and is not a socket, else None.

    Linux fails ``connect`` on a regular file or a directory with the same
    ECONNREFUSED as on a stale socket file, but only the latter can start
    working later.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISSOCK(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a regular file"
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        kind = "a special file"
    return OSError(errno.ENOTSOCK, f"path is {kind}, not a socket", path)


def _new_socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


# -- blocking -----------------------------------------------------------------


def connect_blocking(
    uds_path: str | os.PathLike[str],
    port: int,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Handshake:
    """Connect to ``port`` in the guest behind ``uds_path``, retrying.

    Return a :class:`Handshake` whose socket is non-blocking.  Raise
    :class:`HandshakeTimeoutError` when the deadline passes,
    :class:`HandshakeError` on a reply that is not ``OK <port>``, and
    :class:`ConnectFailedError` on errors that retrying cannot fix.
    """
    path = os.fspath(uds_path)
    check_guest_port(port)
    check_timeout(timeout)
    deadline = time.monotonic() + timeout
    attempts = 0
    last_error: BaseException | None = None
    for delay in _backoff_delays():
        attempts += 1
        try:
            sock, host_port, rest = _attempt_blocking(path, port, deadline)
        except _NotReady as not_ready:
            last_error = not_ready.cause
        except OSError as exc:
            raise _fatal_connect_error(path, exc, attempts) from exc
        else:
            return Handshake(sock, host_port, rest, attempts)
        log.debug("connect %s port %d attempt %d: %s", path, port, attempts, last_error)
        if deadline - time.monotonic() <= delay:
            # An attempt after the last sleep would have no time left to read
            # a reply, and its timeout would hide the real last error.
            break
        time.sleep(delay)
    raise _give_up(path, port, timeout, attempts, last_error) from last_error


def _attempt_blocking(
    path: str, port: int, deadline: float
) -> tuple[socket.socket, int, bytes]:
    sock = _new_socket()
    try:
        _connect_nonblocking(sock, path, deadline)
        _send_line(sock, _connect_line(port))
        host_port, rest = _read_reply_blocking(sock, deadline)
    except BaseException:
        sock.close()
        raise
    return sock, host_port, rest


def _connect_nonblocking(sock: socket.socket, path: str, deadline: float) -> None:
    try:
        sock.connect(path)
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            wrong_type = _not_a_socket(path)
            if wrong_type is not None:
                raise wrong_type from exc
        if exc.errno in _RETRY_ERRNOS:
            raise _NotReady(exc) from None
        raise
    # AF_UNIX connect completes at once or fails; EINPROGRESS does not occur.


def _send_line(sock: socket.socket, line: bytes) -> None:
    # Firecracker parses the line at the first readable event and drops a
    # partial one, so it must go out in one write.  A fresh socket's send
    # buffer always has room for it.  MSG_NOSIGNAL turns a write to a VMM that
    # already closed into EPIPE, so no SIGPIPE reaches the application.
    try:
        sent = sock.send(line, socket.MSG_NOSIGNAL)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise _NotReady(exc) from None
    if sent != len(line):
        raise _NotReady(BlockingIOError(errno.EAGAIN, "partial CONNECT line"))


def _read_reply_blocking(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    received = b""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise _NotReady(TimeoutError("no reply to CONNECT before the deadline"))
        try:
            chunk = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            continue
        except ConnectionResetError as exc:
            if received:
                raise _ended_early(received) from exc
            raise _NotReady(exc) from None
        if not chunk:
            raise _ended_early(received)
        received += chunk
        parsed = _parse_reply(received)
        if parsed is not None:
            return parsed


# -- asyncio ------------------------------------------------------------------


async def connect_async(
    uds_path: str | os.PathLike[str],
    port: int,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Handshake:
    """Asyncio twin of :func:`connect_blocking`, with the same errors."""
    path = os.fspath(uds_path)
    check_guest_port(port)
    check_timeout(timeout)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    attempts = 0
    last_error: BaseException | None = None
    for delay in _backoff_delays():
        attempts += 1
        try:
            sock, host_port, rest = await _attempt_async(path, port, deadline)
        except _NotReady as not_ready:
            last_error = not_ready.cause
        except OSError as exc:
            raise _fatal_connect_error(path, exc, attempts) from exc
        else:
            return Handshake(sock, host_port, rest, attempts)
        log.debug("connect %s port %d attempt %d: %s", path, port, attempts, last_error)
        if deadline - loop.time() <= delay:
            # An attempt after the last sleep would have no time left to read
            # a reply, and its timeout would hide the real last error.
            break
        await asyncio.sleep(delay)
    raise _give_up(path, port, timeout, attempts, last_error) from last_error


async def _attempt_async(
    path: str, port: int, deadline: float
) -> tuple[socket.socket, int, bytes]:
    sock = _new_socket()
    try:
        _connect_nonblocking(sock, path, deadline)
        _send_line(sock, _connect_line(port))
        host_port, rest = await _read_reply_async(sock, deadline)
    except BaseException:
        sock.close()
        raise
    return sock, host_port, rest


async def _read_reply_async(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    received = b""
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                chunk = await loop.sock_recv(sock, _RECV_SIZE)
        except TimeoutError:
            raise _NotReady(
                TimeoutError("no reply to CONNECT before the deadline")
            ) from None
        except ConnectionResetError as exc:
            if received:
                raise _ended_early(received) from exc
            raise _NotReady(exc) from None
        if not chunk:
            raise _ended_early(received)
        received += chunk
        parsed = _parse_reply(received)
        if parsed is not None:
            return parsed
