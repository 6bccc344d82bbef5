# cython: language_level=3
"""Compiled frame core; its pure-Python twin is ``fcvsock/_pyframes.py``.

Both modules expose the same classes, raise the same exceptions with the same
messages, and are tested against each other.  Keep them in step.

Decoder strategy.  One receive buffer of ``buffer_size`` bytes is allocated
up front and never grows.  A frame whose payload is at most a quarter of that
buffer is cut out of it with one copy into a new ``bytes`` object, so one
``read`` can yield many small frames.  A larger payload that is not complete
in the buffer gets its own ``bytes`` object, allocated only after the length
field has been checked against ``max_payload``.  The bytes of it already
buffered are copied once; ``read_fd`` reads the rest straight into it, so
those bytes are copied only by the kernel.  Errors are sticky: the decoder is
unusable after a ``ProtocolError`` because frame boundaries are lost.  Frames
decoded before an error are returned first and the error is raised by the
next call, so no complete frame is ever lost.

Writer strategy.  Frames with payloads up to ``coalesce_limit`` are copied into
one contiguous buffer; a larger ``bytes`` payload is referenced, not copied.
``flush`` hands up to 64 queued chunks to one ``sendmsg`` with
``MSG_NOSIGNAL``, so a header and its payload go out without being joined,
and a closed peer raises ``BrokenPipeError`` and no SIGPIPE is delivered.
Fds that are not sockets, such as pipes, are written with ``writev``.

Payloads and fed data must be C-contiguous bytes-like objects.  Anything else
raises ``TypeError`` before the decoder or the queue changes.
"""

import operator
import os

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport (
    PyByteArray_AS_STRING,
    PyByteArray_CheckExact,
    PyByteArray_GET_SIZE,
    PyByteArray_Resize,
)
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from libc.errno cimport EAGAIN, EINTR, ENOTSOCK, errno
from libc.stdint cimport uint32_t
from libc.string cimport memcpy, memmove, memset
from posix.uio cimport iovec, writev
from posix.unistd cimport read

from fcvsock.errors import FrameTooLargeError, IncompleteFrameError
from fcvsock.protocol import HEADER_SIZE, MAX_PAYLOAD


cdef extern from "<errno.h>":
    const int EWOULDBLOCK


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    const int MSG_NOSIGNAL

    ssize_t sendmsg(int fd, const msghdr *message, int flags)


cdef extern from "<Python.h>":
    const Py_ssize_t PY_SSIZE_T_MAX
    ctypedef struct PyBytesObject:
        Py_hash_t ob_shash
    Py_ssize_t Py_REFCNT(PyObject *o)

cdef enum:
    SPARE_MIN_SIZE = 1024 * 1024
    MAX_SPARES = 2


__all__ = [
    "DEFAULT_BUFFER_SIZE",
    "DEFAULT_COALESCE_LIMIT",
    "DEFAULT_READ_BUDGET",
    "FrameDecoder",
    "FrameWriter",
    "encode_frame",
]

DEFAULT_BUFFER_SIZE = 256 * 1024
DEFAULT_READ_BUDGET = 1024 * 1024
DEFAULT_COALESCE_LIMIT = 64 * 1024

cdef enum:
    FRAME_HEADER_SIZE = 5
    FRAME_MAX_PAYLOAD = 16 * 1024 * 1024
    # Linux IOV_MAX is 1024; batches stay well below it.
    IOV_BATCH = 64
    MIN_BUFFER_SIZE = 64

if HEADER_SIZE != FRAME_HEADER_SIZE or MAX_PAYLOAD != FRAME_MAX_PAYLOAD:
    raise ImportError(
        f"fcvsock._cframes: built for a {FRAME_HEADER_SIZE}-byte header and "
        f"{FRAME_MAX_PAYLOAD}-byte payloads, fcvsock.protocol has "
        f"{HEADER_SIZE} and {MAX_PAYLOAD}"
    )


cdef inline Py_ssize_t _read_length(const unsigned char *field) noexcept nogil:
    # Assembled byte by byte: the wire order is little-endian on every host.
    return <Py_ssize_t>(
        <uint32_t>field[0]
        | (<uint32_t>field[1] << 8)
        | (<uint32_t>field[2] << 16)
        | (<uint32_t>field[3] << 24)
    )


cdef inline void _put_header(
    unsigned char *out, int frame_type, Py_ssize_t length
) noexcept nogil:
    out[0] = <unsigned char>frame_type
    out[1] = <unsigned char>(length & 0xFF)
    out[2] = <unsigned char>((length >> 8) & 0xFF)
    out[3] = <unsigned char>((length >> 16) & 0xFF)
    out[4] = <unsigned char>((length >> 24) & 0xFF)


