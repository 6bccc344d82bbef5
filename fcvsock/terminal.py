"""This process's terminal in an interactive session: raw mode, escapes, resize.

:func:`interact` connects stdin, stdout and stderr to an
:class:`~fcvsock.aio.AsyncExecSession`.  When the remote command runs under a
pseudo-terminal and stdin is a terminal, the local terminal is put in raw mode.
Every key (Ctrl-C, Ctrl-Z and Ctrl-D included) then reaches the remote terminal
as typed, and only :class:`EscapeFilter` looks at the keys on the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import functools
import logging
import os
import re
import select
import signal
import termios
import tty
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import Any

from .aio import AsyncExecSession
from .errors import FcvsockError
from .session import ExitStatus

__all__ = [
    "DOUBLE_INTERRUPT_SECONDS",
    "ESCAPE_HELP",
    "EXIT_DISCONNECTED",
    "EscapeCommand",
    "EscapeFilter",
    "interact",
    "raw_mode",
    "window_size",
]

log = logging.getLogger("fcvsock.terminal")

# Exit status after ~. ends the session: the status of fcvsock's own failures.
EXIT_DISCONNECTED = 255

# Without a remote terminal, a second Ctrl-C within this many seconds of the
# first closes the session instead of sending another SIGINT.
DOUBLE_INTERRUPT_SECONDS = 1.0

ESCAPE_HELP = """\
escape sequences, typed at the start of a line:
  ~.  end the session (exit status 255)
  ~?  list the escape sequences
  ~~  send one ~"""

# Raw mode turns off ISIG, so these arrive only from kill(1) or a hang-up.
# Each one restores the terminal and exits with 128+N.
_TERMINATING_SIGNALS = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGPIPE,
    signal.SIGTERM,
)
_READ_SIZE = 65536
_Handler = Callable[[int, FrameType | None], Any] | int | None
_ESCAPE = ord("~")
_LINE_END = re.compile(rb"[\r\n]")


class EscapeCommand(enum.Enum):
    """A local action typed as an escape sequence."""

    DISCONNECT = "."
    HELP = "?"


class EscapeFilter:
    """Find ``~.``, ``~?`` and ``~~`` at the start of a line in typed input.

    A line starts at the beginning of the session and after each CR or LF
    typed.  A ``~`` there is held back until the next key, which may arrive in
    a later :meth:`feed`.  ``~~`` sends one ``~``, and ``~`` followed by any
    other key sends both keys unchanged.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._escape_pending = False

    def feed(self, data: bytes) -> list[bytes | EscapeCommand]:
        """Return the bytes to send and the commands found, in typed order."""
        items: list[bytes | EscapeCommand] = []
        forward = bytearray()
        position = 0
        while position < len(data):
            if self._escape_pending:
                self._escape_pending = False
                command = self._after_escape(data[position], forward)
                position += 1
                if command is not None:
                    if forward:
                        items.append(bytes(forward))
                        forward.clear()
                    items.append(command)
            elif self._at_line_start and data[position] == _ESCAPE:
                self._escape_pending = True
                position += 1
            else:
                line_end = _LINE_END.search(data, position)
                end = len(data) if line_end is None else line_end.end()
                forward += data[position:end]
                self._at_line_start = line_end is not None
                position = end
        if forward:
            items.append(bytes(forward))
        return items

    def _after_escape(self, key: int, forward: bytearray) -> EscapeCommand | None:
        if key == ord("."):
            return EscapeCommand.DISCONNECT
        if key == ord("?"):
            # Nothing was sent, so the line still starts here.
            return EscapeCommand.HELP
        if key == _ESCAPE:
            forward.append(_ESCAPE)
            self._at_line_start = False
            return None
        forward.append(_ESCAPE)
        forward.append(key)
        self._at_line_start = key in b"\r\n"
        return None


