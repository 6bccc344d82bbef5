"""The reference guest agent of the exec protocol on guest port 52.

Each connection carries one session: a START that runs one command, or one
CLOCK_SYNC.  The agent runs on one asyncio event loop in one thread and drives
every fd itself through ``add_reader``/``add_writer``:

- Host socket to command: frames come from the frame decoder.  While the
  command's stdin buffer is above its high-water mark the socket is not read,
  so a command that does not read stdin makes the host's writes block.  A
  socket that is not being read is watched for hang-up in a separate epoll
  set, so a host that disconnects then is still noticed.
- Command to host: output fds are read in chunks of at most
  ``MAX_OUTPUT_CHUNK`` bytes and queued as frames.  While the frame writer
  holds more than its high-water mark the output fds are not read, so a host
  that does not read blocks the command instead of growing the agent.
- Children: one SIGCHLD handler reaps them and passes each wait status to the
  session that spawned the process.

Wire details, exit codes and the handoff of pre-connected sockets are in the
docstrings of :class:`Agent` and :func:`main`.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import ctypes
import enum
import errno
import fcntl
import functools
import json
import logging
import os
import pwd
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self

from ._core import FrameDecoder, FrameWriter
from .clock import ClockSetter, SystemClock, VirtualClock
from .errors import ProtocolError
from .protocol import (
    MAX_OUTPUT_CHUNK,
    FrameType,
    StartRequest,
    decode_clock_sync,
    decode_resize,
    decode_signal,
    encode_exit,
)

__all__ = [
    "DEFAULT_EXIT_GRACE",
    "DEFAULT_FIRST_FRAME_TIMEOUT",
    "DEFAULT_MAX_SESSIONS",
    "Agent",
    "Credentials",
    "main",
    "resolve_user",
    "set_child_subreaper",
]

log = logging.getLogger("fcvsock.agent")

DEFAULT_MAX_SESSIONS = 256
DEFAULT_FIRST_FRAME_TIMEOUT = 30.0
DEFAULT_EXIT_GRACE = 0.2

EXIT_INVALID_START = 125
EXIT_NOT_PERMITTED = 126
EXIT_CANNOT_START = 127
EXIT_CLOCK_SYNC_FAILED = -1

_OUTPUT_HIGH_WATER = 256 * 1024
_OUTPUT_LOW_WATER = 64 * 1024
_STDIN_HIGH_WATER = 256 * 1024
_STDIN_LOW_WATER = 64 * 1024
_HOST_READ_BUDGET = 256 * 1024
_HOST_READS_PER_EVENT = 4
_DECODER_BUFFER_SIZE = 64 * 1024
# A pipe buffers 64 KiB by default, and an unprivileged process can grow it up
# to pipe-max-size, 1 MiB by default (pipe(7)). So this drains what the leader left.
_GRACE_DRAIN_LIMIT = 1024 * 1024
_ACCEPTS_PER_EVENT = 16
_ACCEPT_RETRY_DELAY = 0.5
# Firecracker's vsock muxer keeps at most 1023 connections (MAX_CONNECTIONS in
# src/vmm/src/devices/virtio/vsock/unix/mod.rs), so a burst of them all fits.
_LISTEN_BACKLOG = 1024
_MAX_ERROR_MESSAGE = 4096
_HANDOFF_MAX_FDS = 16
_HANDOFF_MAX_MESSAGE = 4096
_HANDOFF_MESSAGES_PER_EVENT = 32
_CHILD_WAIT_ON_CLOSE = 1.0
_MAX_ID = 2**32 - 2
# From <linux/prctl.h>.
_PR_SET_CHILD_SUBREAPER = 36
_WINSIZE = struct.Struct("HHHH")
_NUMERIC_USER = re.compile(r"([0-9]+)(?::([0-9]+))?")


# Users and processes.


@dataclass
class Credentials:
    """The identity a command runs as, and the environment that goes with it."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def resolve_user(
    spec: str, euid: int | None = None, egid: int | None = None
) -> Credentials | None:
    """Return the credentials to run a command as ``spec``.

    ``spec`` is "" (the agent's own user), a user name or ``uid[:gid]``.
    Returns ``None`` when no switch is needed.  Raises ``LookupError`` for an
    unknown user.  Raises ``PermissionError`` when ``euid`` (default: the
    effective uid) is not root and ``spec`` names another user.
    """
    if not spec:
        return None
    credentials = _lookup_user(spec)
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    if euid == 0:
        return credentials
    if (credentials.uid, credentials.gid) == (euid, egid):
        return None
    raise PermissionError(
        f"start: cannot run as user {spec!r}: only root can switch users, "
        f"and the agent runs as uid {euid}"
    )


def _lookup_user(spec: str) -> Credentials:
    match = _NUMERIC_USER.fullmatch(spec)
    if match is None:
        try:
            entry = pwd.getpwnam(spec)
        except (KeyError, ValueError):
            # ValueError: a name that cannot be encoded, such as a lone surrogate.
            raise LookupError(f"start: unknown user {spec!r}") from None
        return _credentials_of(entry, entry.pw_gid)
    uid = int(match[1])
    gid = None if match[2] is None else int(match[2])
    if uid > _MAX_ID or (gid is not None and gid > _MAX_ID):
        raise LookupError(f"start: user ids must be at most {_MAX_ID}, got {spec!r}")
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # An id without a passwd entry runs with no supplementary groups.
        return Credentials(uid, uid if gid is None else gid)
    return _credentials_of(entry, entry.pw_gid if gid is None else gid)


def _credentials_of(entry: pwd.struct_passwd, gid: int) -> Credentials:
    groups = tuple(os.getgrouplist(entry.pw_name, gid))
    env = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}
    return Credentials(entry.pw_uid, gid, groups, env)


