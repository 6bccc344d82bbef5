"""Frame decoder, frame writer and encode_frame, in both frame cores.

Most tests run once per core through the ``frame_core`` fixture.  The
property tests at the end feed the same input to both cores and require the
same frames, the same errors and the same state after every call.
"""

from __future__ import annotations

import array
import fcntl
import inspect
import itertools
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcvsock import _core
from fcvsock.errors import FrameTooLargeError, IncompleteFrameError, ProtocolError
from fcvsock.protocol import MAX_PAYLOAD

KIB = 1024
MIB = 1024 * 1024
# Upper bound for any wait on a socket.  Reaching it fails the test.
WAIT_SECONDS = 30.0


def frame(frame_type: int, payload: bytes = b"") -> bytes:
    """Encode a frame with struct, independently of the cores under test."""
    return struct.pack("<BI", frame_type, len(payload)) + payload


def pattern(size: int, seed: int = 0) -> bytes:
    """Return ``size`` bytes that differ at every offset modulo 251."""
    block = bytes((seed + i) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


def unread_bytes(sock: socket.socket) -> int:
    """Return the bytes waiting in the receive queue of ``sock``."""
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


def drain(sock: socket.socket) -> bytes:
    """Return everything ``sock`` can receive without blocking."""
    parts = []
    while True:
        try:
            chunk = sock.recv(256 * KIB, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not chunk:
            break
        parts.append(chunk)
    return b"".join(parts)


def wait_readable(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    readable, _, _ = select.select([sock], [], [], max(0.0, remaining))
    if not readable:
        raise AssertionError(f"socket not readable within {WAIT_SECONDS} s")


def read_frames(
    decoder: Any, sock: socket.socket, count: int
) -> list[tuple[int, bytes]]:
    """Call read_fd until ``count`` frames arrived or the stream ended."""
    frames: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while len(frames) < count and not decoder.at_eof:
        wait_readable(sock, deadline)
        frames += decoder.read_fd(sock.fileno())
    return frames


def read_until_buffered(decoder: Any, sock: socket.socket, target: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while decoder.buffered < target:
        wait_readable(sock, deadline)
        assert decoder.read_fd(sock.fileno()) == []


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected Unix stream pair: (non-blocking local end, blocking peer)."""
    local, peer = socket.socketpair()
    local.setblocking(False)
    yield local, peer
    local.close()
    peer.close()


# Core selection and public interface


def test_compiled_core_selected() -> None:
    if _core.extensions_disabled:
        assert _core.core_impl == "python"
        return
    assert _core.cython_core is not None, "fcvsock._cframes did not import"
    assert _core.core_impl == "cython"
    assert _core.FrameDecoder is _core.cython_core.FrameDecoder


def _signature(function: Any) -> list[tuple[str, Any, Any]]:
    parameters = inspect.signature(function).parameters.values()
    return [(p.name, p.kind, p.default) for p in parameters]


def test_public_api_matches(cython_frame_core: ModuleType) -> None:
    python_core = _core.python_core
    assert cython_frame_core.__all__ == python_core.__all__
    defaults = ("DEFAULT_BUFFER_SIZE", "DEFAULT_COALESCE_LIMIT", "DEFAULT_READ_BUDGET")
    for name in defaults:
        assert getattr(cython_frame_core, name) == getattr(python_core, name)
    assert _signature(cython_frame_core.encode_frame) == _signature(
        python_core.encode_frame
    )
    for class_name in ("FrameDecoder", "FrameWriter"):
        python_class = getattr(python_core, class_name)
        cython_class = getattr(cython_frame_core, class_name)
        names = {n for n in dir(python_class) if not n.startswith("_")}
        assert {n for n in dir(cython_class) if not n.startswith("_")} == names
        for name in names:
            python_member = getattr(python_class, name)
            if callable(python_member):
                cython_member = getattr(cython_class, name)
                assert _signature(cython_member) == _signature(python_member), name


# Decoder: feed


def test_header_split_across_feeds(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    data = frame(0x10, b"hello")
    for index in range(len(data) - 1):
        assert decoder.feed(data[index : index + 1]) == []
        assert decoder.buffered == index + 1
    assert decoder.feed(data[-1:]) == [(0x10, b"hello")]
    assert decoder.buffered == 0


def test_many_frames_one_feed(frame_core: ModuleType) -> None:
    expected = [(i % 256, pattern(i % 97, seed=i)) for i in range(2000)]
    decoder = frame_core.FrameDecoder(buffer_size=4 * KIB)
    frames = decoder.feed(b"".join(frame(t, p) for t, p in expected))
    assert frames == expected
    assert decoder.buffered == 0


def test_payloads_are_bytes(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder(buffer_size=64)
    frames = decoder.feed(bytearray(frame(1, b"small") + frame(2, pattern(500))))
    assert [type(payload) for _, payload in frames] == [bytes, bytes]


def test_feed_accepts_memoryview(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    assert decoder.feed(memoryview(frame(3, b"abc"))) == [(3, b"abc")]


def test_feed_rejects_str_unchanged(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    decoder.feed(b"\x01\x02")
    with pytest.raises(TypeError):
        decoder.feed("text")
    assert decoder.buffered == 2
    assert decoder.feed(b"\x00\x00\x00ab") == [(1, b"ab")]


BUFFER_SIZE = 4 * KIB
ACCEPTED_SIZES = [
    0,
    1,
    BUFFER_SIZE // 4,
    BUFFER_SIZE // 4 + 1,
    64 * KIB,
    MIB,
    MAX_PAYLOAD,
]


@pytest.mark.parametrize("size", ACCEPTED_SIZES, ids=str)
def test_frame_size_accepted(frame_core: ModuleType, size: int) -> None:
    payload = pattern(size)
    data = frame(0x11, payload)
    middle = 5 + size // 2
    decoder = frame_core.FrameDecoder(buffer_size=BUFFER_SIZE)
    frames = decoder.feed(data[:3]) + decoder.feed(data[3:middle])
    frames += decoder.feed(data[middle:])
    assert len(frames) == 1
    assert frames[0][0] == 0x11
    assert frames[0][1] == payload
    assert decoder.buffered == 0


def test_max_size_frame_in_one_feed(frame_core: ModuleType) -> None:
    payload = pattern(MAX_PAYLOAD, seed=3)
    frames = frame_core.FrameDecoder().feed(frame(0x10, payload) + frame(1, b"x"))
    assert frames == [(0x10, payload), (1, b"x")]


def test_oversized_frame_rejected_before_allocation(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    data = struct.pack("<BI", 0x10, MAX_PAYLOAD + 1) + bytes(1000)
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLargeError) as caught:
            decoder.feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MIB
    assert isinstance(caught.value, ValueError)
    assert caught.value.length == MAX_PAYLOAD + 1
    assert caught.value.limit == MAX_PAYLOAD
    assert str(caught.value) == (
        "decode frame: payload length 16777217 exceeds the limit of 16777216 bytes"
    )


def test_decoder_unusable_after_protocol_error(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    decoder = frame_core.FrameDecoder(max_payload=10)
    with pytest.raises(FrameTooLargeError) as caught:
        decoder.feed(frame(1, bytes(11)))
    peer.sendall(frame(1, b"ok"))
    for call in (
        lambda: decoder.feed(frame(1, b"ok")),
        lambda: decoder.read_fd(local.fileno()),
        decoder.feed_eof,
    ):
        with pytest.raises(FrameTooLargeError) as again:
            call()
        assert again.value is caught.value
    assert unread_bytes(local) == len(frame(1, b"ok"))


def test_custom_max_payload_accepted(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder(max_payload=10)
    assert decoder.feed(frame(1, bytes(10))) == [(1, bytes(10))]


def test_frames_before_error_delivered(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder(max_payload=100)
    data = frame(1, b"a") + frame(2, b"b") + struct.pack("<BI", 3, 101)
    assert decoder.feed(data) == [(1, b"a"), (2, b"b")]
    with pytest.raises(FrameTooLargeError):
        decoder.feed(b"")


def test_eof_inside_header(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    decoder.feed(b"\x10\x05\x00")
    with pytest.raises(IncompleteFrameError) as caught:
        decoder.feed_eof()
    error = caught.value
    assert isinstance(error, ProtocolError)
    assert (error.part, error.received, error.expected) == ("header", 3, 5)
    assert str(error) == (
        "decode frame: stream ended inside a frame header: got 3 of 5 bytes"
    )
    assert decoder.at_eof


def test_eof_inside_payload(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    decoder.feed(frame(0x11, b"0123456789")[:9])
    with pytest.raises(IncompleteFrameError) as caught:
        decoder.feed_eof()
    error = caught.value
    assert (error.part, error.received, error.expected) == ("payload", 4, 10)
    assert str(error) == (
        "decode frame: stream ended inside the payload of a frame of type "
        "0x11: got 4 of 10 bytes"
    )


def test_eof_inside_large_payload(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder(buffer_size=64)
    decoder.feed(frame(0x10, pattern(1000))[:500])
    with pytest.raises(IncompleteFrameError) as caught:
        decoder.feed_eof()
    error = caught.value
    assert (error.part, error.received, error.expected) == ("payload", 495, 1000)
    assert "got 495 of 1000 bytes" in str(error)


def test_incomplete_frame_error_sticky(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    decoder.feed(b"\x01")
    with pytest.raises(IncompleteFrameError) as caught:
        decoder.feed_eof()
    with pytest.raises(IncompleteFrameError) as again:
        decoder.feed(b"\x00")
    assert again.value is caught.value


def test_eof_between_frames_clean(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder()
    assert decoder.feed(frame(1, b"x")) == [(1, b"x")]
    decoder.feed_eof()
    assert decoder.at_eof


def test_receive_buffer_bounded(frame_core: ModuleType) -> None:
    buffer_size = 256
    rng = random.Random(5)
    expected = [
        (i % 256, pattern(rng.randint(0, buffer_size // 4), seed=i))
        for i in range(3000)
    ]
    data = b"".join(frame(t, p) for t, p in expected)
    decoder = frame_core.FrameDecoder(buffer_size=buffer_size)
    frames: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        size = rng.choice([1, 7, 60, 255, 256, 1000, 5000])
        frames += decoder.feed(data[offset : offset + size])
        offset += size
        assert decoder.buffered <= buffer_size
    assert frames == expected


def test_large_payload_held_outside_buffer(frame_core: ModuleType) -> None:
    decoder = frame_core.FrameDecoder(buffer_size=64)
    data = frame(2, pattern(10_000))
    for end in range(1000, len(data), 1000):
        assert decoder.feed(data[end - 1000 : end]) == []
        assert decoder.buffered == end
    assert decoder.feed(data[len(data) // 1000 * 1000 :]) == [(2, pattern(10_000))]


@pytest.mark.parametrize(
    ("max_payload", "buffer_size", "message"),
    [
        (-1, 64, "frame decoder: max_payload must be in 0..16777216, got -1"),
        (
            MAX_PAYLOAD + 1,
            64,
            "frame decoder: max_payload must be in 0..16777216, got 16777217",
        ),
        (10, 63, "frame decoder: buffer_size must be at least 64, got 63"),
    ],
)
def test_decoder_rejects_limits(
    frame_core: ModuleType, max_payload: int, buffer_size: int, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        frame_core.FrameDecoder(max_payload=max_payload, buffer_size=buffer_size)
    assert str(caught.value) == message


# Decoder: read_fd


def test_read_fd_many_small_frames(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    expected = [(1, pattern(i % 50, seed=i)) for i in range(1000)]
    peer.sendall(b"".join(frame(t, p) for t, p in expected))
    decoder = frame_core.FrameDecoder()
    assert decoder.read_fd(local.fileno()) == expected
    assert not decoder.at_eof


def test_read_fd_nothing_available(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, _ = socket_pair
    decoder = frame_core.FrameDecoder()
    assert decoder.read_fd(local.fileno()) == []
    assert not decoder.at_eof


def test_read_fd_large_frame(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    payload = pattern(4 * MIB, seed=9)
    data = frame(0x10, payload) + frame(0x11, b"after")
    sender = threading.Thread(target=peer.sendall, args=(data,))
    sender.start()
    decoder = frame_core.FrameDecoder(buffer_size=64 * KIB)
    frames = read_frames(decoder, local, 2)
    sender.join()
    assert frames == [(0x10, payload), (0x11, b"after")]


def test_read_fd_large_payload_outside_buffer(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    payload = pattern(MIB)
    data = frame(0x10, payload)
    first = threading.Thread(target=peer.sendall, args=(data[:300_000],))
    first.start()
    decoder = frame_core.FrameDecoder(buffer_size=64 * KIB)
    read_until_buffered(decoder, local, 300_000)
    first.join()
    assert decoder.buffered == 300_000
    rest = threading.Thread(target=peer.sendall, args=(data[300_000:],))
    rest.start()
    frames = read_frames(decoder, local, 1)
    rest.join()
    assert frames == [(0x10, payload)]


def test_large_payload_allocated_once(
    cython_frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    size = 8 * MIB
    data = frame(0x10, pattern(size))
    sender = threading.Thread(target=peer.sendall, args=(data,))
    decoder = cython_frame_core.FrameDecoder(buffer_size=64 * KIB)
    tracemalloc.start()
    try:
        sender.start()
        frames = read_frames(decoder, local, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sender.join()
    assert len(frames[0][1]) == size
    assert peak < size + MIB


def test_read_fd_eof_after_frames(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    peer.sendall(frame(1, b"a") + frame(2, b"b"))
    peer.close()
    decoder = frame_core.FrameDecoder()
    assert decoder.read_fd(local.fileno()) == [(1, b"a"), (2, b"b")]
    assert decoder.at_eof
    assert decoder.read_fd(local.fileno()) == []
    decoder.feed_eof()


def test_read_fd_eof_inside_frame(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    peer.sendall(frame(1, b"abcdef")[:8])
    peer.close()
    decoder = frame_core.FrameDecoder()
    assert decoder.read_fd(local.fileno()) == []
    assert decoder.at_eof
    with pytest.raises(IncompleteFrameError) as caught:
        decoder.feed_eof()
    assert (caught.value.part, caught.value.received) == ("payload", 3)


def _reset_by_peer(local: socket.socket, peer: socket.socket, data: bytes) -> None:
    # Linux reports ECONNRESET to a Unix stream socket whose peer closed
    # with unread data, once the bytes sent before the close are read.
    local.send(b"never read")
    peer.sendall(data)
    peer.close()


def test_read_error_deferred_after_frames(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    _reset_by_peer(local, peer, frame(1, b"a") + frame(2, b"b"))
    decoder = frame_core.FrameDecoder()
    assert decoder.read_fd(local.fileno()) == [(1, b"a"), (2, b"b")]
    with pytest.raises(ConnectionResetError) as caught:
        decoder.read_fd(local.fileno())
    assert str(caught.value) == "[Errno 104] Connection reset by peer"
    assert decoder.at_eof
    assert decoder.read_fd(local.fileno()) == []


def test_read_error_raised_at_once(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    _reset_by_peer(local, peer, b"\x01\x00")
    decoder = frame_core.FrameDecoder()
    with pytest.raises(ConnectionResetError):
        decoder.read_fd(local.fileno())
    assert decoder.at_eof
    assert decoder.buffered == 2


def test_read_error_deferred_past_feed(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    _reset_by_peer(local, peer, frame(1, b"a"))
    decoder = frame_core.FrameDecoder()
    assert decoder.read_fd(local.fileno()) == [(1, b"a")]
    with pytest.raises(ConnectionResetError):
        decoder.feed(frame(2, b"b"))
    assert decoder.feed(frame(2, b"b")) == [(2, b"b")]


def test_read_fd_bad_fd(frame_core: ModuleType) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    decoder = frame_core.FrameDecoder()
    with pytest.raises(OSError) as caught:
        decoder.read_fd(read_end)
    assert str(caught.value) == "[Errno 9] Bad file descriptor"


def test_read_fd_budget(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    expected = [(1, bytes([i]) * 100) for i in range(10)]
    peer.sendall(b"".join(frame(t, p) for t, p in expected))
    decoder = frame_core.FrameDecoder()
    assert decoder.read_fd(local.fileno(), max_bytes=300) == expected[:2]
    assert decoder.buffered == 90
    assert unread_bytes(local) == 750
    assert decoder.read_fd(local.fileno()) == expected[2:]


def test_read_fd_budget_large_payload(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    data = frame(1, pattern(100_000))
    peer.sendall(data)
    decoder = frame_core.FrameDecoder(buffer_size=4 * KIB)
    for count in range(1, 10):
        assert decoder.read_fd(local.fileno(), max_bytes=10_000) == []
        assert unread_bytes(local) == len(data) - count * 10_000
    assert decoder.read_fd(local.fileno()) == [(1, pattern(100_000))]


def test_read_fd_buffer_bounded(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    buffer_size = 1024
    expected = [(2, pattern(i % (buffer_size // 4 + 1), seed=i)) for i in range(400)]
    peer.sendall(b"".join(frame(t, p) for t, p in expected))
    decoder = frame_core.FrameDecoder(buffer_size=buffer_size)
    frames: list[tuple[int, bytes]] = []
    while len(frames) < len(expected):
        batch = decoder.read_fd(local.fileno(), max_bytes=700)
        assert batch
        frames += batch
        assert decoder.buffered <= buffer_size
    assert frames == expected


# Writer


def test_writer_coalesces_small_frames(frame_core: ModuleType) -> None:
    writer = frame_core.FrameWriter()
    payload = bytearray(b"first")
    writer.write(1, payload)
    payload[:] = b"later"
    writer.write(2, b"")
    writer.write(3, memoryview(b"third"))
    expected = frame(1, b"first") + frame(2) + frame(3, b"third")
    assert writer.pending == len(expected)
    assert writer.data_to_send() == expected
    assert writer.pending == 0
    assert writer.data_to_send() == b""


def test_writer_references_large_bytes(frame_core: ModuleType) -> None:
    writer = frame_core.FrameWriter()
    payload = pattern(4 * MIB)
    tracemalloc.start()
    try:
        writer.write(0x10, payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * KIB
    assert writer.pending == 5 + len(payload)
    assert writer.data_to_send() == frame(0x10, payload)


def test_writer_copies_large_bytearray(frame_core: ModuleType) -> None:
    writer = frame_core.FrameWriter(coalesce_limit=4)
    payload = bytearray(b"0123456789")
    writer.write(1, payload)
    payload[:] = b"XXXXXXXXXX"
    assert writer.data_to_send() == frame(1, b"0123456789")


def test_write_raw_keeps_order(frame_core: ModuleType) -> None:
    writer = frame_core.FrameWriter(coalesce_limit=0)
    writer.write_raw(b"CONNECT 52\n")
    writer.write(1, b"start")
    writer.write_raw(bytearray(b"!"))
    assert writer.pending == 11 + 10 + 1
    assert writer.data_to_send() == b"CONNECT 52\n" + frame(1, b"start") + b"!"


def test_writer_rejects_oversized_payload(frame_core: ModuleType) -> None:
    writer = frame_core.FrameWriter(max_payload=4)
    writer.write(1, b"ok")
    with pytest.raises(FrameTooLargeError) as caught:
        writer.write(2, b"12345")
    assert str(caught.value) == (
        "encode frame: payload length 5 exceeds the limit of 4 bytes"
    )
    assert (caught.value.length, caught.value.limit) == (5, 4)
    assert writer.data_to_send() == frame(1, b"ok")


def test_writer_rejects_bad_payload_unchanged(frame_core: ModuleType) -> None:
    writer = frame_core.FrameWriter()
    with pytest.raises(TypeError):
        writer.write(1, "text")
    with pytest.raises(TypeError):
        writer.write(1, memoryview(b"abcdef")[::2])
    with pytest.raises(TypeError):
        writer.write_raw("text")
    assert writer.pending == 0
    assert writer.data_to_send() == b""


@pytest.mark.parametrize(
    ("max_payload", "coalesce_limit", "message"),
    [
        (-1, 0, "frame writer: max_payload must be in 0..16777216, got -1"),
        (10, -1, "frame writer: coalesce_limit must be at least 0, got -1"),
    ],
)
def test_writer_rejects_limits(
    frame_core: ModuleType, max_payload: int, coalesce_limit: int, message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        frame_core.FrameWriter(max_payload=max_payload, coalesce_limit=coalesce_limit)
    assert str(caught.value) == message


def test_flush_sends_everything(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    writer = frame_core.FrameWriter(coalesce_limit=0)
    expected = b"".join(frame(i % 256, pattern(10, seed=i)) for i in range(300))
    for i in range(300):
        writer.write(i % 256, pattern(10, seed=i))
    assert writer.flush(local.fileno()) == 0
    assert writer.pending == 0
    assert drain(peer) == expected
    assert writer.flush(local.fileno()) == 0


def test_flush_partial_writes(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = frame_core.FrameWriter(coalesce_limit=100)
    rng = random.Random(11)
    expected = bytearray()
    for i in range(300):
        payload = pattern(rng.choice([0, 1, 50, 100, 101, 300, 5000]), seed=i)
        writer.write(i % 256, payload)
        expected += frame(i % 256, payload)
    writer.write(0x10, pattern(MIB))
    expected += frame(0x10, pattern(MIB))
    received = bytearray()
    stalls = 0
    while True:
        pending = writer.flush(local.fileno())
        assert pending == writer.pending
        assert pending == len(expected) - len(received) - unread_bytes(peer)
        if not pending:
            break
        stalls += 1
        received += drain(peer)
    received += drain(peer)
    assert stalls > 10
    assert received == expected


def test_flush_broken_pipe(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    peer.close()
    writer = frame_core.FrameWriter()
    writer.write(1, b"x" * 100)
    with pytest.raises(BrokenPipeError):
        writer.flush(local.fileno())
    assert writer.pending == 105
    assert writer.data_to_send() == frame(1, b"x" * 100)


SIGPIPE_SCRIPT = """
import importlib, signal, socket, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
core = importlib.import_module(sys.argv[1])
local, peer = socket.socketpair()
peer.close()
writer = core.FrameWriter()
writer.write(1, b"x" * 100)
try:
    writer.flush(local.fileno())
except BrokenPipeError:
    print("BrokenPipeError")
"""


def test_flush_without_sigpipe(frame_core: ModuleType) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SIGPIPE_SCRIPT, frame_core.__name__],
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        check=False,
    )
    assert result.returncode != -signal.SIGPIPE, "killed by SIGPIPE"
    assert result.returncode == 0, result.stderr
    assert result.stdout == "BrokenPipeError\n"


def test_flush_to_pipe(frame_core: ModuleType) -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    try:
        writer = frame_core.FrameWriter()
        payload = pattern(200 * KIB)
        writer.write(1, b"small")
        writer.write(2, payload)
        received = bytearray()
        while writer.flush(write_end):
            received += os.read(read_end, MIB)
        while True:
            try:
                received += os.read(read_end, MIB)
            except BlockingIOError:
                break
    finally:
        os.close(read_end)
        os.close(write_end)
    assert received == frame(1, b"small") + frame(2, payload)


def test_data_to_send_after_partial_flush(
    frame_core: ModuleType, socket_pair: tuple[socket.socket, socket.socket]
) -> None:
    local, peer = socket_pair
    local.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = frame_core.FrameWriter()
    data = frame(1, pattern(MIB))
    writer.write(1, pattern(MIB))
    pending = writer.flush(local.fileno())
    assert 0 < pending < len(data)
    sent = drain(peer)
    assert writer.data_to_send() == data[len(sent) :]
    assert writer.pending == 0


# encode_frame


def test_encode_frame(frame_core: ModuleType) -> None:
    assert frame_core.encode_frame(0x12, b"\x00\x00\x00\x00") == frame(0x12, bytes(4))
    assert frame_core.encode_frame(0x04) == b"\x04\x00\x00\x00\x00"
    assert frame_core.encode_frame(1, bytearray(300)) == frame(1, bytes(300))


@pytest.mark.parametrize("frame_type", [-1, 256])
def test_encode_frame_rejects_type(frame_core: ModuleType, frame_type: int) -> None:
    with pytest.raises(ValueError) as caught:
        frame_core.encode_frame(frame_type, b"")
    assert str(caught.value) == (
        f"encode frame: type must be in 0..255, got {frame_type}"
    )


def test_encode_frame_rejects_oversized(frame_core: ModuleType) -> None:
    with pytest.raises(FrameTooLargeError) as caught:
        frame_core.encode_frame(1, bytes(MAX_PAYLOAD + 1))
    assert caught.value.length == MAX_PAYLOAD + 1


# Both cores on the same input


class _EndOfStream:
    pass


END = _EndOfStream()


def _outcome(error: BaseException) -> tuple[str, str, dict[str, Any]]:
    return (type(error).__name__, str(error), dict(vars(error)))


def _feed_trace(
    core: ModuleType, pieces: list[Any], max_payload: int, buffer_size: int
) -> list[Any]:
    """Feed ``pieces`` (then EOF) and record what each call did."""
    decoder = core.FrameDecoder(max_payload=max_payload, buffer_size=buffer_size)
    trace: list[Any] = []
    for piece in [*pieces, END]:
        result: Any
        try:
            if piece is END:
                decoder.feed_eof()
                result = "eof"
            else:
                result = decoder.feed(piece)
        except ProtocolError as exc:
            result = _outcome(exc)
        trace.append((result, decoder.buffered, decoder.at_eof))
    return trace


def _split(data: bytes, points: list[int], kinds: list[Any]) -> list[Any]:
    bounds = [0, *sorted(set(points)), len(data)]
    pieces = [data[start:end] for start, end in itertools.pairwise(bounds)]
    return [kinds[i % len(kinds)](piece) for i, piece in enumerate(pieces)]


frame_lists = st.lists(
    st.tuples(
        st.integers(0, 255),
        st.one_of(st.binary(max_size=40), st.binary(min_size=200, max_size=3000)),
    ),
    max_size=12,
)
buffer_sizes = st.sampled_from([64, 100, 256, 4096])
piece_kinds = st.lists(st.sampled_from([bytes, bytearray, memoryview]), min_size=1)


@settings(max_examples=300, deadline=None)
@given(
    frames=frame_lists,
    ending=st.sampled_from(["clean", "truncated", "oversized"]),
    buffer_size=buffer_sizes,
    data=st.data(),
)
def test_cores_agree_on_frame_streams(
    cython_frame_core: ModuleType,
    frames: list[tuple[int, bytes]],
    ending: str,
    buffer_size: int,
    data: st.DataObject,
) -> None:
    stream = b"".join(frame(t, p) for t, p in frames)
    max_payload = MAX_PAYLOAD
    if ending == "truncated" and stream:
        stream = stream[: data.draw(st.integers(0, len(stream) - 1))]
    elif ending == "oversized":
        max_payload = data.draw(st.integers(0, 3000))
        stream += struct.pack("<BI", 7, max_payload + 1)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    pieces = _split(stream, points, data.draw(piece_kinds))
    python_trace = _feed_trace(_core.python_core, pieces, max_payload, buffer_size)
    cython_trace = _feed_trace(cython_frame_core, pieces, max_payload, buffer_size)
    assert cython_trace == python_trace
    if ending == "clean":
        decoded = [f for result, _, _ in python_trace[:-1] for f in result]
        assert decoded == frames
        assert python_trace[-1] == ("eof", 0, True)


@settings(max_examples=300, deadline=None)
@given(
    stream=st.binary(max_size=600),
    max_payload=st.sampled_from([0, 5, 100, 1000, MAX_PAYLOAD]),
    buffer_size=buffer_sizes,
    data=st.data(),
)
def test_cores_agree_on_arbitrary_bytes(
    cython_frame_core: ModuleType,
    stream: bytes,
    max_payload: int,
    buffer_size: int,
    data: st.DataObject,
) -> None:
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    pieces = _split(stream, points, [bytes])
    python_trace = _feed_trace(_core.python_core, pieces, max_payload, buffer_size)
    cython_trace = _feed_trace(cython_frame_core, pieces, max_payload, buffer_size)
    assert cython_trace == python_trace


def _read_trace(
    core: ModuleType, pieces: list[bytes], budgets: list[int], buffer_size: int
) -> list[Any]:
    """Send each piece over a socket pair, then read_fd with a budget."""
    local, peer = socket.socketpair()
    local.setblocking(False)
    decoder = core.FrameDecoder(buffer_size=buffer_size)
    trace: list[Any] = []
    try:
        for index, piece in enumerate([*pieces, b""]):
            if piece:
                peer.sendall(piece)
            else:
                peer.shutdown(socket.SHUT_WR)
            budget = budgets[index % len(budgets)]
            try:
                result: Any = decoder.read_fd(local.fileno(), budget)
            except ProtocolError as exc:
                result = _outcome(exc)
            trace.append((result, decoder.buffered, decoder.at_eof))
    finally:
        local.close()
        peer.close()
    return trace


@settings(max_examples=100, deadline=None)
@given(
    frames=frame_lists,
    budgets=st.lists(st.integers(1, 5000), min_size=1, max_size=5),
    buffer_size=buffer_sizes,
    data=st.data(),
)
def test_cores_agree_on_read_fd(
    cython_frame_core: ModuleType,
    frames: list[tuple[int, bytes]],
    budgets: list[int],
    buffer_size: int,
    data: st.DataObject,
) -> None:
    stream = b"".join(frame(t, p) for t, p in frames)
    points = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    pieces = [bytes(p) for p in _split(stream, points, [bytes]) if p]
    python_trace = _read_trace(_core.python_core, pieces, budgets, buffer_size)
    cython_trace = _read_trace(cython_frame_core, pieces, budgets, buffer_size)
    assert cython_trace == python_trace


writer_operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("frame"),
            st.integers(0, 255),
            st.integers(0, 300),
            st.sampled_from([bytes, bytearray, memoryview]),
        ),
        st.tuples(st.just("raw"), st.integers(0, 50)),
        st.tuples(st.just("send")),
    ),
    max_size=30,
)


def _writer_trace(
    core: ModuleType, operations: list[tuple[Any, ...]], coalesce_limit: int
) -> list[Any]:
    writer = core.FrameWriter(coalesce_limit=coalesce_limit)
    trace: list[Any] = []
    for index, operation in enumerate([*operations, ("send",)]):
        if operation[0] == "frame":
            _, frame_type, size, kind = operation
            writer.write(frame_type, kind(pattern(size, seed=index)))
        elif operation[0] == "raw":
            writer.write_raw(pattern(operation[1], seed=index))
        else:
            trace.append(writer.data_to_send())
        trace.append(writer.pending)
    return trace


@settings(max_examples=200, deadline=None)
@given(
    operations=writer_operations,
    coalesce_limit=st.sampled_from([0, 1, 16, 100, 64 * KIB]),
)
def test_cores_agree_on_writes(
    cython_frame_core: ModuleType,
    operations: list[tuple[Any, ...]],
    coalesce_limit: int,
) -> None:
    python_trace = _writer_trace(_core.python_core, operations, coalesce_limit)
    cython_trace = _writer_trace(cython_frame_core, operations, coalesce_limit)
    assert cython_trace == python_trace
    expected = bytearray()
    for index, operation in enumerate(operations):
        if operation[0] == "frame":
            expected += frame(operation[1], pattern(operation[2], seed=index))
        elif operation[0] == "raw":
            expected += pattern(operation[1], seed=index)
    sent = b"".join(item for item in python_trace if isinstance(item, bytes))
    assert sent == expected


ARGUMENT_ERRORS: dict[str, Callable[[ModuleType], object]] = {
    "decoder max_payload": lambda core: core.FrameDecoder(max_payload=-5),
    "decoder buffer_size": lambda core: core.FrameDecoder(buffer_size=1),
    "writer max_payload": lambda core: core.FrameWriter(max_payload=MAX_PAYLOAD + 1),
    "writer coalesce_limit": lambda core: core.FrameWriter(coalesce_limit=-2),
    "frame type float": lambda core: core.encode_frame(1.0, b""),
    "frame type range": lambda core: core.encode_frame(300, b""),
    "payload str": lambda core: core.encode_frame(1, "text"),
    "payload strided": lambda core: core.encode_frame(1, memoryview(b"abcd")[::2]),
    "feed str": lambda core: core.FrameDecoder().feed("text"),
    "write str": lambda core: core.FrameWriter().write(1, "text"),
    "write_raw str": lambda core: core.FrameWriter().write_raw("text"),
}


@pytest.mark.parametrize("case", sorted(ARGUMENT_ERRORS))
def test_cores_agree_on_argument_errors(
    cython_frame_core: ModuleType, case: str
) -> None:
    call = ARGUMENT_ERRORS[case]
    with pytest.raises(Exception) as python_error:
        call(_core.python_core)
    with pytest.raises(Exception) as cython_error:
        call(cython_frame_core)
    assert type(cython_error.value) is type(python_error.value)
    assert str(cython_error.value) == str(python_error.value)
