"""The stand-in VM, seen from the host through raw blocking Unix sockets."""

from __future__ import annotations

import errno
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
from localvm_peers import (
    TIMEOUT,
    GuestService,
    child_pids,
    connect_host,
    end_of_stream,
    handshake,
    open_fd_count,
    process_exited,
    read_line,
    read_session,
    read_to_eof,
    start_frames,
    wait_for,
    wait_queued,
)
from scripted_peer import watch_retries

import fcvsock
from fcvsock._core import FrameDecoder, encode_frame
from fcvsock.errors import HandshakeTimeoutError
from fcvsock.localvm import GARBAGE_REPLIES, LocalVM, LocalVMError, Reply, main
from fcvsock.muxer import (
    FIRST_HOST_PORT,
    NEED_MORE,
    firecracker_line_length,
    parse_cloud_hypervisor,
    parse_firecracker_line,
)
from fcvsock.protocol import FrameType, decode_exit, encode_clock_sync

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
GUEST_PORT = 1000
FIRST_REPLY = b"OK %d\n" % FIRST_HOST_PORT


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Short paths: AF_UNIX paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="lvm-") as path:
        yield path


@pytest.fixture
def guest(sock_dir: str) -> Iterator[GuestService]:
    service = GuestService(os.path.join(sock_dir, "guest.sock"))
    yield service
    service.close()


def make_vm(sock_dir: str, guest: GuestService, **options: object) -> LocalVM:
    vm = LocalVM(os.path.join(sock_dir, "vm.sock"), agent=False, **options)  # type: ignore[arg-type]
    vm.listen(GUEST_PORT, guest.path)
    return vm.start()


@pytest.fixture
def vm(sock_dir: str, guest: GuestService) -> Iterator[LocalVM]:
    with make_vm(sock_dir, guest) as machine:
        yield machine


@pytest.fixture
def ch_vm(sock_dir: str, guest: GuestService) -> Iterator[LocalVM]:
    with make_vm(sock_dir, guest, parser="cloud-hypervisor") as machine:
        yield machine


@pytest.fixture(scope="module")
def agent_vm() -> Iterator[LocalVM]:
    with (
        tempfile.TemporaryDirectory(prefix="lvm-") as path,
        LocalVM(os.path.join(path, "vm.sock")) as machine,
    ):
        yield machine


@pytest.fixture
def agent(agent_vm: LocalVM) -> Iterator[LocalVM]:
    yield agent_vm
    agent_vm.faults.reset()
    agent_vm.agent_data_path = "handoff"


def connect_guest(
    vm: LocalVM, guest: GuestService, command: bytes = b"CONNECT 1000\n"
) -> tuple[socket.socket, socket.socket, bytes]:
    host, reply = handshake(vm.uds_path, command)
    return host, guest.accept(), reply


# Parsers, as pure functions.


@pytest.mark.parametrize(
    ("command", "port"),
    [
        (b"CONNECT 52\n", 52),
        (b"connect 52\n", 52),
        (b"CoNnEcT 52\n", 52),
        (b"CONNECT +052\n", 52),
        (b"CONNECT +052 extra\n", 52),
        (b"CONNECT\t52\n", 52),
        (b"  CONNECT 52\n", 52),
        (b"CONNECT 4294967295\n", 4294967295),
        (b"connect 0\n", 0),
        (b"CONNECT 52" + b" " * 22, 52),
    ],
)
def test_firecracker_accepts(command: bytes, port: int) -> None:
    length = firecracker_line_length(command)
    assert length is not None
    assert parse_firecracker_line(command[:length]) == port


@pytest.mark.parametrize(
    "command",
    [
        b"CONNECT 52",
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        b"CONNECT 4294967296\n",
        b"CONNECT -1\n",
        b"CONNECT +\n",
        b"CONNECT 5_2\n",
        b"CONNECT \xd9\xa52\n",
        b"HELLO 52\n",
        b"CONNECTX 52\n",
        b"CONNECT 52" + b" " * 21,
    ],
)
def test_firecracker_rejects(command: bytes) -> None:
    length = firecracker_line_length(command)
    assert length is None or parse_firecracker_line(command[:length]) is None