def set_child_subreaper() -> None:
    """Make orphaned descendants of this process its children (prctl(2)).

    The agent then reaps them, as an init process would.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl PR_SET_CHILD_SUBREAPER failed: {os.strerror(code)}")


def _exit_status(wait_status: int) -> tuple[int, int]:
    """Return ``(exit_code, signal)`` with 128+N and N for death by signal N."""
    if os.WIFSIGNALED(wait_status):
        signal_number = os.WTERMSIG(wait_status)
        return 128 + signal_number, signal_number
    return os.WEXITSTATUS(wait_status), 0


def _kill_group(pgid: int, signal_number: int) -> None:
    try:
        os.killpg(pgid, signal_number)
    except ProcessLookupError:
        pass
    except OSError as exc:
        log.warning(
            "kill process group %d with signal %d: %s", pgid, signal_number, exc
        )


def _set_window_size(fd: int, columns: int, rows: int) -> None:
    # TIOCSWINSZ on the master resizes the terminal pair. When the size changes,
    # the kernel sends SIGWINCH to its foreground process group (ioctl_tty(2)).
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, columns, 0, 0))


def _eof_character(master_fd: int) -> bytes:
    try:
        control_characters = termios.tcgetattr(master_fd)[6]
    except termios.error:
        return b"\x04"
    character = control_characters[termios.VEOF]
    return character if isinstance(character, bytes) else bytes([character])


# Spawning a command.


class _StartRejected(Exception):
    """A START that cannot run: the exit code and message the host receives."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


@dataclass
class _Child:
    """A spawned command and the agent's ends of its stdio."""

    popen: subprocess.Popen[bytes]
    stdin_fd: int
    stdout_fd: int
    stderr_fd: int | None

    @property
    def pid(self) -> int:
        return self.popen.pid


def _spawn(request: StartRequest, cwd: str, credentials: Credentials | None) -> _Child:
    if not request.cmd[0]:
        raise _StartRejected(EXIT_CANNOT_START, "start: command '' not found")
    env = _child_env(request, credentials)
    if request.tty:
        return _spawn_with_pty(request, cwd, env, credentials)
    return _spawn_with_pipes(request, cwd, env, credentials)


def _child_env(
    request: StartRequest, credentials: Credentials | None
) -> dict[str, str]:
    for key in request.env:
        if not key or "=" in key:
            raise _StartRejected(
                EXIT_INVALID_START,
                f"start: env keys must be non-empty and contain no '=', got {key!r}",
            )
    env = dict(os.environ)
    if credentials is not None:
        env.update(credentials.env)
    env.update(request.env)
    return env


def _spawn_with_pipes(
    request: StartRequest,
    cwd: str,
    env: dict[str, str],
    credentials: Credentials | None,
) -> _Child:
    pipes = _open_pipes(request.cmd[0])
    (stdin_read, stdin_write), (stdout_read, stdout_write) = pipes[0], pipes[1]
    stderr_read, stderr_write = pipes[2]
    try:
        popen = _popen(
            request, cwd, env, credentials, (stdin_read, stdout_write, stderr_write)
        )
    except BaseException:
        for fd in (stdin_write, stdout_read, stderr_read):
            os.close(fd)
        raise
    finally:
        for fd in (stdin_read, stdout_write, stderr_write):
            os.close(fd)
    for fd in (stdin_write, stdout_read, stderr_read):
        os.set_blocking(fd, False)
    return _Child(popen, stdin_write, stdout_read, stderr_read)


def _open_pipes(program: str) -> list[tuple[int, int]]:
    pipes: list[tuple[int, int]] = []
    try:
        for _ in range(3):
            pipes.append(os.pipe2(os.O_CLOEXEC))
    except OSError as exc:
        for read_fd, write_fd in pipes:
            os.close(read_fd)
            os.close(write_fd)
        raise _StartRejected(
            EXIT_CANNOT_START, f"start: cannot create pipes for {program!r}: {exc}"
        ) from None
    return pipes


def _spawn_with_pty(
    request: StartRequest,
    cwd: str,
    env: dict[str, str],
    credentials: Credentials | None,
) -> _Child:
    try:
        master_fd, slave_fd = os.openpty()
    except OSError as exc:
        raise _StartRejected(
            EXIT_NOT_PERMITTED, f"start: cannot allocate a pseudo-terminal: {exc}"
        ) from None
    try:
        _prepare_terminal(request, master_fd, slave_fd, credentials)
        popen = _popen(
            request, cwd, env, credentials, (slave_fd, slave_fd, slave_fd), True
        )
    except BaseException:
        os.close(master_fd)
        raise
    finally:
        # The master reads EIO only once every copy of the slave is closed.
        os.close(slave_fd)
    os.set_blocking(master_fd, False)
    return _Child(popen, master_fd, master_fd, None)


def _prepare_terminal(
    request: StartRequest,
    master_fd: int,
    slave_fd: int,
    credentials: Credentials | None,
) -> None:
    try:
        if request.tty_width > 0 and request.tty_height > 0:
            _set_window_size(master_fd, request.tty_width, request.tty_height)
        if credentials is not None:
            os.fchown(slave_fd, credentials.uid, -1)
    except OSError as exc:
        raise _StartRejected(
            EXIT_NOT_PERMITTED, f"start: cannot set up the pseudo-terminal: {exc}"
        ) from None


