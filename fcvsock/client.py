"""The blocking API: run, stream, exec, sync_clock and raw connections.

Every call drives one non-blocking socket with ``poll``; no thread is
started.  The asyncio twin is :mod:`fcvsock.aio`.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Self

from ._request import (
    InputFeeder,
    build_start,
    check_session_timeout,
    deadline_after,
    signal_payload,
)
from .errors import (
    ClockSyncError,
    ConnectionLostError,
    SessionTimeoutError,
)
from .handshake import (
    DEFAULT_CONNECT_TIMEOUT,
    Handshake,
    check_guest_port,
    check_timeout,
    connect_blocking,
)
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
    check_max_buffered,
    check_max_frame,
)

__all__ = ["ExecSession", "connect", "exec", "run", "stream", "sync_clock"]

PathLike = str | os.PathLike[str]
CLOCK_SYNC_REPLY_TIMEOUT = 5.0
_READ_EVENTS = select.POLLIN | select.POLLHUP | select.POLLERR


class _Deadline(Exception):
    pass


def _wait(core: SessionCore, deadline: float | None) -> None:
    """Block until the socket can do what ``core`` wants, and do it."""
    events = 0
    if core.wants_read:
        events |= select.POLLIN
    if core.pending_writes:
        events |= select.POLLOUT
    if not events:
        return
    timeout_ms = None
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # Checked before polling: a socket that always has data would
            # otherwise let poll(0) succeed forever past the deadline.
            raise _Deadline
        timeout_ms = remaining * 1000
    poller = select.poll()
    poller.register(core.fd, events)
    ready = poller.poll(timeout_ms)
    if not ready:
        raise _Deadline
    revents = ready[0][1]
    if core.pending_writes and revents & (select.POLLOUT | _READ_EVENTS):
        core.flush()
    if core.wants_read and revents & _READ_EVENTS:
        core.on_readable()


def _open(
    uds_path: PathLike,
    start: bytes,
    *,
    port: int,
    connect_timeout: float,
    collect: bool,
    max_buffered: int,
    max_frame: int = MAX_PAYLOAD,
) -> SessionCore:
    handshake = connect_blocking(uds_path, port, connect_timeout)
    try:
        core = SessionCore(
            handshake, collect=collect, max_buffered=max_buffered, max_frame=max_frame
        )
        core.send(FrameType.START, start)
    except BaseException:
        handshake.sock.close()
        raise
    return core


def _timed_out(core: SessionCore, limit: float | None) -> SessionTimeoutError:
    within = "before the deadline" if limit is None else f"within {limit:g} s"
    error = core.make_error(
        SessionTimeoutError, f"no exit status {within}; connection closed"
    )
    assert isinstance(error, SessionTimeoutError)
    return error


def _check_options(
    *,
    timeout: float | None,
    connect_timeout: float,
    port: int,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
    max_frame: int = MAX_PAYLOAD,
) -> None:
    """Raise on an invalid option before anything connects."""
    check_session_timeout(timeout)
    check_timeout(connect_timeout)
    check_guest_port(port)
    check_max_buffered(max_buffered)
    check_max_frame(max_frame)


def run(
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
    """Run ``cmd`` in the guest and return its exit status and output.

    ``input`` is sent as the command's stdin, followed by EOF.
    ``timeout_seconds`` asks the agent to kill the command's process group
    after that many seconds; ``timeout`` is the host's own deadline, from
    START to the exit status, after which the connection is closed and
    :class:`SessionTimeoutError` raised with the output received.
    ``connect_timeout`` bounds the handshake and its retries.  With
    ``check=True`` a non-zero exit raises :class:`CommandFailedError`.
    """
    start = build_start(
        cmd, env=env, cwd=cwd, user=user, tty=tty, tty_size=tty_size,
        timeout_seconds=timeout_seconds,
    )
    feeder = InputFeeder(input)
    _check_options(timeout=timeout, connect_timeout=connect_timeout, port=port)
    core = _open(
        uds_path, start, port=port, connect_timeout=connect_timeout,
        collect=True, max_buffered=DEFAULT_MAX_BUFFERED,
    )
    deadline = deadline_after(timeout)
    try:
        while not core.finished:
            if not feeder.eof_sent:
                core.send_input(feeder)
            _wait(core, deadline)
    except _Deadline:
        raise _timed_out(core, timeout) from None
    finally:
        core.close()
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
) -> Iterator[StreamItem]:
    """Run ``cmd`` and yield :class:`Output` chunks as they arrive.

    The last item is the :class:`ExitStatus`.  About ``max_buffered`` bytes
    of output (at most two frames more) wait in memory between reads; beyond
    that the socket is not read and the guest blocks.  ``max_frame`` ends
    the session with :class:`SessionProtocolError` on a frame larger than
    that many bytes; the protocol allows 16 MiB, the reference agent sends
    at most 64 KiB, so a lower value bounds memory per session tighter.
    Other arguments are those of :func:`run` and are checked at once; the
    connection is made when iteration starts.  Closing the generator early closes the connection,
    and the agent then kills the command.
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
        uds_path, start, feeder, timeout=timeout, connect_timeout=connect_timeout,
        port=port, max_buffered=max_buffered, max_frame=max_frame,
    )