def test_firecracker_line_stops_at_newline() -> None:
    assert firecracker_line_length(b"CONNECT 52\nSTART") == 11


def test_firecracker_line_ignores_early_newline() -> None:
    # Firecracker reads 10 bytes before it looks for LF.
    assert firecracker_line_length(b"C\nONNECT 52\nxx") == 12


@pytest.mark.parametrize(
    ("command", "port"),
    [
        (b"connect 52\n", 52),
        (b"CONNECT 52\n", 52),
        (b"CONNECT +052\n", 52),
        (b"connect  52 \n", 52),
        (b"CONNECT" + b" " * 23 + b"1\n", 1),
    ],
)
def test_cloud_hypervisor_accepts(command: bytes, port: int) -> None:
    assert parse_cloud_hypervisor(command) == port


@pytest.mark.parametrize(
    "command",
    [
        b"CONNECT +052 extra\n",
        b"CONNECT\t52\n",
        b"  CONNECT 52\n",
        b"CONNECT 99999999999\n",
        b"connect -1\n",
        b"connect \n",
        b"CONN\n",
        b"CONNECT" + b" " * 24 + b"1",
    ],
)
def test_cloud_hypervisor_rejects(command: bytes) -> None:
    assert parse_cloud_hypervisor(command) is None


@pytest.mark.parametrize("command", [b"", b"CONN", b"connect ", b"CONNECT 52"])
def test_cloud_hypervisor_waits(command: bytes) -> None:
    assert parse_cloud_hypervisor(command) == NEED_MORE


# Handshake through the socket.


@pytest.mark.parametrize(
    "command", [b"CONNECT 1000\n", b"connect 1000\n", b"CONNECT +01000 extra\n"]
)
def test_firecracker_socket_accepts(
    vm: LocalVM, guest: GuestService, command: bytes
) -> None:
    host, _, reply = connect_guest(vm, guest, command)
    with host:
        assert reply == FIRST_REPLY


@pytest.mark.parametrize(
    "command",
    [
        b"CONNECT 1000",
        b"CONNECT 99999999999\n",
        b"CONNECT\n",
        b"GET /\n",
        b"CONNECT 1000" + b" " * 19,
    ],
)
def test_firecracker_socket_rejects(vm: LocalVM, command: bytes) -> None:
    with connect_host(vm.uds_path) as host:
        host.sendall(command)
        # Firecracker has read every byte it looked at, so no ECONNRESET.
        assert end_of_stream(host) == "eof"


def test_firecracker_reject_leaves_rest(vm: LocalVM) -> None:
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT x\npipelined")
        assert end_of_stream(host) == "reset"


def test_firecracker_parses_full_buffer(vm: LocalVM, guest: GuestService) -> None:
    # 32 bytes without LF: Firecracker parses what it has and keeps the rest.
    command = b"CONNECT 1000".ljust(32) + b"data"
    host, service, reply = connect_guest(vm, guest, command)
    with host:
        assert reply == FIRST_REPLY
        assert service.recv(64) == b"data"


def test_firecracker_rejects_split_line(vm: LocalVM) -> None:
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONN")
        assert host.recv(64) == b""


@pytest.mark.parametrize("command", [b"CONNECT 1000\n", b"connect +1000\n"])
def test_cloud_hypervisor_socket_accepts(
    ch_vm: LocalVM, guest: GuestService, command: bytes
) -> None:
    host, _, reply = connect_guest(ch_vm, guest, command)
    with host:
        assert reply == FIRST_REPLY


@pytest.mark.parametrize(
    ("command", "end"),
    [
        (b"CONNECT +1000 extra\n", "eof"),
        (b"CONNECT 99999999999\n", "eof"),
        # Cloud Hypervisor rejects the prefix after 10 bytes, leaving 3 unread.
        (b"CONNECT\t1000\n", "reset"),
    ],
)
def test_cloud_hypervisor_socket_rejects(
    ch_vm: LocalVM, command: bytes, end: str
) -> None:
    with connect_host(ch_vm.uds_path) as host:
        host.sendall(command)
        assert end_of_stream(host) == end


def test_cloud_hypervisor_joins_split_line(ch_vm: LocalVM, guest: GuestService) -> None:
    with connect_host(ch_vm.uds_path) as host:
        host.sendall(b"CONN")
        host.sendall(b"ECT 1000")
        host.sendall(b"\n")
        assert read_line(host) == FIRST_REPLY
        guest.accept()