def _acquire_controlling_terminal() -> None:
    # Runs in the child after setsid(), with the pty slave already on fd 0.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _popen(
    request: StartRequest,
    cwd: str,
    env: dict[str, str],
    credentials: Credentials | None,
    stdio: tuple[int, int, int],
    controlling_terminal: bool = False,
) -> subprocess.Popen[bytes]:
    program = request.cmd[0]
    try:
        return subprocess.Popen(
            request.cmd,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            cwd=cwd,
            env=env,
            start_new_session=True,
            # The agent runs one thread, so no lock can be held across fork().
            preexec_fn=(  # noqa: PLW1509
                _acquire_controlling_terminal if controlling_terminal else None
            ),
            user=None if credentials is None else credentials.uid,
            group=None if credentials is None else credentials.gid,
            extra_groups=None if credentials is None else list(credentials.groups),
        )
    except OSError as exc:
        raise _spawn_failure(program, cwd, exc) from None
    except subprocess.SubprocessError as exc:
        raise _StartRejected(
            EXIT_NOT_PERMITTED,
            f"start: cannot make the pseudo-terminal the controlling terminal of "
            f"{program!r}: {exc}",
        ) from None
    except ValueError as exc:
        raise _StartRejected(EXIT_INVALID_START, f"start: {exc}") from None


def _spawn_failure(program: str, cwd: str, exc: OSError) -> _StartRejected:
    reason = exc.strerror or str(exc)
    code = EXIT_NOT_PERMITTED if isinstance(exc, PermissionError) else EXIT_CANNOT_START
    if exc.filename == cwd and program != cwd:
        return _StartRejected(
            code, f"start: cannot change to working directory {cwd!r}: {reason}"
        )
    if isinstance(exc, FileNotFoundError):
        return _StartRejected(code, f"start: command {program!r} not found: {reason}")
    if isinstance(exc, PermissionError):
        return _StartRejected(code, f"start: permission denied running {program!r}")
    return _StartRejected(code, f"start: cannot run {program!r}: {reason}")


# Reaping children and watching for hang-ups.


class _Reaper:
    """Reaps children on SIGCHLD and hands each wait status to its session.

    With ``reap_orphans`` it reaps any child, including orphans reparented to
    the agent as PID 1 or as a subreaper, and discards statuses of unknown
    pids.  Without it, it waits only for the pids it spawned, so an agent
    embedded in a bigger program leaves that program's children alone.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, reap_orphans: bool) -> None:
        self._loop = loop
        self._reap_orphans = reap_orphans
        self._children: dict[
            int, tuple[subprocess.Popen[bytes], Callable[[int], None] | None]
        ] = {}

    @property
    def watched(self) -> int:
        return len(self._children)

    def install(self) -> None:
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        self._loop.remove_signal_handler(signal.SIGCHLD)

    def watch(
        self, popen: subprocess.Popen[bytes], on_exit: Callable[[int], None]
    ) -> None:
        self._children[popen.pid] = (popen, on_exit)

    def forget(self, pid: int) -> None:
        entry = self._children.get(pid)
        if entry is not None:
            self._children[pid] = (entry[0], None)

    def reap(self) -> None:
        if self._reap_orphans:
            self._reap_any()
            return
        for pid in list(self._children):
            self._reap_one(pid)

    def _reap_any(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._dispatch(pid, wait_status)

    def _reap_one(self, pid: int) -> None:
        try:
            reaped, wait_status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            log.warning("reap pid %d: another waiter took its exit status", pid)
            reaped, wait_status = pid, 255 << 8
        if reaped:
            self._dispatch(pid, wait_status)

    def _dispatch(self, pid: int, wait_status: int) -> None:
        entry = self._children.pop(pid, None)
        if entry is None:
            log.debug("reaped orphan pid %d with wait status %#x", pid, wait_status)
            return
        popen, on_exit = entry
        # Popen.__del__ waits again for a child whose returncode is unset, which
        # could steal the status of a later child that reuses the pid.
        popen.returncode = os.waitstatus_to_exitcode(wait_status)
        if on_exit is None:
            return
        try:
            on_exit(wait_status)
        except Exception:
            log.exception("handle exit of pid %d", pid)


class _HangupWatcher:
    """Reports hang-ups on sockets that are not being read.

    A session stops reading its host socket while the command does not read
    stdin, but must still notice a host that disconnects meanwhile.  The
    sockets wait in an epoll set for EPOLLRDHUP only, so buffered frames do
    not wake the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._on_ready)

    def watch(self, fd: int, on_hangup: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLRDHUP)
        self._callbacks[fd] = on_hangup

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    def _on_ready(self) -> None:
        for fd, _ in self._epoll.poll(0):
            on_hangup = self._callbacks.pop(fd, None)
            if on_hangup is not None:
                self._epoll.unregister(fd)
                on_hangup()


# The host side of a session.


class _LinkHandler(Protocol):
    def on_frames(self, frames: list[tuple[int, bytes]]) -> None: ...

    def on_host_lost(self, reason: str) -> None: ...

    def on_host_writable(self, pending: int) -> None: ...


