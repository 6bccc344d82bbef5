"""State of one exec session, shared by the blocking and the asyncio API.

:class:`SessionCore` owns the socket, the frame decoder and writer, and the
output not yet consumed.  It does no waiting: the blocking driver polls the
fd and the asyncio driver registers it with the event loop, and both call
:meth:`SessionCore.on_readable` and :meth:`SessionCore.flush` when the fd is
ready.

Memory is bounded in streaming mode.  A read takes at most the room left
below ``max_buffered``, so the output waiting for the caller exceeds
``max_buffered`` by at most the frame that was incomplete before the read.
Only when that room ends inside one frame do further reads grow to the size
of the part already held, so in the worst case the excess is about two of the
largest frames.  Once the limit is reached, ``wants_read`` turns false, the
drivers stop reading the socket, and the guest blocks on its full vsock
buffer instead of the host growing.  ``run`` collects the whole output, so
its memory grows with the output.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from dataclasses import dataclass
from typing import Literal

from ._core import FrameDecoder, FrameWriter
from ._request import InputFeeder
from .errors import (
    CommandFailedError,
    ConnectionLostError,
    IncompleteFrameError,
    ProtocolError,
    SessionError,
    SessionProtocolError,
)
from .handshake import Handshake
from .protocol import MAX_PAYLOAD, FrameType, decode_exit

__all__ = [
    "DEFAULT_MAX_BUFFERED",
    "ExitStatus",
    "Output",
    "RunResult",
    "SessionCore",
    "StreamItem",
    "check_max_buffered",
]

log = logging.getLogger("fcvsock.session")

DEFAULT_MAX_BUFFERED = 4 * 1024 * 1024
# One read_fd call stops after this many bytes so a fast guest cannot starve
# the event loop or push the queue far past max_buffered.
READ_BUDGET = 1024 * 1024
MAX_READS_PER_EVENT = 4
# Empty frames are 5 bytes, so one full read can hold 200,000 of them.
MAX_FRAMES_PER_EVENT = 16384
# Writers wait for the kernel once this much is queued in user space.
WRITE_HIGH_WATER = 256 * 1024


def check_max_frame(max_frame: int) -> int:
    """Return ``max_frame`` if it is an int in 1..16 MiB, else raise."""
    if isinstance(max_frame, bool) or not isinstance(max_frame, int):
        raise TypeError(f"session: max_frame must be an int, got {max_frame!r}")
    if not 0 < max_frame <= MAX_PAYLOAD:
        raise ValueError(
            f"session: max_frame must be in 1..{MAX_PAYLOAD}, got {max_frame}"
        )
    return max_frame


def check_max_buffered(max_buffered: int) -> int:
    """Return ``max_buffered`` if it is a positive int, else raise."""
    if isinstance(max_buffered, bool) or not isinstance(max_buffered, int):
        raise TypeError(f"session: max_buffered must be an int, got {max_buffered!r}")
    if max_buffered <= 0:
        raise ValueError(f"session: max_buffered must be positive, got {max_buffered}")
    return max_buffered


@dataclass(frozen=True)
class Output:
    """A chunk of output: ``stream`` is ``"stdout"`` or ``"stderr"``."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class ExitStatus:
    """The end of a command: its exit code and the signal that killed it.

    ``exit_code`` is the command's code, or 128+N when signal N killed it
    (137 on an agent-side timeout).  ``signal`` is N when the agent reported
    one, else ``None`` (older agents send only the code).
    """

    exit_code: int
    signal: int | None = None

    @property
    def ok(self) -> bool:
        """True when the command exited with code 0 and no signal."""
        return self.exit_code == 0 and self.signal is None


StreamItem = Output | ExitStatus


@dataclass(frozen=True)
class RunResult:
    """Everything a finished command produced."""

    exit_code: int
    signal: int | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """True when the command exited with code 0 and no signal."""
        return self.exit_code == 0 and self.signal is None

    def check(self) -> RunResult:
        """Return self, or raise :class:`CommandFailedError` if not ok."""
        if not self.ok:
            how = f"signal {self.signal}" if self.signal else f"code {self.exit_code}"
            raise CommandFailedError(
                f"run: command exited with {how}, expected 0",
                self.exit_code,
                self.signal,
                self.stdout,
                self.stderr,
            )
        return self


_STREAM_NAMES: dict[int, Literal["stdout", "stderr"]] = {
    FrameType.STDOUT: "stdout",
    FrameType.STDERR: "stderr",
}


class SessionCore:
    """Socket, frame core and pending output of one session."""

    def __init__(
        self,
        handshake: Handshake,
        *,
        collect: bool = False,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_frame: int = MAX_PAYLOAD,
    ) -> None:
        check_max_buffered(max_buffered)
        check_max_frame(max_frame)
        self.sock: socket.socket | None = handshake.sock
        self.fd = handshake.sock.fileno()
        self.host_port = handshake.host_port
        self.decoder = FrameDecoder(max_payload=max_frame)
        self.writer = FrameWriter()
        self.collect = collect
        self.max_buffered = max_buffered
        self.queue: deque[Output] = deque()
        self.buffered = 0
        self.stdout_parts: list[bytes] = []
        self.stderr_parts: list[bytes] = []
        self.exit_status: ExitStatus | None = None
        # Why the session ended without an exit status: the exception
        # class, its message and its cause.  The exception itself is built
        # when raised, so it carries the output not yet consumed by then.
        self.failure: tuple[type[SessionError], str, BaseException | None] | None = None
        self.write_error: OSError | None = None
        if handshake.initial_data:
            self._feed(handshake.initial_data)

    @property
    def finished(self) -> bool:
        """True once the exit status or a terminal error is known."""
        return self.exit_status is not None or self.failure is not None

    @property
    def wants_read(self) -> bool:
        """True while the socket should be read."""
        if self.finished or self.sock is None:
            return False
        return self.collect or self.buffered < self.max_buffered

    @property
    def pending_writes(self) -> int:
        """Bytes queued for the guest and not yet taken by the kernel."""
        return int(self.writer.pending)

    def on_readable(self) -> None:
        """Read what the socket has and turn it into output or a result.

        At most ``MAX_READS_PER_EVENT`` reads are made, and no further read
        once ``MAX_FRAMES_PER_EVENT`` frames were handled, so a guest that
        sends faster than the host parses cannot keep the caller from
        checking its deadline or stall the event loop for long.
        """
        budget = self._read_budget()
        handled = 0
        for _ in range(MAX_READS_PER_EVENT):
            if not self.wants_read or handled >= MAX_FRAMES_PER_EVENT:
                break
            buffered_before = self.decoder.buffered
            frames = self._read(budget)
            if frames is None:
                return
            if frames:
                self._handle(frames)
                handled += len(frames)
                budget = self._read_budget()
            elif self.decoder.at_eof:
                self._end_of_stream()
                return
            elif self.decoder.buffered - buffered_before < budget:
                # EAGAIN with nothing new: wait for the next readable event.
                return
            else:
                # The budget ran out inside one frame.  Reading as much as is
                # already held doubles it each time, so a large frame takes a
                # few reads, not one per free byte below max_buffered.
                budget = max(budget, min(self.decoder.buffered, READ_BUDGET))
        if self.wants_read:
            # A zero budget reads nothing but raises an error the decoder
            # deferred behind the frames just handled.  No readable event
            # would report it if the guest sends nothing more.
            self._read(0)

    def _read(self, budget: int) -> list[tuple[int, bytes]] | None:
        """Return the frames one read completes, or None if the session ended."""
        try:
            frames: list[tuple[int, bytes]] = self.decoder.read_fd(self.fd, budget)
        except ProtocolError as exc:
            self._fail(exc)
        except ConnectionResetError as exc:
            # Linux resets a Unix stream instead of ending it when the
            # other side closed with bytes it had not read, such as an
            # EOF frame.  The bytes sent before that close were delivered.
            self._end_of_stream(exc)
        except OSError as exc:
            self._lose(f"read from guest failed: {exc}", exc)
        else:
            return frames
        return None

    def send(self, frame_type: int, payload: bytes = b"") -> None:
        """Queue one frame for the guest; raise if the guest stopped reading."""
        if self.write_error is not None or self.sock is None:
            reason = self.write_error or "connection closed"
            raise self.make_error(
                ConnectionLostError, f"send to guest failed: {reason}", self.write_error
            )
        self.writer.write(frame_type, payload)

    def send_input(self, feeder: InputFeeder) -> None:
        """Queue STDIN frames from ``feeder``, then EOF, as the socket takes them.

        Stops once EOF is queued or the kernel stops taking bytes.  Returning
        with input left but nothing pending would leave the caller polling
        only for output, which the command may write only after its EOF.
        """
        while self.write_error is None and not feeder.eof_sent:
            while self.pending_writes < WRITE_HIGH_WATER:
                payload = feeder.next_frame()
                if payload is None:
                    self.send(FrameType.EOF)
                    feeder.eof_sent = True
                    break
                self.send(FrameType.STDIN, payload)
            if self.flush() > 0:
                return

    def flush(self) -> int:
        """Write queued frames until EAGAIN; return the bytes still queued.

        A write error is kept, not raised: the guest may still deliver its
        output and exit status, so the read side goes on.
        """
        if self.write_error is not None or self.sock is None:
            return 0
        try:
            return int(self.writer.flush(self.fd))
        except OSError as exc:
            self.write_error = exc
            self.writer = FrameWriter()
            return 0

    def pop(self) -> Output | None:
        """Return the oldest unconsumed output chunk, or None."""
        if not self.queue:
            return None
        item = self.queue.popleft()
        self.buffered -= len(item.data)
        return item

    def result(self) -> RunResult:
        """Return the collected output with the exit status."""
        assert self.exit_status is not None
        return RunResult(
            self.exit_status.exit_code,
            self.exit_status.signal,
            b"".join(self.stdout_parts),
            b"".join(self.stderr_parts),
        )

    def error(self) -> SessionError:
        """Build the exception for the failure, with the output not consumed."""
        assert self.failure is not None
        cls, reason, cause = self.failure
        return self.make_error(cls, reason, cause)

    def make_error(
        self,
        cls: type[SessionError],
        reason: str,
        cause: BaseException | None = None,
    ) -> SessionError:
        """Build a ``cls`` error naming this session, with partial output."""
        stdout, stderr = self.partial_output()
        error = cls(f"session on host port {self.host_port}: {reason}", stdout, stderr)
        error.__cause__ = cause
        return error

    def partial_output(self) -> tuple[bytes, bytes]:
        """Return the output received and not yet handed to the caller."""
        stdout = list(self.stdout_parts)
        stderr = list(self.stderr_parts)
        for item in self.queue:
            (stdout if item.stream == "stdout" else stderr).append(item.data)
        return b"".join(stdout), b"".join(stderr)

    def close(self) -> None:
        """Close the socket; safe to call more than once."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        if not self.finished:
            self.failure = (
                ConnectionLostError, "connection closed by the caller", None
            )

    def _feed(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        self._handle(frames)

    def _handle(self, frames: list[tuple[int, bytes]]) -> None:
        for frame_type, payload in frames:
            if self.exit_status is not None:
                break
            stream = _STREAM_NAMES.get(frame_type)
            if stream is not None:
                if payload:
                    self._deliver(stream, payload)
            elif frame_type == FrameType.EXIT:
                try:
                    code, signal = decode_exit(payload)
                except ProtocolError as exc:
                    self._fail(exc)
                    return
                self.exit_status = ExitStatus(code, signal)
            else:
                log.debug("ignoring frame of unknown type 0x%02x", frame_type)

    def _deliver(self, stream: Literal["stdout", "stderr"], data: bytes) -> None:
        if self.collect:
            parts = self.stdout_parts if stream == "stdout" else self.stderr_parts
            parts.append(data)
        else:
            self.queue.append(Output(stream, data))
            self.buffered += len(data)

    def _read_budget(self) -> int:
        if self.collect:
            return READ_BUDGET
        return min(READ_BUDGET, self.max_buffered - self.buffered)

    def _end_of_stream(self, reset: ConnectionResetError | None = None) -> None:
        ended = "closed" if reset is None else "reset"
        try:
            self.decoder.feed_eof()
        except IncompleteFrameError as exc:
            exc.__context__ = reset
            self._lose(f"connection {ended} mid-frame: {exc}", exc)
            return
        self._lose(f"connection {ended} before the exit status", reset)

    def _fail(self, exc: ProtocolError) -> None:
        if self.failure is None:
            self.failure = (SessionProtocolError, str(exc), exc)

    def _lose(self, reason: str, cause: BaseException | None) -> None:
        if self.failure is None:
            self.failure = (ConnectionLostError, reason, cause)