def test_host_ports_count_up(vm: LocalVM, guest: GuestService) -> None:
    replies = []
    for _ in range(3):
        host, _, reply = connect_guest(vm, guest)
        replies.append(reply)
        host.close()
    expected = [FIRST_HOST_PORT, FIRST_HOST_PORT + 1, FIRST_HOST_PORT + 2]
    assert replies == [b"OK %d\n" % port for port in expected]
    assert vm.host_ports_assigned == expected


def test_host_ports_restart_per_vm(sock_dir: str, guest: GuestService) -> None:
    with make_vm(sock_dir, guest) as first:
        connect_guest(first, guest)[0].close()
    with make_vm(sock_dir, guest) as second:
        host, _, reply = connect_guest(second, guest)
        host.close()
    assert reply == FIRST_REPLY


def test_port_without_listener_closes(vm: LocalVM) -> None:
    host, reply = handshake(vm.uds_path, b"CONNECT 7\n")
    with host:
        assert reply == b""


@pytest.mark.parametrize("parser", ["firecracker", "cloud-hypervisor"])
def test_pipelined_bytes_reach_guest(
    sock_dir: str, guest: GuestService, parser: str
) -> None:
    with make_vm(sock_dir, guest, parser=parser) as machine:
        host, reply = handshake(machine.uds_path, b"CONNECT 1000\nearly bytes")
        with host:
            assert reply == FIRST_REPLY
            assert guest.accept().recv(64) == b"early bytes"


# Reply shapes.


def test_reply_whole(vm: LocalVM, guest: GuestService) -> None:
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        assert host.recv(64) == FIRST_REPLY


def test_reply_split(vm: LocalVM, guest: GuestService) -> None:
    vm.faults.reply = Reply.SPLIT
    vm.faults.split_at = (2, 5)
    vm.faults.split_wait = TIMEOUT
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        pieces = [host.recv(64) for _ in range(3)]
    assert pieces == [FIRST_REPLY[:2], FIRST_REPLY[2:5], FIRST_REPLY[5:]]


def test_reply_with_data(vm: LocalVM, guest: GuestService) -> None:
    vm.faults.reply = Reply.WITH_DATA
    vm.faults.first_data_wait = TIMEOUT
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        guest.accept().sendall(b"banner\n")
        assert host.recv(64) == FIRST_REPLY + b"banner\n"


def test_reply_with_data_eof(vm: LocalVM, guest: GuestService) -> None:
    vm.faults.reply = Reply.WITH_DATA_EOF
    vm.faults.first_data_wait = TIMEOUT
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        service = guest.accept()
        service.sendall(b"bye\n")
        service.close()
        assert host.recv(64) == FIRST_REPLY + b"bye\n"
        assert host.recv(64) == b""


@pytest.mark.parametrize("name", sorted(GARBAGE_REPLIES))
def test_garbage_reply(vm: LocalVM, name: str) -> None:
    vm.faults.garbage_reply = GARBAGE_REPLIES[name]
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        wait_queued(host, len(GARBAGE_REPLIES[name]))
        host.settimeout(0.2)
        received = b""
        with pytest.raises(TimeoutError):
            while True:
                received += host.recv(128)
    assert received == GARBAGE_REPLIES[name]


def test_garbage_reply_then_close(vm: LocalVM) -> None:
    vm.faults.garbage_reply = b"ERR\n"
    vm.faults.close_after_garbage = True
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        assert read_to_eof(host) == b"ERR\n"


def test_silent_after_command(vm: LocalVM) -> None:
    vm.faults.silent = True
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        wait_for(lambda: vm.connections == 1)
        host.settimeout(0.2)
        with pytest.raises(TimeoutError):
            host.recv(64)


# Listener availability and the connection cap.


def test_no_listener_gets_eof(vm: LocalVM) -> None:
    vm.no_listener_for(60, GUEST_PORT)
    host, reply = handshake(vm.uds_path, b"CONNECT 1000\n")
    with host:
        assert reply == b""