class _HostLink:
    """Frames in from the host socket and out to it, with flow control."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        hangups: _HangupWatcher,
        handler: _LinkHandler,
    ) -> None:
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._hangups = hangups
        self._handler = handler
        self._decoder = FrameDecoder(buffer_size=_DECODER_BUFFER_SIZE)
        self._writer = FrameWriter()
        self._reading = False
        self._writing = False
        self._closed = False
        self._failed = False

    @property
    def pending(self) -> int:
        return int(self._writer.pending)

    def resume_reading(self) -> None:
        if self._closed or self._reading:
            return
        self._hangups.unwatch(self._fd)
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True
        # Bytes or a decoder error may already be waiting without a new event.
        self._loop.call_soon(self._on_readable)

    def pause_reading(self) -> None:
        if not self._reading:
            return
        self._loop.remove_reader(self._fd)
        self._reading = False
        self._hangups.watch(self._fd, functools.partial(self._lose, "host hung up"))

    def send(self, frame_type: int, payload: bytes = b"") -> None:
        if self._closed or self._failed:
            return
        self._writer.write(frame_type, payload)
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hangups.unwatch(self._fd)
        if self._reading:
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._sock.close()

    def _on_readable(self) -> None:
        for _ in range(_HOST_READS_PER_EVENT):
            if self._closed or not self._reading:
                return
            try:
                frames = self._decoder.read_fd(self._fd, _HOST_READ_BUDGET)
            except (ProtocolError, OSError) as exc:
                self._lose(f"read from host failed: {exc}")
                return
            if frames:
                self._handler.on_frames(frames)
            if self._decoder.at_eof:
                self._lose("host closed the connection")
                return
            if not frames:
                return
        self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        self._flush()
        if not self._closed and not self._failed:
            self._handler.on_host_writable(self._writer.pending)

    def _flush(self) -> None:
        try:
            pending = self._writer.flush(self._fd)
        except OSError as exc:
            self._failed = True
            self._set_writing(False)
            self._loop.call_soon(self._lose, f"write to host failed: {exc}")
            return
        self._set_writing(pending > 0)

    def _set_writing(self, writing: bool) -> None:
        if writing == self._writing or self._closed:
            return
        if writing:
            self._loop.add_writer(self._fd, self._on_writable)
        else:
            self._loop.remove_writer(self._fd)
        self._writing = writing

    def _lose(self, reason: str) -> None:
        if not self._closed:
            self._handler.on_host_lost(reason)


# The command side of a session.


class _OutputPump:
    """Forwards one output fd of the command to the host as frames."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        frame_type: FrameType,
        session: _Session,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._frame_type = frame_type
        self._session = session
        self._reading = False
        self.done = False

    def resume(self) -> None:
        if not self.done and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def close(self) -> None:
        self.pause()
        self.done = True

    def drain(self, limit: int) -> None:
        """Forward the bytes the fd contains now, up to ``limit``, and stop."""
        forwarded = 0
        while not self.done and forwarded < limit:
            chunk = self._read()
            if not chunk:
                break
            self._session.send_output(self._frame_type, chunk)
            forwarded += len(chunk)
        self.close()

    def _on_readable(self) -> None:
        chunk = self._read()
        if chunk:
            self._session.send_output(self._frame_type, chunk)

    def _read(self) -> bytes | None:
        try:
            chunk = os.read(self._fd, MAX_OUTPUT_CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            # A pty master reads EIO once every slave fd is closed.
            if exc.errno != errno.EIO:
                log.warning("read command output: %s", exc)
            chunk = b""
        if not chunk:
            self.close()
            self._session.on_output_done()
        return chunk


class _InputPump:
    """Writes STDIN payloads to the command, buffering what it has not read yet.

    In tty mode the fd is the pty master, which the session owns, and EOF is
    sent as the terminal's EOF character.  In pipe mode the pump owns the
    write end of the stdin pipe and closes it at EOF.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        tty: bool,
        on_room: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._tty = tty
        self._on_room = on_room
        self._buffer = bytearray()
        self._writing = False
        self._eof_requested = False
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._eof_requested or self._closed:
            log.debug("dropping %d stdin bytes received after EOF", len(data))
            return
        self._buffer += data
        self._write()

    def feed_eof(self) -> None:
        if self._eof_requested or self._closed:
            return
        self._eof_requested = True
        if self._tty:
            self._buffer += _eof_character(self._fd)
        self._write()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self._set_writing(False)
        if not self._tty:
            os.close(self._fd)

    def _write(self) -> None:
        while self._buffer and not self._closed:
            try:
                written = os.write(self._fd, self._buffer)
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            except OSError as exc:
                log.debug("stdin of the command is closed: %s", exc)
                self.close()
                break
            del self._buffer[:written]
        self._set_writing(bool(self._buffer) and not self._closed)
        if self._eof_requested and not self._buffer and not self._tty:
            self.close()
        if self.buffered <= _STDIN_LOW_WATER:
            self._on_room()

    def _set_writing(self, writing: bool) -> None:
        if writing == self._writing:
            return
        if writing:
            self._loop.add_writer(self._fd, self._write)
        else:
            self._loop.remove_writer(self._fd)
        self._writing = writing


# Sessions.


class _State(enum.Enum):
    WAITING = "waiting for the first frame"
    RUNNING = "running"
    EXITING = "sending EXIT"
    CLOSED = "closed"


class _Session:
    """One connection: a command run by START, or one CLOCK_SYNC."""

    def __init__(
        self,
        agent: Agent,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        session_id: int,
        on_close: Callable[[], None] | None,
    ) -> None:
        self._agent = agent
        self._loop = loop
        self._id = session_id
        self._on_close = on_close
        self._link = _HostLink(loop, sock, agent._hangups(), self)
        self._state = _State.WAITING
        self.holds_slot = False
        self._child: _Child | None = None
        self._tty = False
        self._exit_status: tuple[int, int] | None = None
        self._stdin: _InputPump | None = None
        self._outputs: list[_OutputPump] = []
        self._fds: list[int] = []
        self._output_paused = False
        self._first_frame_timer: asyncio.TimerHandle | None = None
        self._timeout_timer: asyncio.TimerHandle | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._first_frame_timer = self._loop.call_later(
            self._agent.first_frame_timeout, self._on_first_frame_timeout
        )
        self._link.resume_reading()

    # Frames from the host.

    def on_frames(self, frames: list[tuple[int, bytes]]) -> None:
        try:
            self._handle_frames(frames)
        except Exception:
            # A bug here must cost one session, never the agent or a hung host.
            log.exception("session %d: handling a frame failed; closing", self._id)
            self.abort()

    def _handle_frames(self, frames: list[tuple[int, bytes]]) -> None:
        for frame_type, payload in frames:
            if self._state is _State.WAITING:
                self._on_first_frame(frame_type, payload)
            elif self._state is _State.RUNNING:
                self._on_session_frame(frame_type, payload)
            else:
                return

    def _on_first_frame(self, frame_type: int, payload: bytes) -> None:
        self._cancel_timer(self._first_frame_timer)
        if frame_type == FrameType.START:
            self._start_command(payload)
        elif frame_type == FrameType.CLOCK_SYNC:
            self._sync_clock(payload)
        else:
            log.info(
                "session %d: first frame has type 0x%02x, expected START or "
                "CLOCK_SYNC; closing without reply",
                self._id,
                frame_type,
            )
            self.close()

    def _on_first_frame_timeout(self) -> None:
        log.info(
            "session %d: no first frame within %g s; closing",
            self._id,
            self._agent.first_frame_timeout,
        )
        self.close()

    def _on_session_frame(self, frame_type: int, payload: bytes) -> None:
        if frame_type == FrameType.STDIN:
            self._on_stdin(payload)
        elif frame_type == FrameType.EOF:
            assert self._stdin is not None
            self._stdin.feed_eof()
        elif frame_type == FrameType.RESIZE:
            self._on_resize(payload)
        elif frame_type == FrameType.SIGNAL:
            self._on_signal(payload)
        else:
            log.debug("session %d: ignoring frame type 0x%02x", self._id, frame_type)

    def _on_stdin(self, payload: bytes) -> None:
        assert self._stdin is not None
        if not payload:
            return
        self._stdin.feed(payload)
        if self._stdin.buffered > _STDIN_HIGH_WATER:
            self._link.pause_reading()

    def _on_stdin_room(self) -> None:
        if self._state is _State.RUNNING:
            self._link.resume_reading()

    def _on_resize(self, payload: bytes) -> None:
        if not self._tty or self._child is None:
            log.debug("session %d: ignoring RESIZE without a tty", self._id)
            return
        try:
            columns, rows = decode_resize(payload)
            _set_window_size(self._child.stdin_fd, columns, rows)
        except (ProtocolError, OSError) as exc:
            log.debug("session %d: ignoring RESIZE: %s", self._id, exc)

    def _on_signal(self, payload: bytes) -> None:
        try:
            signal_number = decode_signal(payload)
        except ProtocolError as exc:
            log.debug("session %d: ignoring SIGNAL: %s", self._id, exc)
            return
        if self._child is not None:
            _kill_group(self._child.pid, signal_number)

    # Starting.

    def _start_command(self, payload: bytes) -> None:
        if not self._agent._acquire_slot(self):
            limit = self._agent.max_sessions
            self._reject(
                EXIT_NOT_PERMITTED,
                f"start: session limit of {limit} reached; "
                f"retry once a running session ends",
            )
            return
        try:
            request = StartRequest.decode(payload)
        except ValueError as exc:
            self._reject(EXIT_INVALID_START, str(exc))
            return
        try:
            credentials = _credentials_for(request.user)
            cwd = request.working_dir or self._agent.default_cwd
            child = _spawn(request, cwd, credentials)
        except _StartRejected as exc:
            self._reject(exc.exit_code, exc.message)
            return
        self._attach(child, request)

    def _attach(self, child: _Child, request: StartRequest) -> None:
        self._child = child
        self._tty = request.tty
        self._state = _State.RUNNING
        self._agent._reaper().watch(child.popen, self._on_child_exit)
        if request.tty:
            self._fds = [child.stdout_fd]
            self._outputs = [self._pump(child.stdout_fd, FrameType.STDOUT)]
        else:
            assert child.stderr_fd is not None
            self._fds = [child.stdout_fd, child.stderr_fd]
            self._outputs = [
                self._pump(child.stdout_fd, FrameType.STDOUT),
                self._pump(child.stderr_fd, FrameType.STDERR),
            ]
        self._stdin = _InputPump(
            self._loop, child.stdin_fd, request.tty, self._on_stdin_room
        )
        for pump in self._outputs:
            pump.resume()
        if request.timeout_seconds:
            self._timeout_timer = self._loop.call_later(
                request.timeout_seconds, self._on_timeout
            )
        log.info("session %d: started pid %d: %r", self._id, child.pid, request.cmd)

    def _pump(self, fd: int, frame_type: FrameType) -> _OutputPump:
        return _OutputPump(self._loop, fd, frame_type, self)

    def _reject(self, exit_code: int, message: str) -> None:
        log.info("session %d: exit %d: %.200s", self._id, exit_code, message)
        self._state = _State.EXITING
        self._link.send(FrameType.STDERR, _error_output(message))
        self._send_exit(exit_code, 0)

    # Output, exit and the end of the session.

    def send_output(self, frame_type: FrameType, chunk: bytes) -> None:
        self._link.send(frame_type, chunk)
        if self._link.pending > _OUTPUT_HIGH_WATER and not self._output_paused:
            self._output_paused = True
            for pump in self._outputs:
                pump.pause()

    def on_host_writable(self, pending: int) -> None:
        if self._state is _State.EXITING and pending == 0:
            self.close()
        elif self._output_paused and pending <= _OUTPUT_LOW_WATER:
            self._output_paused = False
            if self._state is _State.RUNNING:
                for pump in self._outputs:
                    pump.resume()

    def on_output_done(self) -> None:
        if self._exit_status is not None and self._outputs_done():
            self._finish()

    def _outputs_done(self) -> bool:
        return all(pump.done for pump in self._outputs)

    def _on_child_exit(self, wait_status: int) -> None:
        self._exit_status = _exit_status(wait_status)
        if self._state is not _State.RUNNING:
            return
        log.info("session %d: leader exited with %r", self._id, self._exit_status)
        if self._outputs_done():
            self._finish()
        else:
            # Background children may hold the output open for a long time.
            self._grace_timer = self._loop.call_later(
                self._agent.exit_grace, self._on_grace_expired
            )

    def _on_grace_expired(self) -> None:
        if self._state is not _State.RUNNING:
            return
        log.debug("session %d: output still open after the leader exited", self._id)
        for pump in self._outputs:
            pump.drain(_GRACE_DRAIN_LIMIT)
        self._finish()

    def _on_timeout(self) -> None:
        if self._child is not None and self._state is _State.RUNNING:
            log.info("session %d: timeout; killing process group", self._id)
            _kill_group(self._child.pid, signal.SIGKILL)

    def _finish(self) -> None:
        if self._state is not _State.RUNNING or self._exit_status is None:
            return
        self._state = _State.EXITING
        self._stop_command_io()
        self._link.resume_reading()
        exit_code, signal_number = self._exit_status
        self._send_exit(exit_code, signal_number)

    def _send_exit(self, exit_code: int, signal_number: int) -> None:
        self._link.send(FrameType.EXIT, encode_exit(exit_code, signal_number))
        if self._link.pending == 0:
            self.close()

    def _stop_command_io(self) -> None:
        for timer in (self._timeout_timer, self._grace_timer):
            self._cancel_timer(timer)
        if self._stdin is not None:
            self._stdin.close()
        for pump in self._outputs:
            pump.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def on_host_lost(self, reason: str) -> None:
        if self._state is _State.RUNNING:
            log.info(
                "session %d: %s before EXIT; killing the command", self._id, reason
            )
        else:
            log.debug("session %d: %s", self._id, reason)
        self.abort()

    def abort(self) -> None:
        """Close the session, killing the command's process group if it runs."""
        if self._state is _State.RUNNING and self._child is not None:
            _kill_group(self._child.pid, signal.SIGKILL)
        self.close()

    def close(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._cancel_timer(self._first_frame_timer)
        self._stop_command_io()
        if self._child is not None:
            self._agent._reaper().forget(self._child.pid)
        self._link.close()
        self._agent._session_closed(self)
        if self._on_close is not None:
            self._on_close()

    @staticmethod
    def _cancel_timer(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    # Clock sync.

    def _sync_clock(self, payload: bytes) -> None:
        self._state = _State.EXITING
        if not self._agent._acquire_slot(self):
            log.warning("session %d: clock sync rejected: session limit", self._id)
            self._send_exit(EXIT_CLOCK_SYNC_FAILED, 0)
            return
        exit_code = 0
        try:
            seconds, nanoseconds = decode_clock_sync(payload)
            self._agent._set_clock(seconds, nanoseconds)
        except Exception as exc:  # noqa: BLE001 - the setter is any callable
            log.warning("session %d: clock sync failed: %s", self._id, exc)
            exit_code = EXIT_CLOCK_SYNC_FAILED
        self._send_exit(exit_code, 0)


def _error_output(message: str) -> bytes:
    # Messages quote the invalid value, which may be megabytes long or hold
    # lone surrogates from JSON escapes.
    encoded = message.encode("utf-8", "backslashreplace")
    if len(encoded) > _MAX_ERROR_MESSAGE:
        encoded = encoded[:_MAX_ERROR_MESSAGE] + b"... (truncated)"
    return encoded + b"\n"


def _credentials_for(user: str) -> Credentials | None:
    try:
        return resolve_user(user)
    except (LookupError, PermissionError) as exc:
        raise _StartRejected(EXIT_NOT_PERMITTED, str(exc)) from None


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
    as UTF-8 JSON.  When the agent closes that host socket it replies with
    ``{"closed": N}`` on this connection.
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
            host_port = _parse_handoff_payload(message, flags)
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
        self._agent.serve_connection(sock, on_close=on_close)

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


def _parse_handoff_payload(message: bytes, flags: int) -> int:
    """Return the host port of a handoff message; raise ``ValueError`` if invalid."""
    if flags & socket.MSG_TRUNC:
        raise ValueError(f"payload is longer than {_HANDOFF_MAX_MESSAGE} bytes")
    try:
        document = json.loads(message)
    except ValueError as exc:
        raise ValueError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, got {document!r}")  # noqa: TRY004
    host_port = document.get("host_port")
    if isinstance(host_port, bool) or not isinstance(host_port, int):
        raise ValueError(  # noqa: TRY004
            f"host_port must be an integer, got {host_port!r}"
        )
    guest_port = document.get("guest_port")
    if guest_port is not None and (
        isinstance(guest_port, bool) or not isinstance(guest_port, int)
    ):
        raise ValueError(f"guest_port must be an integer, got {guest_port!r}")
    return host_port


def _stream_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"expected a stream socket, got {sock.type!r}")
    return sock


# The agent.


class Agent:
    """The guest agent: serves exec sessions on the listeners it is given.

    Use it on a running asyncio loop in the main thread, because it reaps
    its children from a SIGCHLD handler::

        agent = Agent(clock_setter=VirtualClock("/run/clock.json"))
        await agent.start()
        await agent.listen_unix("/run/agent.sock")
        ...
        await agent.close()

    ``clock_setter`` is called as ``clock_setter(seconds, nanoseconds)`` for
    each CLOCK_SYNC and may be replaced at any time.  With ``None``, every
    CLOCK_SYNC gets EXIT -1.  ``reap_orphans`` makes the agent wait for any
    child, as it must when it is PID 1 or a child subreaper.  Without it the
    agent waits only for the commands it spawned.  At most ``max_sessions``
    sessions run at once.  A connection that sends no complete first frame
    within ``first_frame_timeout`` seconds is closed.  ``exit_grace`` is how
    long, in seconds, EXIT waits for output still open after the command's
    leader exited.
    """

    def __init__(
        self,
        *,
        default_cwd: str = "/",
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock_setter: ClockSetter | None = None,
        first_frame_timeout: float = DEFAULT_FIRST_FRAME_TIMEOUT,
        exit_grace: float = DEFAULT_EXIT_GRACE,
        reap_orphans: bool = False,
    ) -> None:
        _check_settings(max_sessions, first_frame_timeout, exit_grace)
        self.default_cwd = default_cwd
        self.max_sessions = max_sessions
        self.clock_setter = clock_setter
        self.first_frame_timeout = first_frame_timeout
        self.exit_grace = exit_grace
        self.reap_orphans = reap_orphans
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper_instance: _Reaper | None = None
        self._hangup_watcher: _HangupWatcher | None = None
        self._listeners: list[_Listener] = []
        self._handoff_channels: set[_HandoffChannel] = set()
        self._sessions: set[_Session] = set()
        self._slots_in_use = 0
        self._next_session_id = 1

    @property
    def active_sessions(self) -> int:
        """Sessions that passed their first frame and are not closed yet."""
        return self._slots_in_use

    @property
    def open_connections(self) -> int:
        """Host connections the agent holds, including ones still waiting."""
        return len(self._sessions)

    async def start(self) -> None:
        """Install the SIGCHLD handler on the running loop."""
        if self._loop is not None:
            return
        loop = asyncio.get_running_loop()
        reaper = _Reaper(loop, self.reap_orphans)
        reaper.install()
        self._loop = loop
        self._reaper_instance = reaper
        self._hangup_watcher = _HangupWatcher(loop)

    async def listen_unix(self, path: str) -> None:
        """Serve each connection accepted on a stream socket bound at ``path``.

        A stale socket file at ``path`` is replaced; any other file there
        raises ``FileExistsError``.
        """
        sock = _listen_unix(path, socket.SOCK_STREAM)
        self._add_listener(sock, self.serve_connection, path)

    async def listen_vsock(self, port: int) -> None:
        """Serve connections to vsock ``port`` of this guest, from any CID."""
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((socket.VMADDR_CID_ANY, port))
            sock.listen(_LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._add_listener(sock, self.serve_connection)

    async def listen_handoff(self, path: str) -> None:
        """Accept handed-off host sockets over seqpacket connections at ``path``.

        Each message on such a connection carries exactly one fd in
        SCM_RIGHTS, a stream socket already past the VMM handshake, and the
        UTF-8 JSON ``{"host_port": N, "guest_port": P}``.  The agent serves
        the socket like an accepted connection and, when it closes it,
        replies ``{"closed": N}`` on the same seqpacket connection.  Invalid
        messages are logged and dropped, with every fd they carried closed.
        """
        sock = _listen_unix(path, socket.SOCK_SEQPACKET)
        self._add_listener(sock, self._open_handoff_channel, path)

    def serve_connection(
        self, sock: socket.socket, on_close: Callable[[], None] | None = None
    ) -> None:
        """Serve one host connection; the agent owns ``sock`` from now on.

        ``on_close`` is called once the agent has closed the socket.
        """
        loop = self._require_loop()
        session = _Session(self, loop, sock, self._next_session_id, on_close)
        self._next_session_id += 1
        self._sessions.add(session)
        session.start()

    async def close(self) -> None:
        """Stop listening, kill running commands and close every connection."""
        if self._loop is None:
            return
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for channel in list(self._handoff_channels):
            channel.close()
        for session in list(self._sessions):
            session.abort()
        await self._wait_for_children(_CHILD_WAIT_ON_CLOSE)
        self._reaper().uninstall()
        self._hangups().close()
        self._loop = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("agent: call start() before serving connections")
        return self._loop

    def _reaper(self) -> _Reaper:
        assert self._reaper_instance is not None
        return self._reaper_instance

    def _hangups(self) -> _HangupWatcher:
        assert self._hangup_watcher is not None
        return self._hangup_watcher

    def _add_listener(
        self,
        sock: socket.socket,
        on_accept: Callable[[socket.socket], None],
        path: str | None = None,
    ) -> None:
        loop = self._require_loop()
        self._listeners.append(_Listener(loop, sock, on_accept, path))

    def _open_handoff_channel(self, sock: socket.socket) -> None:
        channel = _HandoffChannel(self, self._require_loop(), sock)
        self._handoff_channels.add(channel)

    def _handoff_closed(self, channel: _HandoffChannel) -> None:
        self._handoff_channels.discard(channel)

    def _acquire_slot(self, session: _Session) -> bool:
        if self._slots_in_use >= self.max_sessions:
            return False
        self._slots_in_use += 1
        session.holds_slot = True
        return True

    def _session_closed(self, session: _Session) -> None:
        self._sessions.discard(session)
        if session.holds_slot:
            session.holds_slot = False
            self._slots_in_use -= 1

    def _set_clock(self, seconds: int, nanoseconds: int) -> None:
        if self.clock_setter is None:
            raise PermissionError("clock sync: this agent has no clock setter")
        self.clock_setter(seconds, nanoseconds)

    async def _wait_for_children(self, timeout: float) -> None:
        loop = self._require_loop()
        deadline = loop.time() + timeout
        while self._reaper().watched and loop.time() < deadline:
            self._reaper().reap()
            await asyncio.sleep(0.01)


def _check_settings(
    max_sessions: int, first_frame_timeout: float, exit_grace: float
) -> None:
    if max_sessions < 0:
        raise ValueError(f"agent: max_sessions must be >= 0, got {max_sessions}")
    if first_frame_timeout <= 0:
        raise ValueError(
            f"agent: first_frame_timeout must be > 0, got {first_frame_timeout}"
        )
    if exit_grace < 0:
        raise ValueError(f"agent: exit_grace must be >= 0, got {exit_grace}")


# Command line.


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcvsock agent",
        description="Serve the exec protocol (guest port 52) inside a guest.",
    )
    listeners = parser.add_argument_group("listeners (at least one)")
    listeners.add_argument(
        "--vsock-port",
        type=int,
        metavar="PORT",
        help="listen on this AF_VSOCK port, from any CID (inside a real guest)",
    )
    listeners.add_argument(
        "--unix",
        metavar="PATH",
        help="listen on a Unix stream socket; each connection is one session "
        "already past the VMM handshake",
    )
    listeners.add_argument(
        "--handoff",
        metavar="PATH",
        help="accept host connections handed over as SCM_RIGHTS fds on a Unix "
        "seqpacket socket",
    )
    _add_session_options(parser)
    _add_process_options(parser)
    return parser


def _add_session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-sessions",
        type=_non_negative_int,
        default=DEFAULT_MAX_SESSIONS,
        metavar="N",
        help="sessions served at once; extra ones get EXIT 126, or -1 for "
        "CLOCK_SYNC (default: %(default)s)",
    )
    parser.add_argument(
        "--default-cwd",
        default="/",
        metavar="DIR",
        help="working directory when START gives none (default: %(default)s)",
    )
    parser.add_argument(
        "--clock",
        type=_clock_option,
        metavar="system|virtual:FILE|none",
        help="what CLOCK_SYNC sets: CLOCK_REALTIME, a JSON file, or nothing "
        "(EXIT -1); default: system with --vsock-port, otherwise none, so a "
        "local agent never sets the host clock",
    )
    parser.add_argument(
        "--first-frame-timeout",
        type=_positive_float,
        default=DEFAULT_FIRST_FRAME_TIMEOUT,
        metavar="SECONDS",
        help="close connections that send no first frame within this time "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--exit-grace",
        type=_non_negative_float,
        default=DEFAULT_EXIT_GRACE,
        metavar="SECONDS",
        help="how long EXIT waits for output that background children keep "
        "open after the command exited (default: %(default)s)",
    )


def _add_process_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--subreaper",
        action="store_true",
        help="become a child subreaper and reap orphaned descendants "
        "(always on as PID 1)",
    )
    parser.add_argument(
        "--ready-fd",
        type=_non_negative_int,
        metavar="FD",
        help="write 'ready\\n' to this fd and close it once every listener is up",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error", "critical"],
        help="logging level (default: %(default)s)",
    )


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _clock_option(text: str) -> str:
    if text in ("system", "none") or (
        text.startswith("virtual:") and len(text) > len("virtual:")
    ):
        return text
    raise argparse.ArgumentTypeError(
        f"expected system, none or virtual:FILE, got {text!r}"
    )


