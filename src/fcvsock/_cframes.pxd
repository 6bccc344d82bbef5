# cython: language_level=3
# Fields and C methods of the compiled frame core in src/_cframes.pyx.  Cython
# looks up a module's own .pxd by its qualified name, fcvsock._cframes, so this
# file lives in src/fcvsock/ while the .pyx does not.

from posix.uio cimport iovec


cdef class FrameDecoder:
    # Largest payload length accepted from a header.
    cdef Py_ssize_t _max_payload
    # Receive buffer, allocated in __init__ and never resized, so _buffer
    # stays valid while the bytearray lives.
    cdef bytearray _receive_buffer
    # Storage of _receive_buffer.
    cdef unsigned char *_buffer
    # Size of _receive_buffer in bytes.
    cdef Py_ssize_t _buffer_size
    # buffer_size // 4.  A longer payload that is not complete in _buffer
    # gets its own bytes object.
    cdef Py_ssize_t _direct_threshold
    # Offset in _buffer of the first unparsed byte.
    cdef Py_ssize_t _start
    # Offset in _buffer just past the last received byte.
    cdef Py_ssize_t _end
    # Large payload being received, or None.  It stays private until it is
    # complete, so it is filled in place.
    cdef bytes _payload
    # Length of _payload from its header.
    cdef Py_ssize_t _payload_length
    # Bytes of _payload received so far.
    cdef Py_ssize_t _payload_filled
    # Frame type of _payload.
    cdef int _payload_type
    # Deferred error or None.  A ProtocolError stays and an OSError is raised
    # once.
    cdef object _error
    # Set by feed_eof(), by a read that returned 0, and after a read error.
    cdef bint _eof
    # Delivered large payloads kept for reuse once the caller drops them.
    cdef list _spares

    cdef bytes _take_spare(self, Py_ssize_t length)
    cdef int _keep_spare(self, bytes payload) except -1

    cdef int _raise_pending(self) except -1
    cdef list _deliver(self, list frames)
    cdef int _feed_bytes(
        self, const unsigned char *data, Py_ssize_t total, list frames
    ) except -1
    cdef int _read_fd(self, int fd, Py_ssize_t budget, list frames) except -1
    cdef void _make_room(self) noexcept
    cdef int _parse(self, list frames) except -1
    cdef int _start_direct(self, int frame_type, Py_ssize_t length) except -1
    cdef int _finish_direct(self, list frames) except -1


cdef class FrameWriter:
    # Largest payload length accepted by write().
    cdef Py_ssize_t _max_payload
    # Payloads up to this length are copied into _tail.  Longer ones are
    # queued as chunks of their own.
    cdef Py_ssize_t _coalesce_limit
    # Queued bytes or bytearray objects, never mutated once queued.
    cdef list _chunks
    # Index in _chunks of the first chunk not completely written.
    cdef Py_ssize_t _head
    # Bytes of _chunks[_head] already written.
    cdef Py_ssize_t _head_offset
    # Small frames and raw bytes queued since the last seal.
    cdef bytearray _tail
    # Bytes queued and not yet accepted by the kernel.
    cdef Py_ssize_t _pending

    cdef int _append_tail(self, const char *data, Py_ssize_t size) except -1
    cdef int _seal_tail(self) except -1
    cdef int _fill_iovecs(self, iovec *vectors, int limit) except -1
    cdef int _consume(self, Py_ssize_t written) except -1