def test_no_listener_then_works(vm: LocalVM, guest: GuestService) -> None:
    vm.no_listener_for(0.2, GUEST_PORT)

    def attempt() -> bytes:
        host, reply = handshake(vm.uds_path, b"CONNECT 1000\n")
        host.close()
        return reply

    assert wait_for(attempt) == b"OK %d\n" % vm.host_ports_assigned[-1]


def test_connection_cap(sock_dir: str, guest: GuestService) -> None:
    with make_vm(sock_dir, guest, max_connections=2) as machine:
        first, _, _ = connect_guest(machine, guest)
        second, _, _ = connect_guest(machine, guest)
        with connect_host(machine.uds_path) as third:
            assert third.recv(64) == b""
        first.close()
        wait_for(lambda: machine.connections == 1)
        fourth, _, reply = connect_guest(machine, guest)
        assert reply == b"OK %d\n" % (FIRST_HOST_PORT + 2)
        second.close()
        fourth.close()


def test_socket_created_on_request(sock_dir: str) -> None:
    vm = LocalVM(os.path.join(sock_dir, "vm.sock"), agent=False)
    with vm.start(create_socket_after=None):
        with pytest.raises(FileNotFoundError):
            connect_host(vm.uds_path)
        vm.create_socket()
        connect_host(vm.uds_path).close()


def test_socket_created_after_delay(sock_dir: str) -> None:
    vm = LocalVM(os.path.join(sock_dir, "vm.sock"), agent=False)
    with vm.start(create_socket_after=0.1):
        wait_for(lambda: os.path.exists(vm.uds_path))
        connect_host(vm.uds_path).close()


def test_existing_path_rejected(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "vm.sock")
    open(path, "w").close()
    with pytest.raises(FileExistsError):
        LocalVM(path, agent=False).start()
    assert os.path.exists(path)


# Relayed data.


def test_relay_both_ways(vm: LocalVM, guest: GuestService) -> None:
    host, service, _ = connect_guest(vm, guest)
    with host:
        host.sendall(b"ping")
        assert service.recv(64) == b"ping"
        service.sendall(b"pong")
        assert host.recv(64) == b"pong"


def test_relay_guest_close_delivers_rest(vm: LocalVM, guest: GuestService) -> None:
    host, service, _ = connect_guest(vm, guest)
    with host:
        service.sendall(b"last words")
        service.close()
        assert read_to_eof(host) == b"last words"


def test_relay_host_shutdown_closes_both(vm: LocalVM, guest: GuestService) -> None:
    host, service, _ = connect_guest(vm, guest)
    with host:
        host.shutdown(socket.SHUT_WR)
        assert service.recv(64) == b""
        assert host.recv(64) == b""


def test_relay_bounds_buffering(vm: LocalVM, guest: GuestService) -> None:
    host, _, _ = connect_guest(vm, guest)
    with host:
        host.setblocking(False)
        sent = 0
        chunk = bytes(65536)
        with pytest.raises(BlockingIOError):
            while sent < 64 * 1024 * 1024:
                sent += host.send(chunk)
    # Kernel socket buffers plus the 64 KiB relay buffer, far below 64 MiB.
    assert sent < 8 * 1024 * 1024


def test_connections_counts_relays(vm: LocalVM, guest: GuestService) -> None:
    host, _, _ = connect_guest(vm, guest)
    assert vm.connections == 1
    host.close()
    wait_for(lambda: vm.connections == 0)


# Abrupt closes.


def test_abort_delivers_rest_then_eof(vm: LocalVM, guest: GuestService) -> None:
    host, service, _ = connect_guest(vm, guest)
    with host:
        service.sendall(b"partial")
        wait_queued(host, 7)
        assert vm.abort(GUEST_PORT) == 1
        assert read_to_eof(host) == b"partial"


def test_abort_with_unread_resets(vm: LocalVM, guest: GuestService) -> None:
    host, service, _ = connect_guest(vm, guest)
    with host:
        service.sendall(b"partial")
        wait_queued(host, 7)
        assert vm.abort(GUEST_PORT, unread_host_bytes=True) == 1
        host.sendall(b"never read")
        assert host.recv(64) == b"partial"
        with pytest.raises(ConnectionResetError):
            host.recv(64)


