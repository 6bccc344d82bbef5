"""The session state machine: one START or one CLOCK_SYNC per host connection."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ProtocolError
from ..protocol import (
    FrameType,
    StartRequest,
    decode_clock_sync,
    decode_resize,
    decode_signal,
    encode_exit,
)
from .link import _HostLink
from .pumps import _InputPump, _OutputPump
from .reaper import _exit_status
from .spawn import (
    EXIT_INVALID_START,
    EXIT_NOT_PERMITTED,
    Credentials,
    _Child,
    _kill_group,
    _set_window_size,
    _spawn,
    _StartRejected,
    resolve_user,
)

if TYPE_CHECKING:
    from .server import Agent

log = logging.getLogger("fcvsock.agent")

EXIT_CLOCK_SYNC_FAILED = -1

_OUTPUT_HIGH_WATER = 256 * 1024
_OUTPUT_LOW_WATER = 64 * 1024
_STDIN_HIGH_WATER = 256 * 1024
# A pipe buffers 64 KiB by default, and an unprivileged process can grow it up
# to pipe-max-size, 1 MiB by default (pipe(7)). So this drains what the leader left.
_GRACE_DRAIN_LIMIT = 1024 * 1024
_MAX_ERROR_MESSAGE = 4096


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
        *,
        reply: bytes = b"",
    ) -> None:
        self._agent = agent
        self._loop = loop
        self._id = session_id
        self._on_close = on_close
        self._reply = reply
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
        if self._reply:
            self._link.send_raw(self._reply)
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