def _clock_setter(option: str | None, vsock: bool) -> ClockSetter | None:
    if option is None:
        option = "system" if vsock else "none"
    if option == "system":
        return SystemClock()
    if option == "none":
        return None
    return VirtualClock(option.removeprefix("virtual:"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM or SIGINT; return the process exit code.

    Options (``--help`` lists them): ``--vsock-port PORT``, ``--unix PATH``,
    ``--handoff PATH`` (at least one), ``--max-sessions N``,
    ``--default-cwd DIR``, ``--clock system|virtual:FILE|none``,
    ``--first-frame-timeout SECONDS``, ``--exit-grace SECONDS``,
    ``--subreaper``, ``--ready-fd FD`` and ``--log-level LEVEL``.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.vsock_port is None and args.unix is None and args.handoff is None:
        parser.error("give at least one of --vsock-port, --unix, --handoff")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    reap_orphans = args.subreaper or os.getpid() == 1
    if args.subreaper and os.getpid() != 1:
        try:
            set_child_subreaper()
        except OSError as exc:
            log.error("agent: %s", exc)
            return 1
    return asyncio.run(_serve(args, reap_orphans))


async def _serve(args: argparse.Namespace, reap_orphans: bool) -> int:
    agent = Agent(
        default_cwd=args.default_cwd,
        max_sessions=args.max_sessions,
        clock_setter=_clock_setter(args.clock, args.vsock_port is not None),
        first_frame_timeout=args.first_frame_timeout,
        exit_grace=args.exit_grace,
        reap_orphans=reap_orphans,
    )
    # A stop request may come as soon as the ready line is out.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    await agent.start()
    try:
        await _open_listeners(agent, args)
        _signal_ready(args.ready_fd)
    except OSError as exc:
        log.error("agent: cannot start serving: %s", exc)
        await agent.close()
        return 1
    await stop.wait()
    log.info("agent: stopping")
    await agent.close()
    return 0


async def _open_listeners(agent: Agent, args: argparse.Namespace) -> None:
    if args.unix is not None:
        await agent.listen_unix(args.unix)
    if args.handoff is not None:
        await agent.listen_handoff(args.handoff)
    if args.vsock_port is not None:
        await agent.listen_vsock(args.vsock_port)
    log.info("agent: listening")


def _signal_ready(ready_fd: int | None) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, b"ready\n")
    finally:
        os.close(ready_fd)


if __name__ == "__main__":
    sys.exit(main())