@contextlib.contextmanager
def raw_mode(fd: int) -> Iterator[None]:
    """Put the terminal ``fd`` in raw mode; restore its settings on leaving.

    The settings come back however the block ends, exceptions included.
    Signals that would kill the process must be caught by the caller for this
    to run; :func:`interact` does so.
    """
    saved = termios.tcgetattr(fd)
    try:
        # TCSADRAIN keeps keys typed ahead, which TCSAFLUSH would discard.
        tty.setraw(fd, termios.TCSADRAIN)
        yield
    finally:
        try:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        except termios.error as exc:
            # After a hang-up (EIO) there is no terminal left to restore.
            log.debug("restore terminal settings failed: %s", exc)


def window_size(*fds: int) -> tuple[int, int] | None:
    """Return ``(columns, rows)`` of the first of ``fds`` that is a terminal.

    A terminal that reports a size of zero counts as none, and ``None`` is
    returned when no fd has a size.
    """
    for fd in fds:
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.columns > 0 and size.lines > 0:
            return size.columns, size.lines
    return None


async def interact(
    session: AsyncExecSession,
    *,
    tty: bool,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    forward_interrupt: bool | None = None,
) -> ExitStatus | int:
    """Connect stdin, stdout and stderr to ``session`` until the session ends.

    ``tty`` means that the remote command runs under a pseudo-terminal.  Then
    the remote window size follows SIGWINCH, and when ``stdin_fd`` is a
    terminal it is in raw mode for the whole call, with escape sequences (see
    :data:`ESCAPE_HELP`) and with SIGHUP, SIGINT, SIGQUIT, SIGPIPE and SIGTERM
    ending the session.  Without ``tty`` and with a terminal on ``stdin_fd``,
    Ctrl-C sends SIGINT to the remote command, and a second Ctrl-C within
    :data:`DOUBLE_INTERRUPT_SECONDS` ends the session; ``forward_interrupt``
    overrides that choice, for callers that read stdin from elsewhere.  EOF
    on stdin is sent as EOF.

    Returns the remote exit status, or the exit code for a session that ended
    here: :data:`EXIT_DISCONNECTED` after ``~.`` and 128+N after signal N.
    Signal handlers are installed on the running loop, so this must run in
    the main thread.  Signals ignored at the start stay ignored, and the
    handlers replaced are put back at the end.
    """
    interaction = _Interaction(session, tty, stdin_fd, stdout_fd, stderr_fd)
    if forward_interrupt is not None:
        interaction.forward_interrupt = forward_interrupt
    return await interaction.run()