def test_abort_after_bytes(vm: LocalVM, guest: GuestService) -> None:
    vm.faults.abort_after_bytes = 4
    host, service, _ = connect_guest(vm, guest)
    with host:
        service.sendall(b"0123456789")
        assert read_to_eof(host) == b"0123"


def test_abort_after_bytes_with_unread(vm: LocalVM, guest: GuestService) -> None:
    vm.faults.abort_after_bytes = 4
    vm.faults.abort_with_unread = True
    host, service, _ = connect_guest(vm, guest)
    with host:
        service.sendall(b"0123456789")
        assert host.recv(64) == b"0123"
        host.sendall(b"stdin")
        with pytest.raises(ConnectionResetError):
            host.recv(64)


def test_write_after_abort_fails(vm: LocalVM, guest: GuestService) -> None:
    host, _, _ = connect_guest(vm, guest)
    with host:
        vm.abort()
        assert host.recv(64) == b""
        with pytest.raises(BrokenPipeError):
            host.sendall(b"x")


# Snapshot and restore.


def test_snapshot_silences_streams(vm: LocalVM, guest: GuestService) -> None:
    host, service, _ = connect_guest(vm, guest)
    with host:
        vm.snapshot()
        assert service.recv(64) == b""
        assert vm.connections == 0
        host.settimeout(0.2)
        with pytest.raises(TimeoutError):
            host.recv(64)
        host.settimeout(TIMEOUT)
        host.sendall(b"after snapshot")
        assert host.recv(64) == b""
        vm.restore()


def test_snapshot_before_reply(vm: LocalVM, guest: GuestService) -> None:
    vm.faults.reply = Reply.WITH_DATA
    vm.faults.first_data_wait = TIMEOUT
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        service = guest.accept()
        vm.snapshot()
        assert service.recv(64) == b""
        host.sendall(b"x")
        assert host.recv(64) == b""
    vm.restore()


def test_snapshot_holds_new_connects(vm: LocalVM, guest: GuestService) -> None:
    vm.snapshot()
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        host.settimeout(0.2)
        with pytest.raises(TimeoutError):
            host.recv(64)
        host.settimeout(TIMEOUT)
        vm.restore(hang=0.1)
        assert read_line(host) == FIRST_REPLY


def test_restore_hang_delays_connects(vm: LocalVM, guest: GuestService) -> None:
    vm.snapshot()
    vm.restore(hang=60)
    with connect_host(vm.uds_path) as host:
        host.sendall(b"CONNECT 1000\n")
        host.settimeout(0.2)
        with pytest.raises(TimeoutError):
            host.recv(64)


def test_snapshot_freezes_guest_clock(vm: LocalVM) -> None:
    taken = vm.snapshot()
    assert vm.guest_time_ns() == taken
    vm.restore()


def test_restore_sets_clock_back(vm: LocalVM) -> None:
    taken = vm.snapshot()
    before = time.monotonic_ns()
    vm.restore()
    guest_now = vm.guest_time_ns()
    elapsed = time.monotonic_ns() - before
    assert taken <= guest_now <= taken + elapsed


def test_restore_without_snapshot(vm: LocalVM) -> None:
    with pytest.raises(LocalVMError):
        vm.restore()


def test_guest_clock_starts_at_host_time(vm: LocalVM) -> None:
    before = time.time_ns()
    guest_now = vm.guest_time_ns()
    assert before <= guest_now <= time.time_ns()


# The agent on port 52.


def test_agent_runs_command(agent: LocalVM) -> None:
    host, reply = handshake(agent.uds_path, b"CONNECT 52\n")
    with host:
        assert reply.startswith(b"OK ")
        host.sendall(start_frames(["echo", "hello"]))
        frames = read_session(host)
    assert (FrameType.STDOUT, b"hello\n") in frames
    assert frames[-1][0] == FrameType.EXIT
    assert decode_exit(frames[-1][1]) == (0, None)


def test_agent_takes_pipelined_start(agent: LocalVM) -> None:
    command = b"CONNECT 52\n" + start_frames(["echo", "piped"])
    host, reply = handshake(agent.uds_path, command)
    with host:
        assert reply.startswith(b"OK ")
        frames = read_session(host)
    assert (FrameType.STDOUT, b"piped\n") in frames


def test_agent_reply_once_and_first(agent: LocalVM) -> None:
    with connect_host(agent.uds_path) as host:
        host.sendall(b"CONNECT 52\n" + start_frames(["echo", "after the reply"]))
        received = read_to_eof(host)
    reply = b"OK %d\n" % agent.host_ports_assigned[-1]
    decoder = FrameDecoder()
    frames = decoder.feed(received[len(reply) :])
    assert received[: len(reply)] == reply
    assert (FrameType.STDOUT, b"after the reply\n") in frames
    assert frames[-1][0] == FrameType.EXIT
    assert decoder.buffered == 0


def test_agent_reply_split(agent: LocalVM) -> None:
    agent.faults.reply = Reply.SPLIT
    agent.faults.split_at = (2, 5)
    agent.faults.split_wait = TIMEOUT
    with connect_host(agent.uds_path) as host:
        host.sendall(b"CONNECT 52\n")
        pieces = [host.recv(64) for _ in range(3)]
    reply = b"OK %d\n" % agent.host_ports_assigned[-1]
    assert pieces == [reply[:2], reply[2:5], reply[5:]]


def test_agent_relay_path(agent: LocalVM) -> None:
    agent.agent_data_path = "relay"
    host, reply = handshake(agent.uds_path, b"CONNECT 52\n")
    with host:
        assert reply.startswith(b"OK ")
        host.sendall(start_frames(["echo", "relayed"]))
        frames = read_session(host)
    assert (FrameType.STDOUT, b"relayed\n") in frames


def test_agent_reply_with_data(agent: LocalVM) -> None:
    agent.faults.reply = Reply.WITH_DATA
    agent.faults.first_data_wait = TIMEOUT
    with connect_host(agent.uds_path) as host:
        host.sendall(b"CONNECT 52\n" + start_frames(["echo", "together"]))
        first = host.recv(65536)
    line, _, frames = first.partition(b"\n")
    assert line.startswith(b"OK ")
    assert frames[:1] == bytes([FrameType.STDOUT])


def test_agent_clock_sync_sets_guest_time(agent: LocalVM) -> None:
    set_to = 10**18 + 5
    host, _ = handshake(agent.uds_path, b"CONNECT 52\n")
    with host:
        before = time.monotonic_ns()
        host.sendall(encode_frame(FrameType.CLOCK_SYNC, encode_clock_sync(10**9, 5)))
        frames = read_session(host)
    guest_now = agent.guest_time_ns()
    elapsed = time.monotonic_ns() - before
    assert decode_exit(frames[-1][1]) == (0, None)
    assert set_to <= guest_now <= set_to + elapsed


def test_agent_handoff_counted(agent: LocalVM) -> None:
    host, _ = handshake(agent.uds_path, b"CONNECT 52\n")
    wait_for(lambda: agent.connections == 1)
    host.close()
    wait_for(lambda: agent.connections == 0)


@pytest.fixture
def dying_agent_vm(sock_dir: str) -> Iterator[LocalVM]:
    command = [sys.executable, os.path.join(TESTS_DIR, "localvm_dying_agent.py")]
    with LocalVM(os.path.join(sock_dir, "vm.sock"), agent_command=command) as machine:
        yield machine


def test_agent_dying_at_handoff_no_reply(dying_agent_vm: LocalVM) -> None:
    # Firecracker writes OK only once the guest answered the connection
    # request (VSOCK_OP_RESPONSE in vsock/csm/connection.rs).
    host, reply = handshake(dying_agent_vm.uds_path, b"CONNECT 52\n")
    with host:
        assert reply == b""


def test_agent_dying_at_handoff_retried(dying_agent_vm: LocalVM) -> None:
    with watch_retries() as watcher, pytest.raises(HandshakeTimeoutError):
        fcvsock.run(dying_agent_vm.uds_path, ["true"], connect_timeout=0.3)
    assert watcher.retried.is_set()


def test_boot_delay_refuses_agent(sock_dir: str) -> None:
    with LocalVM(os.path.join(sock_dir, "vm.sock"), boot_delay=60) as machine:
        host, reply = handshake(machine.uds_path, b"CONNECT 52\n")
        with host:
            assert reply == b""


# Shutdown.