cdef int _check_limits(object max_payload, object buffer_size) except -1:
    if not 0 <= max_payload <= MAX_PAYLOAD:
        raise ValueError(
            f"frame decoder: max_payload must be in 0..{MAX_PAYLOAD}, "
            f"got {max_payload}"
        )
    if buffer_size < MIN_BUFFER_SIZE:
        raise ValueError(
            f"frame decoder: buffer_size must be at least {MIN_BUFFER_SIZE}, "
            f"got {buffer_size}"
        )
    return 0


cdef object _too_large(Py_ssize_t length, Py_ssize_t limit):
    return FrameTooLargeError(
        f"decode frame: payload length {length} exceeds the limit of "
        f"{limit} bytes",
        length,
        limit,
    )


cdef object _incomplete_payload(
    int frame_type, Py_ssize_t received, Py_ssize_t length
):
    return IncompleteFrameError(
        f"decode frame: stream ended inside the payload of a frame of type "
        f"0x{frame_type:02x}: got {received} of {length} bytes",
        "payload",
        received,
        length,
    )


cdef int _check_type(object frame_type) except -1:
    frame_type = operator.index(frame_type)
    if not 0 <= frame_type <= 0xFF:
        raise ValueError(f"encode frame: type must be in 0..255, got {frame_type}")
    return frame_type


cdef int _check_length(Py_ssize_t length, Py_ssize_t limit) except -1:
    if length > limit:
        raise FrameTooLargeError(
            f"encode frame: payload length {length} exceeds the limit of "
            f"{limit} bytes",
            length,
            limit,
        )
    return 0


cdef int _get_bytes(object data, Py_buffer *view) except -1:
    # memoryview(...).cast("B") raises the same TypeError as the twin for
    # objects that are not C-contiguous bytes-like objects.
    if PyBytes_CheckExact(data) or PyByteArray_CheckExact(data):
        PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    else:
        PyObject_GetBuffer(memoryview(data).cast("B"), view, PyBUF_SIMPLE)
    return 0


cdef object _os_error(int error_number):
    # OSError() picks the subclass for the errno, as PyErr_SetFromErrno does.
    return OSError(error_number, os.strerror(error_number))


