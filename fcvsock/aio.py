"""The asyncio API: the same calls as :mod:`fcvsock.client`, awaitable.

Each session registers its socket with the running loop through
``add_reader``/``add_writer`` (so uvloop works too) and reads it with the
frame core; no thread and no extra task is started.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType

from .errors import ClockSyncError, ConnectionLostError, SessionTimeoutError
from .handshake import DEFAULT_CONNECT_TIMEOUT, Handshake, connect_async
from .protocol import AGENT_PORT, FrameType, encode_clock_sync, encode_resize, encode_signal
from ._request import InputFeeder, build_start
from .client import CLOCK_SYNC_REPLY_TIMEOUT, _check_clock_reply, _feed_input
from .session import (
    DEFAULT_MAX_BUFFERED,
    WRITE_HIGH_WATER,
    ExitStatus,
    Output,
    RunResult,
    SessionCore,
    StreamItem,
)

__all__ = [
    "AsyncExecSession",
    "connect",
    "exec",
    "open_connection",
    "run",
    "stream",
    "sync_clock",
]

PathLike = str | os.PathLike[str]


class _LoopDriver:
    """Connects a :class:`SessionCore` to the event loop."""

    def __init__(self, core: SessionCore) -> None:
        self.core = core
        self.loop = asyncio.get_running_loop()
        self._reading = False
        self._writing = False
        self._waiter: asyncio.Future[None] | None = None
        self.update()

    def update(self) -> None:
        """Register or unregister the fd to match what the core wants."""
        core = self.core
        if core.sock is None:
            self._unregister()
            return
        want_read = core.wants_read
        if want_read and not self._reading:
            self.loop.add_reader(core.fd, self._on_readable)
        elif not want_read and self._reading:
            self.loop.remove_reader(core.fd)
        self._reading = want_read
        want_write = core.pending_writes > 0 and core.write_error is None
        if want_write and not self._writing:
            self.loop.add_writer(core.fd, self._on_writable)
        elif not want_write and self._writing:
            self.loop.remove_writer(core.fd)
        self._writing = want_write

    async def wait(self) -> None:
        """Wait until the core made progress: output, exit, error or drain."""
        self.update()
        if not self._reading and not self._writing:
            # Nothing can change without the caller acting; do not hang.
            return
        waiter = self.loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        """Unregister the fd and close the socket."""
        self._unregister()
        self.core.close()
        self._wake()

    def _unregister(self) -> None:
        # Before the socket closes: a closed fd number may be reused at once.
        if self._reading:
            self.loop.remove_reader(self.core.fd)
            self._reading = False
        if self._writing:
            self.loop.remove_writer(self.core.fd)
            self._writing = False

    def _on_readable(self) -> None:
        self.core.on_readable()
        self.update()
        self._wake()

    def _on_writable(self) -> None:
        self.core.flush()
        self.update()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Session:
    """One session on the loop, with the host deadline applied to waits."""

    def __init__(self, core: SessionCore, timeout: float | None) -> None:
        self.core = core
        self.driver = _LoopDriver(core)
        self.timeout = timeout
        self.deadline = None if timeout is None else self.driver.loop.time() + timeout

    async def wait(self, deadline: float | None = None) -> None:
        deadline = _earliest(self.deadline, deadline)
        try:
            async with asyncio.timeout_at(deadline):
                await self.driver.wait()
        except TimeoutError:
            self.driver.close()
            reason = f"no exit status within {self.timeout:g} s; connection closed"
            if deadline != self.deadline:
                reason = "wait timed out; connection closed"
            raise self.core.make_error(SessionTimeoutError, reason) from None

    def feed_input(self, feeder: InputFeeder) -> None:
        _feed_input(self.core, feeder)
        self.driver.update()

    async def drain(self, high_water: int) -> None:
        core = self.core
        core.flush()
        self.driver.update()
        while core.pending_writes > high_water and core.write_error is None:
            if core.sock is None:
                break
            await self.wait()
        if core.write_error is not None:
            raise core.make_error(
                ConnectionLostError,
                f"send to guest failed: {core.write_error}",
                core.write_error,
            )

    def close(self) -> None:
        self.driver.close()


def _earliest(first: float | None, second: float | None) -> float | None:
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


async def _open(
    uds_path: PathLike,
    start: bytes,
    *,
    port: int,
    connect_timeout: float,
    collect: bool,
    max_buffered: int,
    timeout: float | None,
) -> _Session:
    handshake = await connect_async(uds_path, port, connect_timeout)
    core = SessionCore(handshake, collect=collect, max_buffered=max_buffered)
    try:
        core.send(FrameType.START, start)
        session = _Session(core, timeout)
    except BaseException:
        core.close()
        raise
    return session


async def run(
    uds_path: PathLike,
    cmd: Sequence[str],
    *,
    input: bytes | bytearray | memoryview | None = None,
    env: Mapping[str, str] | None = None,
    cwd: PathLike = "",
    user: str = "",
    tty: bool = False,
    tty_size: tuple[int, int] | None = None,
    timeout_seconds: int = 0,
    timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    port: int = AGENT_PORT,
    check: bool = False,
) -> RunResult:
    """Run ``cmd`` in the guest; the asyncio form of :func:`fcvsock.run`."""
    start = build_start(
        cmd, env=env, cwd=cwd, user=user, tty=tty, tty_size=tty_size,
        timeout_seconds=timeout_seconds,
    )
    session = await _open(
        uds_path, start, port=port, connect_timeout=connect_timeout,
        collect=True, max_buffered=DEFAULT_MAX_BUFFERED, timeout=timeout,
    )
    feeder = InputFeeder(input)
    core = session.core
    try:
        while not core.finished:
            if not feeder.eof_sent:
                session.feed_input(feeder)
            await session.wait()
    finally:
        session.close()
    if core.exit_status is None:
        raise core.error()
    result = core.result()
    return result.check() if check else result


async def stream(
    uds_path: PathLike,
    cmd: Sequence[str],
    *,
    input: bytes | bytearray | memoryview | None = None,
    env: Mapping[str, str] | None = None,
    cwd: PathLike = "",
    user: str = "",
    tty: bool = False,
    tty_size: tuple[int, int] | None = None,
    timeout_seconds: int = 0,
    timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    port: int = AGENT_PORT,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
) -> AsyncIterator[StreamItem]:
    """Yield output chunks, then the exit status; see :func:`fcvsock.stream`."""
    start = build_start(
        cmd, env=env, cwd=cwd, user=user, tty=tty, tty_size=tty_size,
        timeout_seconds=timeout_seconds,
    )
    session = await _open(
        uds_path, start, port=port, connect_timeout=connect_timeout,
        collect=False, max_buffered=max_buffered, timeout=timeout,
    )
    feeder = InputFeeder(input)
    core = session.core
    try:
        while True:
            item = core.pop()
            if item is not None:
                yield item
                continue
            if core.exit_status is not None:
                yield core.exit_status
                return
            if core.failure is not None:
                raise core.error()
            if not feeder.eof_sent:
                session.feed_input(feeder)
            await session.wait()
    finally:
        session.close()


class AsyncExecSession:
    """An interactive session; the asyncio form of :class:`fcvsock.ExecSession`.

    Use ``async with fcvsock.aio.exec(...) as session``.  Leaving the block,
    or cancelling the task inside it, closes the connection, and the agent
    then kills a command still running.
    """

    def __init__(self, connect: _PendingSession) -> None:
        self._pending: _PendingSession | None = connect
        self._session: _Session | None = None
        self._stdin_closed = False

    async def __aenter__(self) -> AsyncExecSession:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.start().__await__()

    async def start(self) -> AsyncExecSession:
        """Connect and send START; ``await exec(...)`` calls it for you."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._session = await pending.open()
            try:
                await self._session.drain(0)
            except BaseException:
                self._session.close()
                raise
        return self

    @property
    def host_port(self) -> int:
        """The port number the VMM assigned to this connection."""
        return self._live().core.host_port

    @property
    def exit_status(self) -> ExitStatus | None:
        """The exit status once received, else None."""
        return self._live().core.exit_status

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to stdin, waiting while the socket is full."""
        if self._stdin_closed:
            raise ValueError("write: stdin was already closed")
        session = self._live()
        feeder = InputFeeder(data)
        while (payload := feeder.next_frame()) is not None:
            session.core.send(FrameType.STDIN, payload)
            await session.drain(WRITE_HIGH_WATER)

    async def resize(self, columns: int, rows: int) -> None:
        """Set the size of the command's terminal (ignored without a tty)."""
        await self._send_control(FrameType.RESIZE, encode_resize(columns, rows))

    async def signal(self, signal_number: int) -> None:
        """Send a signal to the command's process group."""
        await self._send_control(FrameType.SIGNAL, encode_signal(signal_number))

    async def close_stdin(self) -> None:
        """Send EOF on the command's stdin; later writes raise."""
        if not self._stdin_closed:
            self._stdin_closed = True
            await self._send_control(FrameType.EOF, b"")

    async def read(self) -> Output | None:
        """Return the next output chunk, or None once the command exited."""
        session = self._live()
        core = session.core
        while True:
            item = core.pop()
            if item is not None:
                session.driver.update()
                return item
            if core.exit_status is not None:
                return None
            if core.failure is not None:
                raise core.error()
            await session.wait()

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Output]:
        while (item := await self.read()) is not None:
            yield item

    async def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for the exit status; output not read by then is discarded."""
        session = self._live()
        core = session.core
        deadline = None if timeout is None else session.driver.loop.time() + timeout
        while core.exit_status is None:
            while core.pop() is not None:
                pass
            if core.failure is not None:
                raise core.error()
            await session.wait(deadline)
        return core.exit_status

    def close(self) -> None:
        """Close the connection; safe to call more than once."""
        self._pending = None
        if self._session is not None:
            self._session.close()

    async def _send_control(self, frame_type: int, payload: bytes) -> None:
        session = self._live()
        session.core.send(frame_type, payload)
        await session.drain(WRITE_HIGH_WATER)

    def _live(self) -> _Session:
        if self._session is None:
            raise RuntimeError("exec session: not started; use 'async with' or await it")
        return self._session


class _PendingSession:
    def __init__(self, uds_path: PathLike, start: bytes, **options: object) -> None:
        self.uds_path = uds_path
        self.start = start
        self.options = options

    async def open(self) -> _Session:
        return await _open(self.uds_path, self.start, **self.options)  # type: ignore[arg-type]


def exec(  # noqa: A001 - the protocol's name for an interactive session
    uds_path: PathLike,
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: PathLike = "",
    user: str = "",
    tty: bool = False,
    tty_size: tuple[int, int] | None = None,
    timeout_seconds: int = 0,
    timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    port: int = AGENT_PORT,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
) -> AsyncExecSession:
    """Prepare an interactive session; connect with ``async with`` or ``await``."""
    start = build_start(
        cmd, env=env, cwd=cwd, user=user, tty=tty, tty_size=tty_size,
        timeout_seconds=timeout_seconds,
    )
    pending = _PendingSession(
        uds_path, start, port=port, connect_timeout=connect_timeout,
        collect=False, max_buffered=max_buffered, timeout=timeout,
    )
    return AsyncExecSession(pending)


async def sync_clock(
    uds_path: PathLike,
    *,
    port: int = AGENT_PORT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    reply_timeout: float = CLOCK_SYNC_REPLY_TIMEOUT,
) -> int:
    """Set the guest's wall clock; the asyncio form of :func:`fcvsock.sync_clock`."""
    handshake = await connect_async(uds_path, port, connect_timeout)
    core = SessionCore(handshake, collect=True)
    session = _Session(core, None)
    try:
        sent_ns = time.time_ns()
        seconds, nanoseconds = divmod(sent_ns, 1_000_000_000)
        core.send(FrameType.CLOCK_SYNC, encode_clock_sync(seconds, nanoseconds))
        core.flush()
        async with asyncio.timeout(reply_timeout):
            while not core.finished:
                await session.driver.wait()
    except TimeoutError:
        raise ClockSyncError(
            f"sync clock via {os.fspath(uds_path)}: no reply within {reply_timeout:g} s"
        ) from None
    finally:
        session.close()
    return _check_clock_reply(core, uds_path, sent_ns)


async def connect(
    uds_path: PathLike,
    port: int,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Handshake:
    """Open a raw stream to ``port`` in the guest (handshake only)."""
    return await connect_async(uds_path, port, timeout)


async def open_connection(
    uds_path: PathLike,
    port: int,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a raw stream to ``port`` as an asyncio reader/writer pair.

    Guest bytes that arrived with the VMM's reply are already in the reader.
    """
    handshake = await connect_async(uds_path, port, timeout)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    if handshake.initial_data:
        # Fed before the transport exists, so these bytes stay first.
        reader.feed_data(handshake.initial_data)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    try:
        transport, _ = await loop.create_unix_connection(
            lambda: protocol, sock=handshake.sock
        )
    except BaseException:
        handshake.sock.close()
        raise
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer
