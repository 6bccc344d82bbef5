"""Pure-Python twin of the compiled frame core (``src/fcvsock/_cframes.pyx``).

Both modules expose the same classes, raise the same exceptions with the same
messages, and are tested against each other.  Keep them in step.

Decoder strategy.  One receive buffer of ``buffer_size`` bytes is allocated
up front and never grows.  A frame whose payload is at most a quarter of that
buffer is cut out of it, so one ``readv`` can yield many small frames.  A
larger payload gets its own buffer, allocated only after the length field has
been checked against ``max_payload``; the rest of that payload is received
straight into it.  Errors are sticky: the decoder is unusable after a
``ProtocolError`` because frame boundaries are lost.  Frames decoded before an
error are returned first and the error is raised by the next call, so no
complete frame is ever lost.

Writer strategy.  Frames with payloads up to ``coalesce_limit`` are copied into
one contiguous buffer; a larger payload is referenced, not copied, and goes
out with its header in one ``sendmsg`` with ``MSG_NOSIGNAL``, so a closed peer
raises ``BrokenPipeError`` and no SIGPIPE is delivered.  Fds that are not
sockets, such as pipes, are written with ``writev``.

Payloads and fed data must be C-contiguous bytes-like objects.  Anything else
raises ``TypeError`` before the decoder or the queue changes.
"""

from __future__ import annotations

import errno
import operator
import os
import socket
import struct
from collections import deque

from .errors import FrameTooLargeError, IncompleteFrameError
from .protocol import HEADER_SIZE, MAX_PAYLOAD

__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_COALESCE_LIMIT",
    "DEFAULT_READ_BUDGET",
    "FrameDecoder",
    "FrameWriter",
    "encode_frame",
]

Buffer = bytes | bytearray | memoryview

DEFAULT_BUFFER_SIZE = 256 * 1024
DEFAULT_READ_BUDGET = 1024 * 1024
DEFAULT_COALESCE_LIMIT = 64 * 1024
# Linux IOV_MAX is 1024; batches stay well below it.
_IOV_BATCH = 64
_MIN_BUFFER_SIZE = 64

_HEADER = struct.Struct("<BI")


def _check_limits(max_payload: int, buffer_size: int) -> None:
    if not 0 <= max_payload <= MAX_PAYLOAD:
        raise ValueError(
            f"frame decoder: max_payload must be in 0..{MAX_PAYLOAD}, "
            f"got {max_payload}"
        )
    if buffer_size < _MIN_BUFFER_SIZE:
        raise ValueError(
            f"frame decoder: buffer_size must be at least {_MIN_BUFFER_SIZE}, "
            f"got {buffer_size}"
        )


def _too_large(length: int, limit: int) -> FrameTooLargeError:
    return FrameTooLargeError(
        f"decode frame: payload length {length} exceeds the limit of "
        f"{limit} bytes",
        length,
        limit,
    )


def encode_frame(frame_type: int, payload: Buffer = b"") -> bytes:
    """Return one frame as bytes: header followed by payload."""
    frame_type, body = _check_outgoing(frame_type, payload, MAX_PAYLOAD)
    return _HEADER.pack(frame_type, len(body)) + body


def _check_outgoing(
    frame_type: int, payload: Buffer, limit: int
) -> tuple[int, memoryview]:
    frame_type = operator.index(frame_type)
    if not 0 <= frame_type <= 0xFF:
        raise ValueError(f"encode frame: type must be in 0..255, got {frame_type}")
    body = memoryview(payload).cast("B")
    length = len(body)
    if length > limit:
        raise FrameTooLargeError(
            f"encode frame: payload length {length} exceeds the limit of "
            f"{limit} bytes",
            length,
            limit,
        )
    return frame_type, body


