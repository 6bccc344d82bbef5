"""The asyncio API: the same calls as :mod:`fcvsock.client`, awaitable.

Each session registers its socket with the running loop through
``add_reader``/``add_writer``, so uvloop works too, and reads it with the
frame core.  No thread and no extra task is started.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Self

from ._request import InputFeeder, build_start, check_session_timeout, signal_payload
from .client import (
    CLOCK_SYNC_REPLY_TIMEOUT,
    _check_clock_reply,
    _check_options,
    _discard_output,
    _timed_out,
)
from .errors import ClockSyncError, ConnectionLostError
from .handshake import DEFAULT_CONNECT_TIMEOUT, Handshake, connect_async
from .protocol import (
    AGENT_PORT,
    MAX_PAYLOAD,
    FrameType,
    encode_clock_sync,
    encode_resize,
)
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
    """Connects a :class:`SessionCore` to the event loop.

    Any number of tasks may wait at once, such as one writing stdin while
    another reads output.  Every readiness callback wakes them all, and each
    checks again what it waits for.
    """

    def __init__(self, core: SessionCore) -> None:
        self.core = core
        self.loop = asyncio.get_running_loop()
        self._fd = core.fd
        self._reading = False
        self._writing = False
        self._waiters: set[asyncio.Future[None]] = set()
        self.update()

    def update(self) -> None:
        """Register or unregister the fd to match what the core wants."""
        core = self.core
        if core.sock is None:
            self._unregister()
            return
        want_read = core.wants_read
        if want_read and not self._reading:
            self.loop.add_reader(self._fd, self._on_readable)
        elif not want_read and self._reading:
            self.loop.remove_reader(self._fd)
        self._reading = want_read
        want_write = core.pending_writes > 0 and core.write_error is None
        if want_write and not self._writing:
            self.loop.add_writer(self._fd, self._on_writable)
        elif not want_write and self._writing:
            self.loop.remove_writer(self._fd)
        self._writing = want_write

    async def wait(self) -> None:
        """Wait until the core made progress: output, exit, error or drain."""
        self.update()
        if not self._reading and not self._writing:
            # Nothing can change without the caller acting; do not hang.
            return
        waiter = self.loop.create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)

    def close(self) -> None:
        """Unregister the fd, close the socket and wake every waiter."""
        self._unregister()
        self.core.close()
        self._wake()

    def _unregister(self) -> None:
        # Before the socket closes: a closed fd number may be reused at once.
        if self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            self.loop.remove_writer(self._fd)
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
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


class _Session:
    """One session on the loop, with the host deadline applied to waits."""

    def __init__(self, core: SessionCore, timeout: float | None) -> None:
        self.core = core
        self.driver = _LoopDriver(core)
        self.timeout = timeout
        self.deadline = None if timeout is None else self.driver.loop.time() + timeout

    async def wait(
        self, deadline: float | None = None, limit: float | None = None
    ) -> None:
        """Wait for progress until the session's deadline or ``deadline``.

        ``limit`` is the timeout that ``deadline`` came from, for the error.
        When the earlier deadline passes, the connection is closed and
        :class:`SessionTimeoutError` is raised.
        """
        own = self.deadline
        if deadline is None or (own is not None and own <= deadline):
            deadline, limit = own, self.timeout
        try:
            if deadline is not None and self.driver.loop.time() >= deadline:
                # A socket that always has data would otherwise keep
                # completing the wait before the timeout fires.
                raise TimeoutError
            async with asyncio.timeout_at(deadline):
                await self.driver.wait()
        except TimeoutError:
            self.driver.close()
            raise _timed_out(self.core, limit) from None

    def feed_input(self, feeder: InputFeeder) -> None:
        self.core.send_input(feeder)
        self.driver.update()

    async def drain(self, high_water: int, *, raise_write_error: bool = True) -> None:
        core = self.core
        core.flush()
        self.driver.update()
        while core.pending_writes > high_water and core.write_error is None:
            if core.sock is None:
                break
            await self.wait()
        if core.write_error is not None and raise_write_error:
            raise core.make_error(
                ConnectionLostError,
                f"send to guest failed: {core.write_error}",
                core.write_error,
            )

    def close(self) -> None:
        self.driver.close()


async def _open(
    uds_path: PathLike,
    start: bytes,
    *,
    port: int,
    connect_timeout: float,
    collect: bool,
    max_buffered: int,
    max_frame: int = MAX_PAYLOAD,
    timeout: float | None,
) -> _Session:
    handshake = await connect_async(uds_path, port, connect_timeout)
    try:
        core = SessionCore(
            handshake, collect=collect, max_buffered=max_buffered, max_frame=max_frame
        )
        core.send(FrameType.START, start)
        session = _Session(core, timeout)
    except BaseException:
        handshake.sock.close()
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
    """Run ``cmd`` in the guest; the asyncio form of :func:`fcvsock.run`.

    Cancelling the task closes the connection, and the agent then kills the
    command.
    """
    start = build_start(
        cmd, env=env, cwd=cwd, user=user, tty=tty, tty_size=tty_size,
        timeout_seconds=timeout_seconds,
    )
    feeder = InputFeeder(input)
    _check_options(timeout=timeout, connect_timeout=connect_timeout, port=port)
    session = await _open(
        uds_path, start, port=port, connect_timeout=connect_timeout,
        collect=True, max_buffered=DEFAULT_MAX_BUFFERED, timeout=timeout,
    )
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


def stream(
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
    max_frame: int = MAX_PAYLOAD,
) -> AsyncGenerator[StreamItem, None]:
    """Yield output chunks, then the exit status; see :func:`fcvsock.stream`.

    Arguments are checked at once; the connection is made when iteration
    starts and closed by ``aclose()`` or when the iteration ends.
    """
    start = build_start(
        cmd, env=env, cwd=cwd, user=user, tty=tty, tty_size=tty_size,
        timeout_seconds=timeout_seconds,
    )
    feeder = InputFeeder(input)
    _check_options(
        timeout=timeout, connect_timeout=connect_timeout, port=port,
        max_buffered=max_buffered, max_frame=max_frame,
    )
    return _stream(
        uds_path, start, feeder, port=port, connect_timeout=connect_timeout,
        max_buffered=max_buffered, max_frame=max_frame, timeout=timeout,
    )


async def _stream(
    uds_path: PathLike,
    start: bytes,
    feeder: InputFeeder,
    *,
    port: int,
    connect_timeout: float,
    max_buffered: int,
    max_frame: int,
    timeout: float | None,
) -> AsyncGenerator[StreamItem, None]:
    session = await _open(
        uds_path, start, port=port, connect_timeout=connect_timeout,
        collect=False, max_buffered=max_buffered, max_frame=max_frame,
        timeout=timeout,
    )
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


SessionOpener = Callable[[], Awaitable[_Session]]


class AsyncExecSession:
    """An interactive session; the asyncio form of :class:`fcvsock.ExecSession`.

    Use ``async with fcvsock.aio.exec(...) as session``.  Leaving the block,
    or cancelling the task inside it, closes the connection, and the agent
    then kills a command still running.  One task may write while another
    reads.
    """

    def __init__(self, opener: SessionOpener) -> None:
        self._opener: SessionOpener | None = opener
        self._session: _Session | None = None
        self._stdin_closed = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __await__(self) -> Generator[Any, None, Self]:
        return self.start().__await__()

    async def start(self) -> Self:
        """Connect and send START; ``await exec(...)`` calls it for you."""
        if self._opener is not None:
            opener, self._opener = self._opener, None
            session = await opener()
            self._session = session
            try:
                # A guest that closed before taking START may still have sent
                # output and EOF; reading reports that, with the output.
                await session.drain(0, raise_write_error=False)
            except BaseException:
                session.close()
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
        """Send ``data`` to stdin, waiting while the socket is full.

        Output is read meanwhile only up to ``max_buffered``; a command that
        echoes more than that needs another task reading the session while
        this one writes.
        """
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
        """Send signal ``signal_number`` (1..64) to the command's process group."""
        await self._send_control(FrameType.SIGNAL, signal_payload(signal_number))

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
        """Wait for the exit status; output not read by then is discarded.

        ``timeout`` bounds this call in seconds, within the session's own
        deadline.  When either passes, the connection is closed and
        :class:`SessionTimeoutError` is raised.
        """
        check_session_timeout(timeout)
        session = self._live()
        core = session.core
        deadline = None if timeout is None else session.driver.loop.time() + timeout
        while core.exit_status is None:
            _discard_output(core)
            if core.failure is not None:
                raise core.error()
            await session.wait(deadline, timeout)
        _discard_output(core)
        return core.exit_status

    def close(self) -> None:
        """Close the connection; safe to call more than once."""
        self._opener = None
        if self._session is not None:
            self._session.close()

    async def _send_control(self, frame_type: int, payload: bytes) -> None:
        session = self._live()
        session.core.send(frame_type, payload)
        await session.drain(WRITE_HIGH_WATER)

    def _live(self) -> _Session:
        if self._session is None:
            raise RuntimeError(
                "exec session: not started; use 'async with' or await it"
            )
        return self._session