class _Interaction:
    def __init__(
        self,
        session: AsyncExecSession,
        tty: bool,
        stdin_fd: int,
        stdout_fd: int,
        stderr_fd: int,
    ) -> None:
        self._session = session
        self._stdin_fd = stdin_fd
        self._stdout_fd = stdout_fd
        self._stderr_fd = stderr_fd
        stdin_is_terminal = os.isatty(stdin_fd)
        self._raw = tty and stdin_is_terminal
        self._track_window = tty
        self.forward_interrupt = not tty and stdin_is_terminal
        self._stdin_pollable = True
        self._loop = asyncio.get_running_loop()
        self._local_exit: asyncio.Future[int] = self._loop.create_future()
        self._last_interrupt: float | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def run(self) -> ExitStatus | int:
        previous = self._install_signal_handlers()
        try:
            with raw_mode(self._stdin_fd) if self._raw else contextlib.nullcontext():
                if self._track_window:
                    # The size sent in START may be stale after a slow connect,
                    # and a resize to the same size makes no SIGWINCH remotely.
                    self._on_window_change()
                return await self._relay()
        finally:
            self._restore_signal_handlers(previous)
            for task in self._background:
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)

    def _install_signal_handlers(self) -> dict[int, _Handler]:
        """Install the session's handlers; return the ones they replaced."""
        handlers: dict[int, Callable[[], None]] = {}
        if self._track_window:
            handlers[signal.SIGWINCH] = self._on_window_change
        if self._raw:
            for terminating in _TERMINATING_SIGNALS:
                handlers[terminating] = functools.partial(self._end, 128 + terminating)
        if self.forward_interrupt:
            handlers[signal.SIGINT] = self._on_interrupt
        previous: dict[int, _Handler] = {}
        try:
            for signal_number, handler in handlers.items():
                current = signal.getsignal(signal_number)
                # A signal that the parent process ignored, as nohup does with
                # SIGHUP, stays ignored.
                if current == signal.SIG_IGN and signal_number != signal.SIGWINCH:
                    continue
                self._loop.add_signal_handler(signal_number, handler)
                previous[signal_number] = current
        except BaseException:
            self._restore_signal_handlers(previous)
            raise
        return previous

    def _restore_signal_handlers(self, previous: dict[int, _Handler]) -> None:
        for signal_number, handler in previous.items():
            self._loop.remove_signal_handler(signal_number)
            # None: the handler was not installed from Python, so asyncio's
            # default is all that can be put back.
            if handler is not None:
                signal.signal(signal_number, handler)

    async def _relay(self) -> ExitStatus | int:
        output = self._loop.create_task(self._forward_output())
        feeder = self._loop.create_task(self._forward_input())
        ends: set[asyncio.Future[Any]] = {output, self._local_exit}
        try:
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (output, feeder):
                task.cancel()
            await asyncio.gather(output, feeder, return_exceptions=True)
        if self._local_exit.done():
            return self._local_exit.result()
        return output.result()

    async def _forward_output(self) -> ExitStatus | int:
        try:
            async for chunk in self._session:
                fd = self._stdout_fd if chunk.stream == "stdout" else self._stderr_fd
                _write_all(fd, chunk.data)
        except BrokenPipeError:
            # The reader of a stdout pipe left while SIGPIPE was caught (in
            # raw mode) or ignored (Python's default outside the CLI).
            return 128 + signal.SIGPIPE
        return await self._session.wait()

    async def _forward_input(self) -> None:
        escapes = EscapeFilter() if self._raw else None
        try:
            while data := await self._read_input():
                if escapes is None:
                    await self._session.write(data)
                    continue
                for item in escapes.feed(data):
                    if isinstance(item, bytes):
                        await self._session.write(item)
                    elif item is EscapeCommand.HELP:
                        self._print("\r\n" + ESCAPE_HELP.replace("\n", "\r\n") + "\r\n")
                    else:
                        self._print("\r\nfcvsock: session closed by ~.\r\n")
                        self._end(EXIT_DISCONNECTED)
                        return
            await self._session.close_stdin()
        except FcvsockError as exc:
            # The output side raises the same failure with its context.
            log.debug("stdin forwarding stopped: %s", exc)

    async def _read_input(self) -> bytes:
        while True:
            if self._stdin_pollable:
                try:
                    await _wait_readable(self._loop, self._stdin_fd)
                except PermissionError:
                    # epoll rejects regular files and /dev/null, whose reads
                    # never block anyway.
                    self._stdin_pollable = False
            try:
                return os.read(self._stdin_fd, _READ_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                # EIO: the terminal hung up, or this process lost it.
                level = logging.DEBUG if exc.errno == errno.EIO else logging.WARNING
                log.log(level, "read stdin failed, sending EOF: %s", exc)
                return b""

    def _on_window_change(self) -> None:
        size = window_size(self._stdin_fd, self._stdout_fd)
        if size is not None:
            self._spawn(self._session.resize(*size))

    def _on_interrupt(self) -> None:
        now = self._loop.time()
        last, self._last_interrupt = self._last_interrupt, now
        if last is not None and now - last < DOUBLE_INTERRUPT_SECONDS:
            self._print("fcvsock: second Ctrl-C; session closed\n")
            self._end(128 + signal.SIGINT)
            return
        self._spawn(self._session.signal(signal.SIGINT))

    def _end(self, exit_code: int) -> None:
        if not self._local_exit.done():
            self._local_exit.set_result(exit_code)

    def _print(self, message: str) -> None:
        # Best effort: the terminal may already be gone.
        with contextlib.suppress(OSError):
            _write_all(self._stderr_fd, message.encode())

    def _spawn(self, control: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(_send_control(control))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _send_control(control: Coroutine[Any, Any, None]) -> None:
    try:
        await control
    except FcvsockError as exc:
        log.debug("control frame not sent: %s", exc)


async def _wait_readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _resolve, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Another process made the shared open file description
            # non-blocking, so wait here as a blocking write would.
            select.select([], [fd], [])
            continue
        view = view[written:]