def _stream(
    uds_path: PathLike,
    start: bytes,
    feeder: InputFeeder,
    *,
    timeout: float | None,
    connect_timeout: float,
    port: int,
    max_buffered: int,
    max_frame: int,
) -> Iterator[StreamItem]:
    core = _open(
        uds_path, start, port=port, connect_timeout=connect_timeout,
        collect=False, max_buffered=max_buffered, max_frame=max_frame,
    )
    deadline = deadline_after(timeout)
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
                core.send_input(feeder)
            try:
                _wait(core, deadline)
            except _Deadline:
                raise _timed_out(core, timeout) from None
    finally:
        core.close()


class ExecSession:
    """An interactive session with one command in the guest.

    Write stdin with :meth:`write`, end it with :meth:`close_stdin`, iterate
    over the session for :class:`Output` chunks, and call :meth:`wait` for
    the :class:`ExitStatus`.  Use it as a context manager: leaving the block
    closes the connection, and the agent then kills a command still running.
    """

    def __init__(self, core: SessionCore, timeout: float | None) -> None:
        self._core = core
        self._timeout = timeout
        self._deadline = deadline_after(timeout)
        self._stdin_closed = False

    @property
    def host_port(self) -> int:
        """The port number the VMM assigned to this connection."""
        return self._core.host_port

    @property
    def exit_status(self) -> ExitStatus | None:
        """The exit status once received, else None."""
        return self._core.exit_status

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` to the command's stdin, blocking while the socket is full.

        Output is read meanwhile, but only up to ``max_buffered``: a command
        that echoes more than that (``cat`` fed a large input) blocks both
        sides until the session's deadline.  Read output while writing, from
        another thread or with :func:`fcvsock.aio.exec`, or use :func:`run`
        with ``input=``, which collects output as it writes.
        """
        if self._stdin_closed:
            raise ValueError("write: stdin was already closed")
        feeder = InputFeeder(data)
        while (payload := feeder.next_frame()) is not None:
            self._core.send(FrameType.STDIN, payload)
            self._drain(WRITE_HIGH_WATER)

    def resize(self, columns: int, rows: int) -> None:
        """Set the size of the command's terminal (ignored without a tty)."""
        self._send_control(FrameType.RESIZE, encode_resize(columns, rows))

    def signal(self, signal_number: int) -> None:
        """Send signal ``signal_number`` (1..64) to the command's process group."""
        self._send_control(FrameType.SIGNAL, signal_payload(signal_number))

    def close_stdin(self) -> None:
        """Send EOF on the command's stdin; later writes raise."""
        if not self._stdin_closed:
            self._stdin_closed = True
            self._send_control(FrameType.EOF, b"")

    def read(self) -> Output | None:
        """Return the next output chunk, or None once the command exited."""
        core = self._core
        while True:
            item = core.pop()
            if item is not None:
                return item
            if core.exit_status is not None:
                return None
            if core.failure is not None:
                raise core.error()
            self._wait(self._deadline, self._timeout)

    def __iter__(self) -> Iterator[Output]:
        while (item := self.read()) is not None:
            yield item

    def wait(self, timeout: float | None = None) -> ExitStatus:
        """Wait for the exit status; output not read by then is discarded.

        ``timeout`` bounds this call in seconds, within the session's own
        deadline.  When either passes, the connection is closed and
        :class:`SessionTimeoutError` is raised.
        """
        deadline, limit = self._deadline, self._timeout
        wait_deadline = deadline_after(timeout)
        if wait_deadline is not None and (deadline is None or wait_deadline < deadline):
            deadline, limit = wait_deadline, timeout
        core = self._core
        while core.exit_status is None:
            _discard_output(core)
            if core.failure is not None:
                raise core.error()
            self._wait(deadline, limit)
        _discard_output(core)
        return core.exit_status

    def close(self) -> None:
        """Close the connection; safe to call more than once."""
        self._core.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _send_control(self, frame_type: int, payload: bytes) -> None:
        self._core.send(frame_type, payload)
        self._drain(WRITE_HIGH_WATER)

    def _drain(self, high_water: int, *, raise_write_error: bool = True) -> None:
        core = self._core
        core.flush()
        while core.pending_writes > high_water:
            if core.sock is None or core.write_error is not None:
                break
            self._wait(self._deadline, self._timeout)
        if core.write_error is not None and raise_write_error:
            raise core.make_error(
                ConnectionLostError,
                f"send to guest failed: {core.write_error}",
                core.write_error,
            )

    def _wait(self, deadline: float | None, limit: float | None) -> None:
        try:
            _wait(self._core, deadline)
        except _Deadline:
            self._core.close()
            raise _timed_out(self._core, limit) from None


def _discard_output(core: SessionCore) -> None:
    while core.pop() is not None:
        pass


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
) -> ExecSession:
    """Start ``cmd`` and return an :class:`ExecSession` for it.

    Arguments are those of :func:`run`; stdin stays open until
    :meth:`ExecSession.close_stdin`.  ``timeout`` runs from the START frame.
    """
    start = build_start(
        cmd, env=env, cwd=cwd, user=user, tty=tty, tty_size=tty_size,
        timeout_seconds=timeout_seconds,
    )
    _check_options(
        timeout=timeout, connect_timeout=connect_timeout, port=port,
        max_buffered=max_buffered, max_frame=max_frame,
    )
    core = _open(
        uds_path, start, port=port, connect_timeout=connect_timeout,
        collect=False, max_buffered=max_buffered, max_frame=max_frame,
    )
    session = ExecSession(core, timeout)
    try:
        # A guest that closed before taking START may still have sent output
        # and EOF; reading reports that, with the output.
        session._drain(0, raise_write_error=False)
    except BaseException:
        core.close()
        raise
    return session


def sync_clock(
    uds_path: PathLike,
    *,
    port: int = AGENT_PORT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    reply_timeout: float = CLOCK_SYNC_REPLY_TIMEOUT,
) -> int:
    """Set the guest's wall clock to the host's; return the time sent (ns).

    The host time is read after the handshake, right before the frame goes
    out.  Raise :class:`ClockSyncError` naming the agent's code when it
    does not reply 0 within ``reply_timeout`` seconds.
    """
    check_session_timeout(reply_timeout, "reply_timeout")
    handshake = connect_blocking(uds_path, port, connect_timeout)
    core = SessionCore(handshake, collect=True)
    try:
        sent_ns = time.time_ns()
        seconds, nanoseconds = divmod(sent_ns, 1_000_000_000)
        core.send(FrameType.CLOCK_SYNC, encode_clock_sync(seconds, nanoseconds))
        core.flush()
        deadline = deadline_after(reply_timeout)
        while not core.finished:
            _wait(core, deadline)
    except _Deadline:
        raise ClockSyncError(
            f"sync clock via {os.fspath(uds_path)}: no reply within {reply_timeout:g} s"
        ) from None
    finally:
        core.close()
    return _check_clock_reply(core, uds_path, sent_ns)


def _check_clock_reply(core: SessionCore, uds_path: PathLike, sent_ns: int) -> int:
    where = os.fspath(uds_path)
    if core.exit_status is None:
        error = core.error()
        raise ClockSyncError(f"sync clock via {where}: {error}") from error
    code = core.exit_status.exit_code
    signal_number = core.exit_status.signal
    if code != 0 or signal_number is not None:
        detail = f" and signal {signal_number}" if signal_number is not None else ""
        hint = ""
        if code == -1:
            # The reference agent's reply when clock_settime fails or the
            # payload is invalid.
            hint = (
                "; the agent could not set the clock (it needs root in the "
                "guest, and a stand-in VM without a virtual clock refuses)"
            )
        raise ClockSyncError(
            f"sync clock via {where}: agent replied with code {code}{detail}, "
            f"expected 0{hint}",
            code,
        )
    return sent_ns


def connect(
    uds_path: PathLike,
    port: int,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Handshake:
    """Open a raw stream to ``port`` in the guest (handshake only).

    The returned socket is non-blocking; call ``setblocking(True)`` for
    blocking use.  Read ``initial_data`` before the socket: it contains guest
    bytes that arrived with the VMM's reply.
    """
    return connect_blocking(uds_path, port, timeout)
