"""The hybrid-vsock handshake against a scripted VMM socket.

Every test runs with the blocking connect, the asyncio connect on the
default loop and the asyncio connect on uvloop.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scripted_peer import (
    HOST_PORT,
    OK_REPLY,
    WAIT,
    Peers,
    open_sockets,
    read_line,
    run_in_loop,
    stdout_frame,
    wait_drained,
    wait_until_eof,
    watch_retries,
)

from fcvsock import (
    ConnectFailedError,
    FcvsockError,
    Handshake,
    HandshakeError,
    HandshakeTimeoutError,
    ProtocolError,
)
from fcvsock.handshake import connect_async, connect_blocking

Connect = Callable[..., Handshake]


@pytest.fixture
def uds_path() -> Iterator[str]:
    # pytest's tmp_path can exceed the 108-byte limit of sun_path.
    with tempfile.TemporaryDirectory(prefix="fcv") as directory:
        yield os.path.join(directory, "v.sock")


@pytest.fixture
def peers(uds_path: str) -> Iterator[Peers]:
    started = Peers(uds_path)
    yield started
    started.close()


@pytest.fixture(params=["blocking", "asyncio", "uvloop"])
def connect(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """``connect(path, port=52, timeout=...)`` for one API; closes what it opened."""
    opened: list[Handshake] = []

    def call(path: str, port: int = 52, timeout: float = WAIT) -> Handshake:
        if request.param == "blocking":
            handshake = connect_blocking(path, port, timeout)
        else:
            handshake = run_in_loop(
                request.param, connect_async(path, port, timeout)
            )
        opened.append(handshake)
        return handshake

    yield call
    for handshake in opened:
        handshake.sock.close()


def reply_with(*chunks: bytes) -> Callable[[socket.socket], None]:
    """A handler that reads the CONNECT line and sends ``chunks``."""

    def handler(conn: socket.socket) -> None:
        read_line(conn)
        for chunk in chunks:
            conn.sendall(chunk)
        wait_until_eof(conn)

    return handler


def test_connect_line_is_one_write(connect: Connect, peers: Peers) -> None:
    first_reads: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        first_reads.append(conn.recv(64))
        conn.sendall(OK_REPLY)
        wait_until_eof(conn)

    peers.start(handler)
    connect(peers.path)
    assert first_reads == [b"CONNECT 52\n"]


def test_connect_line_names_port(connect: Connect, peers: Peers) -> None:
    lines: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        lines.append(read_line(conn))
        conn.sendall(OK_REPLY)
        wait_until_eof(conn)

    peers.start(handler)
    connect(peers.path, port=4294967295)
    assert lines == [b"CONNECT 4294967295\n"]


def test_handshake_result(connect: Connect, peers: Peers) -> None:
    peers.start(reply_with(OK_REPLY))
    handshake = connect(peers.path)
    assert handshake.host_port == HOST_PORT
    assert handshake.initial_data == b""
    assert handshake.attempts == 1
    assert not handshake.sock.getblocking()


def test_host_port_is_opaque(connect: Connect, peers: Peers) -> None:
    peers.start(reply_with(b"OK 52\n"))
    assert connect(peers.path).host_port == 52


@pytest.mark.parametrize("split", [1, 2, 3, 5, 13])
def test_reply_split_across_writes(
    connect: Connect, peers: Peers, split: int
) -> None:
    def handler(conn: socket.socket) -> None:
        read_line(conn)
        conn.sendall(OK_REPLY[:split])
        wait_drained(conn)
        conn.sendall(OK_REPLY[split:])
        wait_until_eof(conn)

    peers.start(handler)
    handshake = connect(peers.path)
    assert handshake.host_port == HOST_PORT
    assert handshake.initial_data == b""


def test_reply_in_single_bytes(connect: Connect, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        read_line(conn)
        for byte in OK_REPLY:
            conn.sendall(bytes([byte]))
            wait_drained(conn)
        wait_until_eof(conn)

    peers.start(handler)
    assert connect(peers.path).host_port == HOST_PORT


def test_reply_with_first_frame(connect: Connect, peers: Peers) -> None:
    first_frame = stdout_frame(b"hello\n")
    peers.start(reply_with(OK_REPLY + first_frame))
    handshake = connect(peers.path)
    assert handshake.initial_data == first_frame


def test_reply_data_and_eof(connect: Connect, peers: Peers) -> None:
    first_frame = stdout_frame(b"bye\n")

    def handler(conn: socket.socket) -> None:
        read_line(conn)
        conn.sendall(OK_REPLY + first_frame)

    peers.start(handler)
    handshake = connect(peers.path)
    assert handshake.initial_data == first_frame
    handshake.sock.setblocking(True)
    handshake.sock.settimeout(WAIT)
    assert handshake.sock.recv(64) == b""


def test_eof_before_reply_retried(connect: Connect, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        read_line(conn)
        if peer.connections <= 3:
            return
        conn.sendall(OK_REPLY)
        wait_until_eof(conn)

    peer = peers.start(handler)
    handshake = connect(peers.path)
    assert handshake.attempts == 4
    assert peer.connections == 4


def test_eof_after_partial_reply_retried(connect: Connect, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        read_line(conn)
        if peer.connections == 1:
            conn.sendall(b"OK 10")
            return
        conn.sendall(OK_REPLY)
        wait_until_eof(conn)

    peer = peers.start(handler)
    assert connect(peers.path).attempts == 2


def test_silence_until_deadline(connect: Connect, peers: Peers) -> None:
    peers.start(reply_with())
    with pytest.raises(HandshakeTimeoutError) as caught:
        connect(peers.path, timeout=0.3)
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert isinstance(error, FcvsockError)
    assert error.attempts >= 1
    assert isinstance(error.last_error, TimeoutError)
    assert error.__cause__ is error.last_error


def test_eof_until_deadline(connect: Connect, peers: Peers) -> None:
    peers.start(read_line)
    with pytest.raises(HandshakeTimeoutError) as caught:
        connect(peers.path, timeout=0.3)
    assert caught.value.attempts > 1


GARBAGE_REPLIES = [
    b"ERR\n",
    b"HTTP/1.1 400 Bad Request\r\n",
    b"OK\n",
    b"OK \n",
    b"OK 12x\n",
    b"OK 1\r\n",
    b"ok 1\n",
    b"OK  1\n",
    b"OK 4294967296\n",
    b"A" * 64,
    b"OK " + b"1" * 61,
]


@pytest.mark.parametrize("reply", GARBAGE_REPLIES)
def test_garbage_reply_rejected(
    connect: Connect, peers: Peers, reply: bytes
) -> None:
    peer = peers.start(reply_with(reply))
    with pytest.raises(HandshakeError) as caught:
        connect(peers.path)
    assert isinstance(caught.value, ProtocolError)
    assert isinstance(caught.value, ValueError)
    assert caught.value.reply
    assert reply.startswith(caught.value.reply)
    peer.wait_served(1)
    assert peer.connections == 1


def test_partial_garbage_rejected_at_once(connect: Connect, peers: Peers) -> None:
    peer = peers.start(reply_with(b"SSH-2.0-"))
    with pytest.raises(HandshakeError) as caught:
        connect(peers.path, timeout=60.0)
    assert caught.value.reply == b"SSH-2.0-"
    assert peer.connections == 1


def test_garbage_then_eof_rejected(connect: Connect, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        read_line(conn)
        conn.sendall(b"ERR")

    peer = peers.start(handler)
    with pytest.raises(HandshakeError):
        connect(peers.path)
    assert peer.connections == 1


def test_missing_path_then_created(connect: Connect, peers: Peers) -> None:
    outcome: list[Any] = []

    with watch_retries() as watcher:
        thread = threading.Thread(
            target=lambda: outcome.append(_capture(connect, peers.path))
        )
        thread.start()
        try:
            assert watcher.retried.wait(WAIT)
        finally:
            peers.start(reply_with(OK_REPLY))
            thread.join(WAIT)
    [handshake] = outcome
    assert isinstance(handshake, Handshake)
    assert handshake.attempts > 1


def test_stale_socket_retried(connect: Connect, peers: Peers) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(peers.path)
    stale.close()
    outcome: list[Any] = []

    with watch_retries() as watcher:
        thread = threading.Thread(
            target=lambda: outcome.append(_capture(connect, peers.path))
        )
        thread.start()
        try:
            assert watcher.retried.wait(WAIT)
        finally:
            os.unlink(peers.path)
            peers.start(reply_with(OK_REPLY))
            thread.join(WAIT)
    [handshake] = outcome
    assert isinstance(handshake, Handshake)
    assert handshake.attempts > 1


def test_stale_socket_until_deadline(connect: Connect, uds_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(uds_path)
    stale.close()
    with pytest.raises(HandshakeTimeoutError) as caught:
        connect(uds_path, timeout=0.2)
    assert caught.value.attempts > 1
    assert isinstance(caught.value.last_error, ConnectionRefusedError)


def test_missing_path_until_deadline(connect: Connect, uds_path: str) -> None:
    with pytest.raises(HandshakeTimeoutError) as caught:
        connect(uds_path, timeout=0.2)
    assert caught.value.attempts > 1
    assert isinstance(caught.value.last_error, FileNotFoundError)
    assert uds_path in str(caught.value)


@pytest.mark.parametrize("port", [-1, 2**32])
def test_port_out_of_range(connect: Connect, peers: Peers, port: int) -> None:
    peer = peers.start(reply_with(OK_REPLY))
    with pytest.raises(ValueError, match="guest port"):
        connect(peers.path, port=port)
    assert peer.connections == 0


@pytest.mark.parametrize("port", ["52", 52.0, True, None])
def test_port_wrong_type(connect: Connect, peers: Peers, port: object) -> None:
    peer = peers.start(reply_with(OK_REPLY))
    with pytest.raises(TypeError, match="guest port"):
        connect(peers.path, port=port)
    assert peer.connections == 0


def test_negative_timeout_rejected(connect: Connect, peers: Peers) -> None:
    peer = peers.start(reply_with(OK_REPLY))
    with pytest.raises(ValueError, match="timeout"):
        connect(peers.path, timeout=-1.0)
    assert peer.connections == 0


def test_regular_file_not_retried(connect: Connect, uds_path: str) -> None:
    with open(uds_path, "w"):
        pass
    with pytest.raises(ConnectFailedError) as caught:
        connect(uds_path, timeout=WAIT)
    assert isinstance(caught.value, ConnectionError)
    assert caught.value.attempts == 1
    assert isinstance(caught.value.__cause__, OSError)
    assert "not a socket" in str(caught.value)


def test_directory_not_retried(connect: Connect, uds_path: str) -> None:
    os.mkdir(uds_path)
    with pytest.raises(ConnectFailedError) as caught:
        connect(uds_path, timeout=WAIT)
    assert caught.value.attempts == 1


def test_path_below_file_not_retried(connect: Connect, uds_path: str) -> None:
    with open(uds_path, "w"):
        pass
    with pytest.raises(ConnectFailedError) as caught:
        connect(os.path.join(uds_path, "v.sock"), timeout=WAIT)
    assert isinstance(caught.value.__cause__, NotADirectoryError)


def test_path_too_long_not_retried(connect: Connect, uds_path: str) -> None:
    long_path = os.path.join(os.path.dirname(uds_path), "v" * 200)
    with pytest.raises(ConnectFailedError) as caught:
        connect(long_path, timeout=WAIT)
    assert caught.value.attempts == 1
    assert "too long" in str(caught.value)


def _failing_paths(kind: str, peers: Peers) -> tuple[str, float]:
    """Set up a path where every attempt fails; return it with a timeout."""
    if kind == "stale":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(peers.path)
        stale.close()
    elif kind == "eof":
        peers.start(read_line)
    elif kind == "silence":
        peers.start(reply_with())
    elif kind == "garbage":
        peers.start(reply_with(b"ERR\n"))
    elif kind == "file":
        with open(peers.path, "w"):
            pass
    return peers.path, 0.2


@pytest.mark.parametrize(
    "kind", ["missing", "stale", "eof", "silence", "garbage", "file"]
)
def test_failed_attempts_close_sockets(
    connect: Connect, peers: Peers, kind: str
) -> None:
    before = open_sockets()
    path, timeout = _failing_paths(kind, peers)
    with pytest.raises(FcvsockError):
        connect(path, timeout=timeout)
    peers.close()
    if os.path.exists(path):
        os.unlink(path)
    assert open_sockets() == before


def _capture(connect: Connect, path: str) -> Any:
    try:
        return connect(path)
    except BaseException as exc:  # noqa: BLE001 - checked by the test
        return exc