def encode_frame(frame_type, payload=b""):
    """Return one frame as bytes: header followed by payload."""
    cdef Py_buffer view
    cdef int kind = _check_type(frame_type)
    cdef unsigned char *out

    _get_bytes(payload, &view)
    try:
        _check_length(view.len, FRAME_MAX_PAYLOAD)
        frame = PyBytes_FromStringAndSize(NULL, FRAME_HEADER_SIZE + view.len)
        out = <unsigned char *>PyBytes_AS_STRING(frame)
        _put_header(out, kind, view.len)
        memcpy(out + FRAME_HEADER_SIZE, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return frame


cdef class FrameDecoder:
    """Split a byte stream into ``(type, payload)`` frames.

    Feed it bytes with :meth:`feed`, or let it read a non-blocking fd with
    :meth:`read_fd`.  Both return the list of frames completed by the call;
    payloads are ``bytes``.  Call :meth:`feed_eof` when the stream ends: it
    raises :class:`IncompleteFrameError` if the stream stopped inside a frame.
    """

    def __init__(self, max_payload=MAX_PAYLOAD, buffer_size=DEFAULT_BUFFER_SIZE):
        _check_limits(max_payload, buffer_size)
        self._max_payload = max_payload
        self._receive_buffer = bytearray(buffer_size)
        self._buffer = <unsigned char *>PyByteArray_AS_STRING(self._receive_buffer)
        self._buffer_size = PyByteArray_GET_SIZE(self._receive_buffer)
        self._direct_threshold = self._buffer_size // 4
        self._start = 0
        self._end = 0
        self._payload = None
        self._payload_length = 0
        self._payload_filled = 0
        self._payload_type = 0
        self._error = None
        self._eof = False
        self._spares = []

    @property
    def at_eof(self):
        """True once :meth:`read_fd` has seen the end of the stream."""
        return self._eof

    @property
    def buffered(self):
        """Bytes held of frames not yet complete."""
        if self._payload is not None:
            return FRAME_HEADER_SIZE + self._payload_filled
        return self._end - self._start

    def feed(self, data):
        """Decode ``data`` and return the frames it completes."""
        cdef Py_buffer view
        cdef list frames = []

        self._raise_pending()
        _get_bytes(data, &view)
        try:
            self._feed_bytes(<const unsigned char *>view.buf, view.len, frames)
        finally:
            PyBuffer_Release(&view)
        return self._deliver(frames)

    def read_fd(self, int fd, max_bytes=DEFAULT_READ_BUDGET):
        """Read a non-blocking fd until EAGAIN, EOF or ``max_bytes`` were read.

        No read requests more than what is left of ``max_bytes``, so the bytes
        beyond it stay in the kernel.  Return the frames completed.  EOF sets
        :attr:`at_eof`.  An ``OSError`` from the read is raised at once when no
        frame was completed, and otherwise by the next call, after those
        frames were delivered.
        """
        cdef list frames = []
        cdef Py_ssize_t budget

        self._raise_pending()
        budget = PY_SSIZE_T_MAX if max_bytes > PY_SSIZE_T_MAX else max_bytes
        self._read_fd(fd, budget, frames)
        return self._deliver(frames)

    def feed_eof(self):
        """Mark the end of the stream; raise if it ended inside a frame."""
        cdef Py_ssize_t available
        cdef const unsigned char *head

        self._raise_pending()
        self._eof = True
        available = self._end - self._start
        if self._payload is not None:
            error = _incomplete_payload(
                self._payload_type, self._payload_filled, self._payload_length
            )
        elif available >= FRAME_HEADER_SIZE:
            head = self._buffer + self._start
            error = _incomplete_payload(
                head[0], available - FRAME_HEADER_SIZE, _read_length(head + 1)
            )
        elif available > 0:
            error = IncompleteFrameError(
                f"decode frame: stream ended inside a frame header: got "
                f"{available} of {HEADER_SIZE} bytes",
                "header",
                available,
                HEADER_SIZE,
            )
        else:
            return
        self._error = error
        raise error

    cdef int _raise_pending(self) except -1:
        if self._receive_buffer is None:
            raise RuntimeError("frame decoder: __init__ was not called")
        if self._error is not None:
            error = self._error
            if isinstance(error, OSError):
                # A read error is reported once; the stream is gone after it.
                self._error = None
                self._eof = True
            raise error
        return 0

    cdef list _deliver(self, list frames):
        if not frames:
            self._raise_pending()
        return frames

    cdef int _feed_bytes(
        self, const unsigned char *data, Py_ssize_t total, list frames
    ) except -1:
        cdef Py_ssize_t offset = 0
        cdef Py_ssize_t count

        while offset < total and self._error is None:
            if self._payload is not None:
                count = min(
                    total - offset, self._payload_length - self._payload_filled
                )
                memcpy(
                    PyBytes_AS_STRING(self._payload) + self._payload_filled,
                    data + offset,
                    count,
                )
                self._payload_filled += count
                offset += count
                self._finish_direct(frames)
                continue
            self._make_room()
            count = min(total - offset, self._buffer_size - self._end)
            memcpy(self._buffer + self._end, data + offset, count)
            self._end += count
            offset += count
            self._parse(frames)
        return 0

    cdef int _read_fd(self, int fd, Py_ssize_t budget, list frames) except -1:
        cdef Py_ssize_t received = 0
        cdef Py_ssize_t size
        cdef ssize_t count
        cdef int error_number
        cdef char *target
        cdef bytes payload
        # Local references keep the target objects alive while the GIL is
        # released, whatever another thread does to this decoder.
        cdef bytearray receive_buffer = self._receive_buffer

        while received < budget and self._error is None and not self._eof:
            payload = self._payload
            if payload is not None:
                target = PyBytes_AS_STRING(payload) + self._payload_filled
                size = self._payload_length - self._payload_filled
            else:
                self._make_room()
                target = PyByteArray_AS_STRING(receive_buffer) + self._end
                size = self._buffer_size - self._end
            size = min(size, budget - received)
            with nogil:
                count = read(fd, target, <size_t>size)
                error_number = errno
            if count < 0:
                if error_number == EINTR:
                    # Run signal handlers and retry unless one raised.
                    PyErr_CheckSignals()
                    continue
                if error_number == EAGAIN or error_number == EWOULDBLOCK:
                    break
                self._error = _os_error(error_number)
                break
            if count == 0:
                self._eof = True
                break
            received += count
            if payload is not None:
                self._payload_filled += count
                self._finish_direct(frames)
            else:
                self._end += count
                self._parse(frames)
        return 0

    cdef void _make_room(self) noexcept:
        # Compact only when a whole small frame might not fit behind _end.
        cdef Py_ssize_t size
        cdef Py_ssize_t free = self._buffer_size - self._end

        if self._start and free < self._direct_threshold + FRAME_HEADER_SIZE:
            size = self._end - self._start
            memmove(self._buffer, self._buffer + self._start, size)
            self._start = 0
            self._end = size

    cdef int _parse(self, list frames) except -1:
        cdef Py_ssize_t available
        cdef Py_ssize_t length
        cdef const unsigned char *head

        while True:
            available = self._end - self._start
            if available < FRAME_HEADER_SIZE:
                break
            head = self._buffer + self._start
            length = _read_length(head + 1)
            if length > self._max_payload:
                self._error = _too_large(length, self._max_payload)
                return 0
            if available - FRAME_HEADER_SIZE < length:
                if length > self._direct_threshold:
                    self._start_direct(head[0], length)
                break
            payload = PyBytes_FromStringAndSize(
                <const char *>head + FRAME_HEADER_SIZE, length
            )
            frames.append((head[0], payload))
            self._start += FRAME_HEADER_SIZE + length
        if self._start == self._end:
            self._start = 0
            self._end = 0
        return 0

    cdef int _start_direct(self, int frame_type, Py_ssize_t length) except -1:
        # Everything buffered after the header belongs to this payload, and
        # length exceeds that count.  The bytes object stays private until it
        # is complete, so filling it in place is safe.
        cdef Py_ssize_t begin = self._start + FRAME_HEADER_SIZE
        cdef Py_ssize_t count = self._end - begin

        payload = self._take_spare(length)
        if payload is None:
            payload = PyBytes_FromStringAndSize(NULL, length)
        memcpy(PyBytes_AS_STRING(payload), self._buffer + begin, count)
        self._payload = payload
        self._payload_length = length
        self._payload_type = frame_type
        self._payload_filled = count
        self._start = 0
        self._end = 0
        return 0

    cdef int _finish_direct(self, list frames) except -1:
        if self._payload is None or self._payload_filled < self._payload_length:
            return 0
        frames.append((self._payload_type, self._payload))
        self._keep_spare(self._payload)
        self._payload = None
        self._payload_length = 0
        self._payload_filled = 0
        return 0


    cdef bytes _take_spare(self, Py_ssize_t length):
        # A spare whose only reference is this list is invisible to everyone
        # else, so overwriting it keeps bytes immutable for every observer.
        cdef Py_ssize_t index
        cdef PyObject *item
        cdef bytes payload

        for index in range(PyList_GET_SIZE(self._spares)):
            item = PyList_GET_ITEM(self._spares, index)
            if Py_REFCNT(item) == 1 and PyBytes_GET_SIZE(<object>item) == length:
                payload = <bytes>item
                del self._spares[index]
                # The bytes object caches its hash; a stale one would make
                # the new content compare unequal in dicts and sets.
                # NOTE: ob_shash is deprecated since CPython 3.11 but still
                # present; if it is removed, drop reuse rather than the reset.
                (<PyBytesObject *>item).ob_shash = -1
                return payload
        return None

    cdef int _keep_spare(self, bytes payload) except -1:
        if PyBytes_GET_SIZE(payload) < SPARE_MIN_SIZE:
            return 0
        self._spares.append(payload)
        if len(self._spares) > MAX_SPARES:
            del self._spares[0]
        return 0

cdef class FrameWriter:
    """Queue frames and write them to a non-blocking fd.

    :meth:`write` only queues; :meth:`flush` writes until the kernel buffer is
    full and returns the bytes still pending, which callers use for
    backpressure.  A ``bytes`` payload above ``coalesce_limit`` is sent from
    the caller's object without a copy.
    """

    def __init__(self, max_payload=MAX_PAYLOAD, coalesce_limit=DEFAULT_COALESCE_LIMIT):
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
        self._coalesce_limit = min(coalesce_limit, PY_SSIZE_T_MAX)
        self._chunks = []
        self._head = 0
        self._head_offset = 0
        self._tail = bytearray()
        self._pending = 0

    @property
    def pending(self):
        """Bytes queued and not yet accepted by the kernel."""
        return self._pending

    def write(self, frame_type, payload=b""):
        """Queue one frame."""
        cdef Py_buffer view
        cdef unsigned char header[FRAME_HEADER_SIZE]
        cdef int kind = _check_type(frame_type)
        cdef Py_ssize_t length

        _get_bytes(payload, &view)
        try:
            length = view.len
            _check_length(length, self._max_payload)
            _put_header(header, kind, length)
            if length <= self._coalesce_limit:
                self._append_tail(<const char *>header, FRAME_HEADER_SIZE)
                self._append_tail(<const char *>view.buf, length)
            else:
                if isinstance(payload, bytes):
                    chunk = payload
                else:
                    chunk = PyBytes_FromStringAndSize(<const char *>view.buf, length)
                self._append_tail(<const char *>header, FRAME_HEADER_SIZE)
                self._seal_tail()
                self._chunks.append(chunk)
        finally:
            PyBuffer_Release(&view)
        self._pending += FRAME_HEADER_SIZE + length

    def write_raw(self, data):
        """Queue bytes that are not a frame, such as a handshake line."""
        cdef Py_buffer view

        _get_bytes(data, &view)
        try:
            self._append_tail(<const char *>view.buf, view.len)
            self._pending += view.len
        finally:
            PyBuffer_Release(&view)

    def data_to_send(self):
        """Return and dequeue every pending byte, for use without an fd."""
        self._seal_tail()
        parts = self._chunks[self._head:]
        if parts and self._head_offset:
            parts[0] = memoryview(parts[0])[self._head_offset:]
        data = b"".join(parts)
        self._chunks = []
        self._head = 0
        self._head_offset = 0
        self._pending = 0
        return data

    def flush(self, int fd):
        """Write to ``fd`` until done or EAGAIN; return the bytes pending.

        EINTR is retried.  Other ``OSError``s, such as ``BrokenPipeError``,
        propagate with the bytes not yet written left in the queue.
        """
        cdef iovec vectors[IOV_BATCH]
        cdef msghdr message
        cdef ssize_t written
        cdef int count
        cdef int error_number

        self._seal_tail()
        while self._head < len(self._chunks):
            count = self._fill_iovecs(vectors, IOV_BATCH)
            memset(&message, 0, sizeof(message))
            message.msg_iov = vectors
            message.msg_iovlen = count
            # The GIL stays held because the iovecs point into queued objects,
            # which a call from another thread could otherwise dequeue and free.
            written = sendmsg(fd, &message, MSG_NOSIGNAL)
            error_number = errno
            if written < 0 and error_number == ENOTSOCK:
                written = writev(fd, vectors, count)
                error_number = errno
            if written < 0:
                if error_number == EINTR:
                    PyErr_CheckSignals()
                    continue
                if error_number == EAGAIN or error_number == EWOULDBLOCK:
                    break
                raise _os_error(error_number)
            self._pending -= written
            self._consume(written)
        return self._pending

    cdef int _append_tail(self, const char *data, Py_ssize_t size) except -1:
        cdef Py_ssize_t used = PyByteArray_GET_SIZE(self._tail)

        if size == 0:
            return 0
        # Resizing over-allocates, so appending many small frames is linear.
        PyByteArray_Resize(self._tail, used + size)
        memcpy(PyByteArray_AS_STRING(self._tail) + used, data, size)
        return 0

    cdef int _seal_tail(self) except -1:
        if PyByteArray_GET_SIZE(self._tail):
            self._chunks.append(self._tail)
            self._tail = bytearray()
        return 0

    cdef int _fill_iovecs(self, iovec *vectors, int limit) except -1:
        cdef int count = 0
        cdef Py_ssize_t index = self._head
        cdef Py_ssize_t offset = self._head_offset
        cdef list chunks = self._chunks
        cdef char *base
        cdef Py_ssize_t size

        while count < limit and index < len(chunks):
            chunk = chunks[index]
            if PyByteArray_CheckExact(chunk):
                base = PyByteArray_AS_STRING(chunk)
                size = PyByteArray_GET_SIZE(chunk)
            else:
                base = PyBytes_AS_STRING(chunk)
                size = PyBytes_GET_SIZE(chunk)
            vectors[count].iov_base = base + offset
            vectors[count].iov_len = <size_t>(size - offset)
            offset = 0
            count += 1
            index += 1
        return count

    cdef int _consume(self, Py_ssize_t written) except -1:
        cdef list chunks = self._chunks
        cdef Py_ssize_t remaining

        while written > 0:
            remaining = len(chunks[self._head]) - self._head_offset
            if written >= remaining:
                written -= remaining
                self._head += 1
                self._head_offset = 0
            else:
                self._head_offset += written
                written = 0
        # Dropping written chunks in batches keeps dequeuing amortised O(1).
        if self._head == len(chunks):
            chunks.clear()
            self._head = 0
        elif self._head >= IOV_BATCH:
            del chunks[:self._head]
            self._head = 0
        return 0
