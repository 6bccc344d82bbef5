"""The VMM side of a hybrid-vsock Unix socket, emulated on an asyncio loop.

Contract.  A host connects to ``uds_path``, sends ``CONNECT <port>\\n`` and
reads ``OK <host port>\\n``; after that the socket is a byte pipe to the guest
port.  Every failure is a silent close.  Host ports count up from 2**30 per
muxer, as in Firecracker and Cloud Hypervisor.

Handshake parsers.  Both read the command exactly up to its line feed, so
bytes the host pipelined after it stay in the socket for the guest.  The
Firecracker parser looks once, at the first readable event.  It drops the
connection when fewer than 10 bytes or no line feed are queued then, and it
parses 32 bytes without a line feed as they are.  The Cloud Hypervisor parser
waits for more bytes until a line feed or 32 bytes.  Both follow the VMMs'
``muxer.rs`` (Firecracker ``src/vmm/src/devices/virtio/vsock/unix/``, commit
81b38b9d; Cloud Hypervisor ``virtio-devices/src/vsock/unix/``, commit ae44c297).

Data paths.  ``handoff`` passes the host socket to the agent with
``SCM_RIGHTS``, and the agent writes the reply itself before its first frame,
so Python copies no data bytes.  A host whose socket the agent never takes
gets EOF without a reply, as from a VMM whose guest did not answer.
``relay`` connects to a guest-side Unix stream listener, writes the reply and
copies both ways through one 64 KiB buffer per direction, the size of
Firecracker's per-connection buffer.  A side that stops reading therefore
blocks the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import itertools
import json
import logging
import os
import re
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from .protocol import AGENT_PORT

__all__ = [
    "CONNECT_LINE_MAX",
    "DEFAULT_MAX_CONNECTIONS",
    "FIRST_HOST_PORT",
    "GARBAGE_REPLIES",
    "HOST_PORT_HISTORY",
    "NEED_MORE",
    "RELAY_BUFFER_SIZE",
    "AgentLink",
    "Faults",
    "Muxer",
    "Parser",
    "Reply",
    "firecracker_line_length",
    "parse_cloud_hypervisor",
    "parse_firecracker_line",
]

logger = logging.getLogger("fcvsock.muxer")

FIRST_HOST_PORT = 1 << 30
DEFAULT_MAX_CONNECTIONS = 1023
HOST_PORT_HISTORY = 10_000
CONNECT_LINE_MAX = 32
RELAY_BUFFER_SIZE = 64 * 1024
NEED_MORE = -1
# len(b"connect 0\n"): both VMMs read this many bytes before looking for LF.
_MIN_COMMAND = 10
_CH_PREFIX = b"connect "
# Rust's char::is_whitespace, which split_whitespace() and trim() use.  Python's
# str.split() also splits on U+001C..U+001F, which Rust keeps in a word.
_WHITESPACE_CLASS = (
    "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
)
_WHITESPACE = re.compile(f"{_WHITESPACE_CLASS}+")
_EDGE_WHITESPACE = re.compile(f"\\A{_WHITESPACE_CLASS}+|{_WHITESPACE_CLASS}+\\Z")
_U32_TEXT = re.compile(r"\+?[0-9]+")
_U32_MAX = 0xFFFF_FFFF
_OUTQ = struct.Struct("i")

GARBAGE_REPLIES = {
    "err": b"ERR\n",
    "http": b"HTTP/1.1 400 Bad Request\r\n",
    "ok-without-port": b"OK\n",
    "no-newline": b"x" * 64,
}


class Parser(str, enum.Enum):
    """The VMM whose ``CONNECT`` parsing is emulated."""

    FIRECRACKER = "firecracker"
    CLOUD_HYPERVISOR = "cloud-hypervisor"


class Reply(str, enum.Enum):
    """Shape of the ``OK`` reply as the host receives it."""

    WHOLE = "whole"
    SPLIT = "split"
    WITH_DATA = "with-data"
    WITH_DATA_EOF = "with-data-eof"


def firecracker_line_length(queued: bytes) -> int | None:
    """Return how many queued bytes Firecracker reads as the command.

    ``None`` means Firecracker drops the connection: its reads would block
    before a line feed, because it never waits for the rest of a line.
    """
    if len(queued) < _MIN_COMMAND:
        return None
    newline = queued.find(b"\n", _MIN_COMMAND - 1, CONNECT_LINE_MAX)
    if newline >= 0:
        return newline + 1
    if len(queued) >= CONNECT_LINE_MAX:
        return CONNECT_LINE_MAX
    return None


def parse_firecracker_line(command: bytes) -> int | None:
    """Return the guest port of a command Firecracker accepts, else ``None``."""
    try:
        text = command.decode("utf-8")
    except UnicodeDecodeError:
        return None
    words = [word for word in _WHITESPACE.split(text) if word]
    if len(words) < 2 or words[0].lower() != "connect":
        return None
    return _parse_u32(words[1])


def parse_cloud_hypervisor(command: bytes) -> int | None:
    """Return the guest port, ``NEED_MORE``, or ``None`` for a rejected command.

    ``command`` contains every byte read so far.
    """
    newline = command.find(b"\n")
    if len(command) < len(_CH_PREFIX):
        return None if newline >= 0 else NEED_MORE
    if command[: len(_CH_PREFIX)].lower() != _CH_PREFIX:
        return None
    if newline < 0:
        return None if len(command) >= CONNECT_LINE_MAX else NEED_MORE
    try:
        text = command[len(_CH_PREFIX) : newline].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return _parse_u32(_EDGE_WHITESPACE.sub("", text))


def _parse_u32(word: str) -> int | None:
    # Rust's u32::from_str: optional '+', ASCII digits only, no overflow.
    if not _U32_TEXT.fullmatch(word):
        return None
    value = int(word)
    return value if value <= _U32_MAX else None


@dataclass
class Faults:
    """Run-time switches of the emulated VMM, read when a connection arrives.

    ``reply`` selects how ``OK`` is written.  ``SPLIT`` writes it in pieces
    cut at the offsets in ``split_at``, and each piece waits until the host
    has read the previous one, or ``split_wait`` seconds.  ``WITH_DATA``
    writes it in one write with the guest's first bytes.  ``WITH_DATA_EOF``
    writes it with everything the guest sent before closing, then closes the
    host connection too.  Both wait at most ``first_data_wait`` seconds for
    the guest to send.

    ``garbage_reply`` replaces the ``OK`` line with these bytes.  The host
    connection then stays open, read and discarded, until the host closes
    it, unless ``close_after_garbage`` closes it at once.  ``silent`` reads
    the command and then sends nothing for as long as the host stays.
    ``abort_after_bytes`` closes a relayed connection once that many guest
    bytes reached the host.  With ``abort_with_unread`` it first waits for
    the host to write and leaves those bytes unread, so the host's next read
    fails with ``ECONNRESET``.

    Every reply shape but ``WHOLE``, and ``abort_after_bytes``, make port 52
    relayed instead of handed off to the agent, because the muxer must then
    write the reply or count the data bytes itself.
    """

    reply: Reply = Reply.WHOLE
    split_at: tuple[int, ...] = (2, 5)
    split_wait: float = 1.0
    first_data_wait: float = 1.0
    garbage_reply: bytes | None = None
    close_after_garbage: bool = False
    silent: bool = False
    abort_after_bytes: int | None = None
    abort_with_unread: bool = False

    def reset(self) -> None:
        """Restore every switch to its default."""
        for name, value in vars(Faults()).items():
            setattr(self, name, value)

    def needs_relay(self) -> bool:
        """True when the muxer must write the reply or see the data bytes."""
        return self.reply is not Reply.WHOLE or self.abort_after_bytes is not None


class _End(enum.Enum):
    ABORT = "abort"
    ABORT_UNREAD = "abort-unread"
    SNAPSHOT = "snapshot"


@dataclass(eq=False)
class _Connection:
    host_port: int
    guest_port: int
    relayed: bool = False
    handed_off: bool = False
    # Set to end a relayed connection from outside its task.
    end: asyncio.Future[_End] | None = None
    # Set once the relay copies no more bytes in either direction.
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Streams:
    host: socket.socket
    guest: socket.socket
    tasks: list[asyncio.Task[str]] = field(default_factory=list)


async def _wait_readable(sock: socket.socket) -> None:
    await _wait_fd(sock, writable=False)


async def _wait_fd(sock: socket.socket, *, writable: bool) -> None:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    if writable:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await waiter
    finally:
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _unread_by_peer(sock: socket.socket) -> int:
    # SIOCOUTQ on AF_UNIX counts sent bytes the peer has not consumed yet.
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(_OUTQ.size))
    (count,) = _OUTQ.unpack(raw)
    return int(count)


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(RELAY_BUFFER_SIZE):
            pass


async def _hold_until_eof(sock: socket.socket) -> None:
    # Reading keeps the host's writes from blocking; the bytes go nowhere.
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        while await loop.sock_recv(sock, RELAY_BUFFER_SIZE):
            pass


async def _pump(
    source: socket.socket,
    target: socket.socket,
    limit: int | None = None,
    before_last: Callable[[], object] | None = None,
) -> str:
    """Copy ``source`` to ``target`` through one buffer; return why it stopped.

    With ``limit``, ``before_last`` runs before the chunk that reaches it is
    written.
    """
    loop = asyncio.get_running_loop()
    buffer = memoryview(bytearray(RELAY_BUFFER_SIZE))
    copied = 0
    if limit is not None and limit <= 0 and before_last is not None:
        before_last()
    try:
        while limit is None or copied < limit:
            size = RELAY_BUFFER_SIZE if limit is None else min(
                RELAY_BUFFER_SIZE, limit - copied
            )
            count = await loop.sock_recv_into(source, buffer[:size])
            if count == 0:
                return "eof"
            copied += count
            if copied == limit and before_last is not None:
                before_last()
            await loop.sock_sendall(target, buffer[:count])
    except OSError as exc:
        logger.debug("relay: copy stopped: %s", exc)
        return "error"
    return "limit"


class AgentLink:
    """The agent's two entry points: its handoff channel and its listener.

    ``handoff_path`` is an ``AF_UNIX`` ``SOCK_SEQPACKET`` listener.  Each
    message sent to it carries one host socket as ``SCM_RIGHTS`` and the JSON
    object ``{"host_port": N, "guest_port": P, "reply": "OK N\\n"}``.  The
    host socket has had its ``CONNECT`` line read and nothing written.  The
    agent writes ``reply`` to it as the first bytes, before any frame, and
    replies ``{"closed": N}`` on the same channel when it closes that
    socket.  ``unix_path`` is a stream listener where each connection is one
    session already past the handshake.
    """

    def __init__(self, handoff_path: str, unix_path: str) -> None:
        self.handoff_path = handoff_path
        self.unix_path = unix_path
        self._channel: socket.socket | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        """True while the handoff channel is connected."""
        return self._channel is not None

    async def open(
        self, on_closed: Callable[[int], None], on_lost: Callable[[], None]
    ) -> None:
        """Connect the handoff channel and start reading the agent's replies."""
        channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        channel.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(channel, self.handoff_path)
        except OSError:
            channel.close()
            raise
        self._channel = channel
        self._reader = asyncio.create_task(self._read_replies(on_closed, on_lost))

    async def hand_off(
        self, host_sock: socket.socket, host_port: int, guest_port: int, reply: str
    ) -> None:
        """Pass ``host_sock`` to the agent, which writes ``reply`` to it first.

        The caller still closes its copy.  Raises ``OSError`` if the message
        could not be sent.
        """
        channel = self._channel
        if channel is None:
            raise ConnectionError("hand off: the agent's handoff channel is closed")
        payload = json.dumps(
            {"host_port": host_port, "guest_port": guest_port, "reply": reply}
        )
        while True:
            try:
                socket.send_fds(channel, [payload.encode()], [host_sock.fileno()])
                return
            except BlockingIOError:
                await _wait_fd(channel, writable=True)

    async def close(self) -> None:
        """Stop reading replies and close the channel."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        self._close_channel()

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def _read_replies(
        self, on_closed: Callable[[int], None], on_lost: Callable[[], None]
    ) -> None:
        channel = self._channel
        assert channel is not None
        while True:
            try:
                await _wait_readable(channel)
                message, fds, _, _ = socket.recv_fds(channel, 4096, 4)
            except BlockingIOError:
                continue
            except OSError as exc:
                logger.warning("agent channel: receive failed: %s", exc)
                break
            for fd in fds:
                os.close(fd)
            if not message:
                logger.warning("agent channel: the agent closed the handoff channel")
                break
            self._dispatch(message, on_closed)
        self._close_channel()
        on_lost()

    @staticmethod
    def _dispatch(message: bytes, on_closed: Callable[[int], None]) -> None:
        try:
            document = json.loads(message)
        except ValueError:
            document = None
        closed = document.get("closed") if isinstance(document, dict) else None
        if isinstance(closed, int) and not isinstance(closed, bool):
            on_closed(closed)
        else:
            logger.debug("agent channel: ignored message %r", message[:200])


class Muxer:
    """Accept host connections on ``uds_path`` and route them to guest ports.

    Every coroutine method must run on the loop that runs the muxer.  Guest
    ports are served by :attr:`listeners` (guest port to the path of a Unix
    stream listener, relayed) and by the agent on port 52 once
    :meth:`attach_agent` ran (handed off unless :attr:`agent_data_path` is
    ``"relay"`` or a fault needs the data bytes).
    """

    def __init__(
        self,
        uds_path: str,
        *,
        parser: Parser | str = Parser.FIRECRACKER,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        faults: Faults | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(
                f"muxer: max_connections must be at least 1, got {max_connections}"
            )
        self.uds_path = uds_path
        self.parser = Parser(parser)
        self.max_connections = max_connections
        self.faults = faults if faults is not None else Faults()
        self.listeners: dict[int, str] = {}
        self.agent: AgentLink | None = None
        self.agent_data_path = "handoff"
        # Guest port -> time.monotonic() before which nothing listens on it.
        self.no_listener_until: dict[int, float] = {}
        # The most recent host ports, oldest first; bounded for long runs.
        self.host_ports_assigned: deque[int] = deque(maxlen=HOST_PORT_HISTORY)
        # Host connections accepted and closed because of max_connections.
        self.closed_over_limit = 0
        self._connections: dict[int, _Connection] = {}
        self._last_host_port = FIRST_HOST_PORT - 1
        self._listener: socket.socket | None = None
        self._socket_id: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._hang_until = 0.0

    @property
    def connections(self) -> int:
        """Live guest connections: relayed, handed off or waiting for a reply."""
        return len(self._connections)

    @property
    def is_bound(self) -> bool:
        """True once the socket file exists and accepts connections."""
        return self._listener is not None

    async def bind(self) -> None:
        """Create the socket file and start accepting connections."""
        if self._listener is not None:
            return
        if os.path.lexists(self.uds_path):
            raise FileExistsError(
                f"muxer: bind {self.uds_path}: the path already exists; remove it "
                f"or choose another path"
            )
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.setblocking(False)
            listener.bind(self.uds_path)
            listener.listen(socket.SOMAXCONN)
        except OSError:
            listener.close()
            raise
        status = os.stat(self.uds_path)
        self._socket_id = (status.st_dev, status.st_ino)
        self._listener = listener
        self._spawn(self._accept_loop(listener))
        logger.debug("muxer: listening on %s", self.uds_path)

    async def attach_agent(self, agent: AgentLink) -> None:
        """Connect the agent's handoff channel and serve port 52 through it."""
        await agent.open(self._agent_closed, self._agent_lost)
        self.agent = agent

    async def snapshot(self) -> None:
        """Reset every relayed connection and pause new ones until restore."""
        self._resumed.clear()
        ended = self._end_relays(None, _End.SNAPSHOT)
        for conn in ended:
            self._forget(conn)
        await self._wait_stopped(ended)

    async def restore(self, hang: float = 0.0) -> None:
        """Resume; connections arriving in the next ``hang`` seconds wait."""
        self._hang_until = time.monotonic() + hang
        self._resumed.set()

    async def abort(self, guest_port: int | None, *, unread: bool) -> int:
        """Close relayed connections abruptly; return how many were closed."""
        ended = self._end_relays(guest_port, _End.ABORT_UNREAD if unread else _End.ABORT)
        await self._wait_stopped(ended)
        return len(ended)

    def _end_relays(self, guest_port: int | None, end: _End) -> list[_Connection]:
        ended = []
        for conn in self._connections.values():
            matches = guest_port is None or conn.guest_port == guest_port
            if matches and conn.end is not None and not conn.end.done():
                conn.end.set_result(end)
                ended.append(conn)
        return ended

    @staticmethod
    async def _wait_stopped(connections: list[_Connection]) -> None:
        # Callers rely on no host byte being copied once this returns.
        for conn in connections:
            await conn.stopped.wait()

    async def close(self) -> None:
        """Stop accepting, close every connection and remove the socket file."""
        self.remove_socket_file()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.agent is not None:
            await self.agent.close()
        self._connections.clear()

    def remove_socket_file(self) -> None:
        """Remove the socket file, unless another file replaced it since bind.

        Safe to call from any thread, because it does not touch the loop.
        """
        if self._socket_id is None:
            return
        with contextlib.suppress(FileNotFoundError):
            status = os.stat(self.uds_path)
            if (status.st_dev, status.st_ino) == self._socket_id:
                os.unlink(self.uds_path)
        self._socket_id = None

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("muxer: connection task failed", exc_info=task.exception())

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                host, _ = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE and friends: keep serving the connections we have.
                logger.warning("muxer: accept on %s failed: %s", self.uds_path, exc)
                await asyncio.sleep(0.05)
                continue
            if len(self._connections) >= self.max_connections:
                # Firecracker and Cloud Hypervisor accept, then close at once.
                host.close()
                self._report_over_limit()
                continue
            self._spawn(self._serve(host))

    def _report_over_limit(self) -> None:
        self.closed_over_limit += 1
        count = self.closed_over_limit
        if count & (count - 1) == 0:
            logger.warning(
                "muxer: connection limit of %d reached: closed %d new host "
                "connections so far",
                self.max_connections,
                count,
            )

    async def _serve(self, host: socket.socket) -> None:
        try:
            await self._wait_resumed()
            guest_port = await self._read_command(host)
            if guest_port is None:
                logger.debug("muxer: invalid connect command, closing")
                return
            await self._route(host, guest_port)
        finally:
            host.close()

    async def _wait_resumed(self) -> None:
        await self._resumed.wait()
        delay = self._hang_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _read_command(self, host: socket.socket) -> int | None:
        if self.parser is Parser.FIRECRACKER:
            return await self._read_command_firecracker(host)
        return await self._read_command_cloud_hypervisor(host)

    @staticmethod
    async def _read_command_firecracker(host: socket.socket) -> int | None:
        await _wait_readable(host)
        try:
            queued = host.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
            length = firecracker_line_length(queued)
            # Firecracker has read these bytes before it gives up, so the host
            # reads EOF rather than ECONNRESET after a truncated command.
            host.recv(len(queued) if length is None else length)
        except OSError:
            return None
        return None if length is None else parse_firecracker_line(queued[:length])

    @staticmethod
    async def _read_command_cloud_hypervisor(host: socket.socket) -> int | None:
        # Cloud Hypervisor reads 10 bytes, then one at a time, never past LF.
        loop = asyncio.get_running_loop()
        command = b""
        while True:
            size = max(_MIN_COMMAND, len(command) + 1) - len(command)
            try:
                chunk = await loop.sock_recv(host, size)
            except OSError:
                return None
            if not chunk:
                return None
            command += chunk
            port = parse_cloud_hypervisor(command)
            if port != NEED_MORE:
                return port

    async def _route(self, host: socket.socket, guest_port: int) -> None:
        faults = self.faults
        if faults.garbage_reply is not None:
            await self._send_garbage(host, faults)
            return
        if len(self._connections) >= self.max_connections:
            return
        conn = self._add_connection(guest_port)
        handed_off = False
        try:
            if faults.silent:
                await _hold_until_eof(host)
            elif not self._is_listening(guest_port):
                logger.debug("muxer: nothing listens on guest port %d", guest_port)
            elif self._use_handoff(guest_port, faults):
                handed_off = await self._hand_off(host, conn)
            else:
                await self._relay(host, conn, self._guest_path(guest_port), faults)
        finally:
            if not handed_off:
                self._forget(conn)

    def _add_connection(self, guest_port: int) -> _Connection:
        # Firecracker allocates the host port when it parses the command.
        while True:
            port = ((self._last_host_port + 1) & ~(1 << 31)) | (1 << 30)
            self._last_host_port = port
            if port not in self._connections:
                break
        conn = _Connection(host_port=port, guest_port=guest_port)
        self._connections[port] = conn
        self.host_ports_assigned.append(port)
        return conn

    def _forget(self, conn: _Connection) -> None:
        if self._connections.get(conn.host_port) is conn:
            del self._connections[conn.host_port]

    def _is_listening(self, guest_port: int) -> bool:
        if time.monotonic() < self.no_listener_until.get(guest_port, 0.0):
            return False
        if guest_port in self.listeners:
            return True
        return guest_port == AGENT_PORT and self.agent is not None

    def _use_handoff(self, guest_port: int, faults: Faults) -> bool:
        return (
            guest_port == AGENT_PORT
            and guest_port not in self.listeners
            and self.agent is not None
            and self.agent.is_open
            and self.agent_data_path == "handoff"
            and not faults.needs_relay()
        )

    def _guest_path(self, guest_port: int) -> str:
        path = self.listeners.get(guest_port)
        if path is not None:
            return path
        assert self.agent is not None
        return self.agent.unix_path

    async def _send_garbage(self, host: socket.socket, faults: Faults) -> None:
        assert faults.garbage_reply is not None
        try:
            await asyncio.get_running_loop().sock_sendall(host, faults.garbage_reply)
        except OSError:
            return
        if not faults.close_after_garbage:
            await _hold_until_eof(host)

    async def _write_reply(
        self, host: socket.socket, conn: _Connection, faults: Faults
    ) -> None:
        loop = asyncio.get_running_loop()
        line = f"OK {conn.host_port}\n".encode()
        if faults.reply is not Reply.SPLIT:
            await loop.sock_sendall(host, line)
            return
        cuts = sorted({cut for cut in faults.split_at if 0 < cut < len(line)})
        bounds = [0, *cuts, len(line)]
        for index, (start, stop) in enumerate(itertools.pairwise(bounds)):
            if index:
                await self._wait_host_read(host, faults.split_wait)
            await loop.sock_sendall(host, line[start:stop])

    @staticmethod
    async def _wait_host_read(host: socket.socket, timeout: float) -> None:
        # Writing the next piece only after the host consumed the previous one
        # makes each piece arrive in a read of its own.
        deadline = time.monotonic() + timeout
        while _unread_by_peer(host) and time.monotonic() < deadline:
            await asyncio.sleep(0.001)

    async def _hand_off(self, host: socket.socket, conn: _Connection) -> bool:
        assert self.agent is not None
        reply = f"OK {conn.host_port}\n"
        try:
            await self.agent.hand_off(host, conn.host_port, conn.guest_port, reply)
        except OSError as exc:
            logger.warning(
                "muxer: hand off host port %d to the agent failed: %s; closing "
                "the host connection without a reply",
                conn.host_port,
                exc,
            )
            return False
        # hand_off() does not suspend after its send succeeds, so the agent's
        # {"closed": N} for this connection cannot have been handled yet.
        conn.handed_off = True
        return True

    def _agent_closed(self, host_port: int) -> None:
        conn = self._connections.get(host_port)
        if conn is not None and conn.handed_off:
            del self._connections[host_port]
        else:
            logger.debug("muxer: agent closed unknown host port %d", host_port)

    def _agent_lost(self) -> None:
        for conn in list(self._connections.values()):
            if conn.handed_off:
                self._forget(conn)

    async def _relay(
        self, host: socket.socket, conn: _Connection, path: str, faults: Faults
    ) -> None:
        guest = await self._connect_guest(conn, path)
        if guest is None:
            return
        streams = _Streams(host, guest)
        conn.relayed = True
        conn.end = asyncio.get_running_loop().create_future()
        try:
            end = await self._relay_until_ended(streams, conn, faults)
        except OSError as exc:
            logger.debug("muxer: relay of host port %d failed: %s", conn.host_port, exc)
            end = None
        finally:
            await self._stop_pumps(streams)
            guest.close()
            conn.stopped.set()
        await self._end_relay(host, end)

    @staticmethod
    async def _connect_guest(conn: _Connection, path: str) -> socket.socket | None:
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        guest.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(guest, path)
        except asyncio.CancelledError:
            guest.close()
            raise
        except OSError as exc:
            guest.close()
            logger.debug(
                "muxer: connect to guest port %d at %s failed: %s",
                conn.guest_port,
                path,
                exc,
            )
            return None
        return guest

    async def _relay_until_ended(
        self, streams: _Streams, conn: _Connection, faults: Faults
    ) -> _End | None:
        # conn.end may come at any step, even before the reply is written.
        assert conn.end is not None
        run = asyncio.create_task(self._run_relay(streams, conn, faults))
        waiters: list[asyncio.Future[Any]] = [run, conn.end]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not run.done():
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        if conn.end.done():
            return conn.end.result()
        return run.result()

    async def _run_relay(
        self, streams: _Streams, conn: _Connection, faults: Faults
    ) -> _End | None:
        loop = asyncio.get_running_loop()
        streams.tasks.append(asyncio.create_task(_pump(streams.host, streams.guest)))
        limit = faults.abort_after_bytes
        if faults.reply in (Reply.WITH_DATA, Reply.WITH_DATA_EOF):
            until_eof = faults.reply is Reply.WITH_DATA_EOF
            first = await self._read_first_data(streams.guest, faults, until_eof)
            line = f"OK {conn.host_port}\n".encode()
            await loop.sock_sendall(streams.host, line + first)
            if until_eof:
                return None
            limit = None if limit is None else max(0, limit - len(first))
        else:
            await self._write_reply(streams.host, conn, faults)
        to_guest = streams.tasks[0]
        to_host = asyncio.create_task(
            _pump(streams.guest, streams.host, limit, before_last=to_guest.cancel)
        )
        streams.tasks.append(to_host)
        await asyncio.wait(streams.tasks, return_when=asyncio.FIRST_COMPLETED)
        if to_guest.cancelled():
            # to_host reached abort_after_bytes and is writing its last chunk.
            await to_host
        if to_host.done() and to_host.result() == "limit":
            return _End.ABORT_UNREAD if faults.abort_with_unread else _End.ABORT
        return None

    @staticmethod
    async def _read_first_data(
        guest: socket.socket, faults: Faults, until_eof: bool
    ) -> bytes:
        # NOTE: a guest that never speaks first gets a bare OK after
        # first_data_wait seconds instead of a hang.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + faults.first_data_wait
        data = bytearray()
        while len(data) < RELAY_BUFFER_SIZE:
            receive = loop.sock_recv(guest, RELAY_BUFFER_SIZE - len(data))
            try:
                chunk = await asyncio.wait_for(receive, deadline - loop.time())
            except TimeoutError:
                break
            data += chunk
            if not chunk or not until_eof:
                break
        return bytes(data)

    @staticmethod
    async def _stop_pumps(streams: _Streams) -> None:
        for task in streams.tasks:
            task.cancel()
        await asyncio.gather(*streams.tasks, return_exceptions=True)
        streams.tasks.clear()

    @staticmethod
    async def _end_relay(host: socket.socket, end: _End | None) -> None:
        if end is _End.ABORT:
            # Unread host bytes would turn the host's EOF into ECONNRESET.
            _drain(host)
        elif end is _End.ABORT_UNREAD:
            await _wait_readable(host)
        elif end is _End.SNAPSHOT:
            # The old stream stays open and silent until the host writes;
            # then the VMM drops it.
            await _wait_readable(host)
            _drain(host)