def test_close_cleans_up(sock_dir: str) -> None:
    fds_before = open_fd_count()
    vm = LocalVM(os.path.join(sock_dir, "vm.sock")).start()
    agent_pid = vm.agent_pid
    assert agent_pid is not None
    host, reply = handshake(vm.uds_path, b"CONNECT 52\n")
    assert reply.startswith(b"OK ")
    vm.close()
    host.close()
    assert not os.path.exists(vm.uds_path)
    assert agent_pid not in child_pids()
    with pytest.raises(ChildProcessError):
        os.waitpid(agent_pid, os.WNOHANG)
    assert open_fd_count() == fds_before


def run_unclosed_vm(sock_dir: str) -> subprocess.CompletedProcess[bytes]:
    """Start a VM in a Python process that exits without closing it.

    The process prints the agent's pid, and its temporary files go to
    ``sock_dir``.
    """
    script = (
        "import sys\n"
        "from fcvsock.localvm import LocalVM\n"
        "vm = LocalVM(sys.argv[1]).start()\n"
        "print(vm.agent_pid, flush=True)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, os.path.join(sock_dir, "vm.sock")],
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
        env=dict(os.environ, TMPDIR=sock_dir),
    )


def test_unclosed_vm_stops_agent_at_exit(sock_dir: str) -> None:
    result = run_unclosed_vm(sock_dir)
    agent_pid = int(result.stdout)
    with pytest.raises(ProcessLookupError):
        os.kill(agent_pid, 0)
    assert b"never closed" in result.stderr


def test_unclosed_vm_leaves_no_files(sock_dir: str) -> None:
    run_unclosed_vm(sock_dir)
    assert os.listdir(sock_dir) == []


def test_agent_exits_when_vm_process_killed(sock_dir: str) -> None:
    script = (
        "import signal, sys\n"
        "from fcvsock.localvm import LocalVM\n"
        "vm = LocalVM(sys.argv[1]).start()\n"
        "print(vm.agent_pid, flush=True)\n"
        "signal.pause()\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, os.path.join(sock_dir, "vm.sock")],
        stdout=subprocess.PIPE,
        env=dict(os.environ, TMPDIR=sock_dir),
    )
    try:
        assert process.stdout is not None
        agent_pid = int(process.stdout.readline())
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    try:
        wait_for(lambda: process_exited(agent_pid))
    finally:
        # An agent that outlived the test's process must not outlive the test.
        if not process_exited(agent_pid):
            os.kill(agent_pid, signal.SIGKILL)
    (state_dir,) = glob.glob(os.path.join(sock_dir, "fcvsock-localvm-*"))
    assert glob.glob(os.path.join(state_dir, "*.sock")) == []


def test_close_twice(vm: LocalVM) -> None:
    vm.close()
    vm.close()
    assert not os.path.exists(vm.uds_path)


@pytest.mark.parametrize(
    "stop_signal",
    [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
    ids=lambda number: signal.Signals(number).name,
)
def test_cli_stops_on_signal(sock_dir: str, stop_signal: signal.Signals) -> None:
    path = os.path.join(sock_dir, "cli.sock")
    process = subprocess.Popen(
        [sys.executable, "-m", "fcvsock.localvm", path, "--max-connections", "4"],
        stdout=subprocess.PIPE,
        env=dict(os.environ, TMPDIR=sock_dir),
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline().decode()
        assert path in banner
        host, reply = handshake(path, b"CONNECT 52\n")
        host.close()
        assert reply.startswith(b"OK ")
        agent_pid = int(banner.split("agent pid ")[1].split(")")[0])
        process.send_signal(stop_signal)
        assert process.wait(TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    assert os.listdir(sock_dir) == []
    with pytest.raises(ProcessLookupError):
        os.kill(agent_pid, 0)


def test_cli_rejects_existing_path(
    sock_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(sock_dir, "taken")
    open(path, "w").close()
    assert main([path]) == 1
    assert "already exists" in capsys.readouterr().err


def test_connect_after_close_fails(sock_dir: str, guest: GuestService) -> None:
    vm = make_vm(sock_dir, guest)
    vm.close()
    with pytest.raises(OSError) as raised:
        connect_host(vm.uds_path)
    assert raised.value.errno == errno.ENOENT
