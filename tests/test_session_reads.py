"""How SessionCore reads a socket that keeps delivering data."""

from __future__ import annotations

import socket
import struct

import pytest

import fcvsock
from fcvsock.errors import SessionProtocolError
from fcvsock.handshake import Handshake
from fcvsock.protocol import FrameType
from fcvsock.session import (
    MAX_FRAMES_PER_EVENT,
    MAX_READS_PER_EVENT,
    READ_BUDGET,
    SessionCore,
)


def _frame(frame_type: int, payload: bytes) -> bytes:
    return struct.pack("<BI", frame_type, len(payload)) + payload


def _core_with_guest_bytes(data: bytes) -> tuple[SessionCore, socket.socket]:
    host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 20)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
    guest.sendall(data)
    host.setblocking(False)
    return SessionCore(Handshake(host, 1, b"", 1), collect=True), guest


def test_on_readable_stops_after_read_cap() -> None:
    chunk = _frame(FrameType.STDOUT, b"x" * 4096)
    total = (MAX_READS_PER_EVENT + 2) * READ_BUDGET
    core, guest = _core_with_guest_bytes(chunk * (total // len(chunk)))
    try:
        core.on_readable()
        received = sum(len(part) for part in core.stdout_parts)
        assert 0 < received <= MAX_READS_PER_EVENT * READ_BUDGET
        assert not core.finished
    finally:
        core.close()
        guest.close()


def test_error_behind_capped_reads_is_reported() -> None:
    # The bad header ends inside the last capped read, so the decoder defers
    # it behind that read's frames, and no later readable event would
    # reveal it because the guest sends nothing more.
    chunk = _frame(FrameType.STDOUT, b"x" * (READ_BUDGET // 4 - 5))
    last = _frame(FrameType.STDOUT, b"y" * (READ_BUDGET // 4 - 5 - 8))
    good = chunk * (4 * MAX_READS_PER_EVENT - 1) + last
    oversize = struct.pack("<BI", FrameType.STDOUT, (16 << 20) + 1)
    core, guest = _core_with_guest_bytes(good + oversize)
    try:
        core.on_readable()
        assert core.failure is not None
        assert isinstance(core.error(), SessionProtocolError)
    finally:
        core.close()
        guest.close()


def test_on_readable_stops_after_frame_cap() -> None:
    # Tiny frames: one read already passes MAX_FRAMES_PER_EVENT, so no second
    # read happens in the same event.
    tiny = _frame(FrameType.STDOUT, b"x")
    count = 4 * READ_BUDGET // len(tiny)
    core, guest = _core_with_guest_bytes(tiny * count)
    try:
        core.on_readable()
        delivered = sum(len(part) for part in core.stdout_parts)
        assert MAX_FRAMES_PER_EVENT <= delivered <= READ_BUDGET // len(tiny) + 1
    finally:
        core.close()
        guest.close()


def test_max_frame_rejects_larger_frame() -> None:
    big = _frame(FrameType.STDOUT, b"x" * 2048)
    host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.sendall(_frame(FrameType.STDOUT, b"ok") + big)
    host.setblocking(False)
    core = SessionCore(Handshake(host, 1, b"", 1), collect=True, max_frame=1024)
    try:
        core.on_readable()
        assert core.stdout_parts == [b"ok"]
        assert isinstance(core.error(), SessionProtocolError)
        assert "2048" in str(core.error())
    finally:
        core.close()
        guest.close()


@pytest.mark.parametrize("max_frame", [0, -1, (16 << 20) + 1])
def test_max_frame_out_of_range(max_frame: int) -> None:
    with pytest.raises(ValueError, match="max_frame"):
        fcvsock.stream("/nonexistent.sock", ["true"], max_frame=max_frame)


def test_max_frame_wrong_type() -> None:
    with pytest.raises(TypeError, match="max_frame"):
        fcvsock.stream("/nonexistent.sock", ["true"], max_frame=1.5)  # type: ignore[arg-type]


def test_exit_signal_outside_linux_range_dropped() -> None:
    from fcvsock.protocol import decode_exit, encode_exit

    assert decode_exit(encode_exit(1, 65)) == (1, None)
    assert decode_exit(encode_exit(1, -5)) == (1, None)
    assert decode_exit(encode_exit(137, 9)) == (137, 9)


def test_result_with_signal_is_not_ok() -> None:
    from fcvsock import CommandFailedError, RunResult

    result = RunResult(0, 9, b"", b"")
    assert not result.ok
    with pytest.raises(CommandFailedError, match="signal 9"):
        result.check()
