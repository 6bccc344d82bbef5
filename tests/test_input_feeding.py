"""How run() hands caller input to the socket."""

from __future__ import annotations

import socket

from fcvsock._request import STDIN_CHUNK, InputFeeder
from fcvsock.handshake import Handshake
from fcvsock.session import SessionCore


def test_send_input_sends_eof_when_socket_takes_all() -> None:
    # Regression: after the last STDIN chunk flushed completely, EOF stayed
    # unsent and run() waited for output that only came after EOF.
    host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    guest.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    host.setblocking(False)
    core = SessionCore(Handshake(host, 1, b"", 1))
    feeder = InputFeeder(b"x" * (2 * STDIN_CHUNK))
    try:
        core.send_input(feeder)
        assert core.pending_writes == 0
        assert feeder.eof_sent
    finally:
        core.close()
        guest.close()