# Shadows the builtin on purpose: exec is the protocol's name for an
# interactive session.
def exec(
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
    max_frame: int = MAX_PAYLOAD,
) -> AsyncExecSession:
    """Prepare an interactive session; connect with ``async with`` or ``await``.

    Arguments are checked at once.
    """
    start = build_start(
        cmd, env=env, cwd=cwd, user=user, tty=tty, tty_size=tty_size,
        timeout_seconds=timeout_seconds,
    )
    _check_options(
        timeout=timeout, connect_timeout=connect_timeout, port=port,
        max_buffered=max_buffered, max_frame=max_frame,
    )

    async def open_session() -> _Session:
        return await _open(
            uds_path, start, port=port, connect_timeout=connect_timeout,
            collect=False, max_buffered=max_buffered, max_frame=max_frame,
        timeout=timeout,
        )

    return AsyncExecSession(open_session)


async def sync_clock(
    uds_path: PathLike,
    *,
    port: int = AGENT_PORT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    reply_timeout: float = CLOCK_SYNC_REPLY_TIMEOUT,
) -> int:
    """Set the guest's wall clock; the asyncio form of :func:`fcvsock.sync_clock`."""
    check_session_timeout(reply_timeout, "reply_timeout")
    handshake = await connect_async(uds_path, port, connect_timeout)
    try:
        core = SessionCore(handshake, collect=True)
        session = _Session(core, None)
    except BaseException:
        handshake.sock.close()
        raise
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