class FrameDecoder:
    """Split a byte stream into ``(type, payload)`` frames.

    Feed it bytes with :meth:`feed`, or let it read a non-blocking fd with
    :meth:`read_fd`.  Both return the list of frames completed by the call;
    payloads are ``bytes``.  Call :meth:`feed_eof` when the stream ends: it
    raises :class:`IncompleteFrameError` if the stream stopped inside a frame.
    """

    def __init__(
        self,
        max_payload: int = MAX_PAYLOAD,
        buffer_size: int = DEFAULT_BUFFER_SIZE,
    ) -> None:
        _check_limits(max_payload, buffer_size)
        self._max_payload = max_payload
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._direct_threshold = buffer_size // 4
        self._start = 0
        self._end = 0
        # The large payload being received, when there is one.
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_type = 0
        self._payload_filled = 0
        self._error: BaseException | None = None
        self._eof = False

    @property
    def at_eof(self) -> bool:
        """True once :meth:`read_fd` has seen the end of the stream."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes held of frames not yet complete."""
        if self._payload is not None:
            return HEADER_SIZE + self._payload_filled
        return self._end - self._start

    def feed(self, data: Buffer) -> list[tuple[int, bytes]]:
        """Decode ``data`` and return the frames it completes."""
        self._raise_pending()
        frames: list[tuple[int, bytes]] = []
        source = memoryview(data).cast("B")
        offset = 0
        total = len(source)
        while offset < total and self._error is None:
            if self._payload_view is not None:
                count = min(total - offset, len(self._payload_view) - self._payload_filled)
                end = self._payload_filled + count
                self._payload_view[self._payload_filled:end] = source[offset:offset + count]
                self._payload_filled = end
                offset += count
                self._finish_direct(frames)
                continue
            self._make_room()
            count = min(total - offset, len(self._buffer) - self._end)
            self._view[self._end:self._end + count] = source[offset:offset + count]
            self._end += count
            offset += count
            self._parse(frames)
        return self._deliver(frames)

    def read_fd(
        self, fd: int, max_bytes: int = DEFAULT_READ_BUDGET
    ) -> list[tuple[int, bytes]]:
        """Read a non-blocking fd until EAGAIN, EOF or ``max_bytes`` were read.

        No read requests more than what is left of ``max_bytes``, so the bytes
        beyond it stay in the kernel.  Return the frames completed.  EOF sets
        :attr:`at_eof`.  An ``OSError`` from the read is raised at once when no
        frame was completed, and otherwise by the next call, after those
        frames were delivered.
        """
        self._raise_pending()
        frames: list[tuple[int, bytes]] = []
        received = 0
        while received < max_bytes and self._error is None and not self._eof:
            if self._payload_view is not None:
                target = self._payload_view[self._payload_filled:]
            else:
                self._make_room()
                target = self._view[self._end:]
            target = target[: max_bytes - received]
            try:
                count = os.readv(fd, [target])
            except (BlockingIOError, InterruptedError) as exc:
                if isinstance(exc, InterruptedError):
                    continue
                break
            except OSError as exc:
                self._error = exc
                break
            if count == 0:
                self._eof = True
                break
            received += count
            if self._payload_view is not None:
                self._payload_filled += count
                self._finish_direct(frames)
            else:
                self._end += count
                self._parse(frames)
        return self._deliver(frames)

    def feed_eof(self) -> None:
        """Mark the end of the stream; raise if it ended inside a frame."""
        self._raise_pending()
        self._eof = True
        if self._payload is not None:
            error = self._incomplete_payload(
                self._payload_type, self._payload_filled, len(self._payload)
            )
        elif self._end - self._start >= HEADER_SIZE:
            frame_type, length = _HEADER.unpack_from(self._buffer, self._start)
            got = self._end - self._start - HEADER_SIZE
            error = self._incomplete_payload(frame_type, got, length)
        elif self._end > self._start:
            got = self._end - self._start
            error = IncompleteFrameError(
                f"decode frame: stream ended inside a frame header: got {got} "
                f"of {HEADER_SIZE} bytes",
                "header",
                got,
                HEADER_SIZE,
            )
        else:
            return
        self._error = error
        raise error

    def _incomplete_payload(
        self, frame_type: int, got: int, length: int
    ) -> IncompleteFrameError:
        return IncompleteFrameError(
            f"decode frame: stream ended inside the payload of a frame of type "
            f"0x{frame_type:02x}: got {got} of {length} bytes",
            "payload",
            got,
            length,
        )

    def _raise_pending(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, OSError):
                # A read error is reported once; the stream is gone after it.
                self._error = None
                self._eof = True
            raise error

    def _deliver(self, frames: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        if not frames:
            self._raise_pending()
        return frames

    def _make_room(self) -> None:
        # Compact only when a whole small frame might not fit behind _end.
        free = len(self._buffer) - self._end
        if self._start and free < self._direct_threshold + HEADER_SIZE:
            size = self._end - self._start
            self._view[:size] = self._view[self._start:self._end]
            self._start = 0
            self._end = size

    def _parse(self, frames: list[tuple[int, bytes]]) -> None:
        view = self._view
        while True:
            available = self._end - self._start
            if available < HEADER_SIZE:
                break
            frame_type, length = _HEADER.unpack_from(self._buffer, self._start)
            if length > self._max_payload:
                self._error = _too_large(length, self._max_payload)
                return
            if available < HEADER_SIZE + length:
                if length > self._direct_threshold:
                    self._start_direct(frame_type, length)
                break
            begin = self._start + HEADER_SIZE
            frames.append((frame_type, bytes(view[begin:begin + length])))
            self._start = begin + length
        if self._start == self._end:
            self._start = self._end = 0

    def _start_direct(self, frame_type: int, length: int) -> None:
        # Everything buffered after the header belongs to this payload.
        begin = self._start + HEADER_SIZE
        count = self._end - begin
        self._payload = bytearray(length)
        self._payload_view = memoryview(self._payload)
        self._payload_view[:count] = self._view[begin:self._end]
        self._payload_type = frame_type
        self._payload_filled = count
        self._start = self._end = 0

    def _finish_direct(self, frames: list[tuple[int, bytes]]) -> None:
        payload = self._payload
        if payload is None or self._payload_filled < len(payload):
            return
        frames.append((self._payload_type, bytes(payload)))
        self._payload = None
        self._payload_view = None
        self._payload_filled = 0


class FrameWriter:
    """Queue frames and write them to a non-blocking fd.

    :meth:`write` only queues; :meth:`flush` writes until the kernel buffer is
    full and returns the bytes still pending, which callers use for
    backpressure.  A ``bytes`` payload above ``coalesce_limit`` is sent from
    the caller's object without a copy.
    """

    def __init__(
        self,
        max_payload: int = MAX_PAYLOAD,
        coalesce_limit: int = DEFAULT_COALESCE_LIMIT,
    ) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(
                f"frame writer: max_payload must be in 0..{MAX_PAYLOAD}, "
                f"got {max_payload}"
            )
        # An empty payload must never become a chunk of its own: flush would
        # spin on a zero-byte write.
        if coalesce_limit < 0:
            raise ValueError(
                f"frame writer: coalesce_limit must be at least 0, "
                f"got {coalesce_limit}"
            )
        self._max_payload = max_payload
        self._coalesce_limit = coalesce_limit
        self._chunks: deque[memoryview] = deque()
        self._tail = bytearray()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Bytes queued and not yet accepted by the kernel."""
        return self._pending

    def write(self, frame_type: int, payload: Buffer = b"") -> None:
        """Queue one frame."""
        frame_type, body = _check_outgoing(frame_type, payload, self._max_payload)
        length = len(body)
        header = _HEADER.pack(frame_type, length)
        if length <= self._coalesce_limit:
            self._tail += header
            self._tail += body
        else:
            chunk = payload if isinstance(payload, bytes) else bytes(body)
            self._tail += header
            self._seal_tail()
            self._chunks.append(memoryview(chunk))
        self._pending += HEADER_SIZE + length

    def write_raw(self, data: Buffer) -> None:
        """Queue bytes that are not a frame, such as a handshake line."""
        body = memoryview(data).cast("B")
        self._tail += body
        self._pending += len(body)

    def data_to_send(self) -> bytes:
        """Return and dequeue every pending byte, for use without an fd."""
        self._seal_tail()
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._pending = 0
        return data

    def flush(self, fd: int) -> int:
        """Write to ``fd`` until done or EAGAIN; return the bytes pending.

        EINTR is retried.  Other ``OSError``s, such as ``BrokenPipeError``,
        propagate with the bytes not yet written left in the queue.
        """
        self._seal_tail()
        chunks = self._chunks
        while chunks:
            batch = [chunks[i] for i in range(min(len(chunks), _IOV_BATCH))]
            try:
                written = _send(fd, batch)
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            self._pending -= written
            while written:
                head = chunks[0]
                if written >= len(head):
                    written -= len(head)
                    chunks.popleft()
                else:
                    chunks[0] = head[written:]
                    written = 0
        return self._pending

    def _seal_tail(self) -> None:
        if self._tail:
            self._chunks.append(memoryview(self._tail))
            self._tail = bytearray()


def _send(fd: int, batch: list[memoryview]) -> int:
    # A temporary socket object gives access to sendmsg(); detach() hands the
    # fd back without closing it.
    try:
        # Family, type and protocol given up front spare two of the three
        # syscalls the constructor would make to look them up.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=fd)
    except OSError as exc:
        if exc.errno != errno.ENOTSOCK:
            raise
        return os.writev(fd, batch)
    try:
        return sock.sendmsg(batch, (), socket.MSG_NOSIGNAL)
    finally:
        sock.detach()
