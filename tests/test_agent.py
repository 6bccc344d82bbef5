"""The guest agent, driven with raw frames over Unix sockets.

Most tests share one agent process that listens on a Unix stream socket and
a handoff socket. Tests that need other settings start their own agent.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import pwd
import random
import signal
import socket
import struct
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_client import (
    AgentConnection,
    AgentProcess,
    child_pids,
    exit_payload,
    open_fd_count,
    pids_in_group,
    process_exists,
    resident_bytes,
    run,
    start_payload,
    wait_until,
)

from fcvsock._core import FrameDecoder, encode_frame
from fcvsock.agent import Agent, _clock_setter, main, resolve_user
from fcvsock.clock import SystemClock, VirtualClock
from fcvsock.protocol import (
    MAX_OUTPUT_CHUNK,
    MAX_PAYLOAD,
    FrameType,
    decode_exit,
    encode_clock_sync,
    encode_resize,
    encode_signal,
)

PYTHON = sys.executable
requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    # pytest's tmp_path can exceed the 108-byte limit of sun_path.
    with tempfile.TemporaryDirectory(prefix="fcva") as directory:
        process = AgentProcess(directory)
        process.start()
        yield process
        process.stop()


@pytest.fixture(scope="module")
def capped_agent() -> Iterator[AgentProcess]:
    with tempfile.TemporaryDirectory(prefix="fcvc") as directory:
        process = AgentProcess(
            directory, "--max-sessions", "2", "--first-frame-timeout", "0.5"
        )
        process.start()
        yield process
        process.stop()


@pytest.fixture
def path(agent: AgentProcess) -> str:
    return agent.unix_path


def start_and_read_pid(
    connection: AgentConnection, script: str, **fields: object
) -> int:
    """Start ``sh -c 'echo $$; SCRIPT'`` and return the shell's pid."""
    connection.send_start(["sh", "-c", f"echo $$; {script}"], **fields)
    line = connection.read_stdout_until(b"\n")
    return int(line.split()[0])


# Output and exit status.


def test_echo_output_and_exit(path: str) -> None:
    result = run(path, ["echo", "hello"])
    assert result.stdout == b"hello\n"
    assert result.stderr == b""
    assert result.exit_payload == exit_payload(0, 0)


def test_stderr_is_a_separate_stream(path: str) -> None:
    result = run(path, ["sh", "-c", "echo out; echo err >&2"])
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"


def test_exit_code_passed_through(path: str) -> None:
    result = run(path, ["sh", "-c", "exit 3"])
    assert result.exit_payload == exit_payload(3, 0)
    assert decode_exit(result.exit_payload) == (3, None)


def test_exit_by_signal_reports_signal(path: str) -> None:
    result = run(path, ["sh", "-c", "kill -TERM $$"])
    assert len(result.exit_payload) == 8
    assert result.exit_payload == struct.pack("<ii", 128 + 15, 15)


def test_exit_sent_without_host_eof(path: str) -> None:
    result = run(path, ["echo", "no stdin needed"], stdin=None)
    assert result.exit_code == 0


def test_connection_closed_after_exit(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["true"])
        connection.read_until_exit()
        assert connection.closed_by_peer()


def test_output_frames_at_most_max_chunk(path: str) -> None:
    result = run(path, ["head", "-c", str(1 << 20), "/dev/zero"])
    sizes = [len(p) for t, p in result.frames if t == FrameType.STDOUT]
    assert len(result.stdout) == 1 << 20
    assert max(sizes) <= MAX_OUTPUT_CHUNK


def test_background_child_does_not_hold_exit(path: str) -> None:
    result = run(path, ["sh", "-c", "sleep 300 & echo $!"])
    background_pid = int(result.stdout)
    try:
        assert result.exit_code == 0
        assert process_exists(background_pid)
    finally:
        os.kill(background_pid, signal.SIGKILL)


# The START request.


def test_env_added_to_agent_environment(path: str) -> None:
    result = run(path, ["sh", "-c", 'echo "$GREETING:$PATH"'], env={"GREETING": "hi"})
    greeting, _, search_path = result.stdout.strip().partition(b":")
    assert greeting == b"hi"
    assert search_path == os.environ["PATH"].encode()


def test_working_dir(path: str, tmp_path: Path) -> None:
    result = run(path, ["pwd"], working_dir=str(tmp_path))
    assert result.stdout == f"{tmp_path}\n".encode()


def test_default_working_dir_is_root(path: str) -> None:
    assert run(path, ["pwd"]).stdout == b"/\n"


def test_command_not_found(path: str) -> None:
    result = run(path, ["fcvsock-no-such-command"])
    assert result.exit_code == 127
    assert b"not found" in result.stderr
    assert b"fcvsock-no-such-command" in result.stderr


def test_empty_command_name_not_found(path: str) -> None:
    result = run(path, [""])
    assert result.exit_code == 127
    assert b"not found" in result.stderr


def test_missing_working_dir(path: str, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    result = run(path, ["true"], working_dir=str(missing))
    assert result.exit_code == 127
    assert str(missing).encode() in result.stderr


def test_command_not_executable(path: str, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    result = run(path, [str(script)])
    assert result.exit_code == 126
    assert b"permission denied" in result.stderr


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"[]",
        start_payload([]),
        start_payload("echo hi"),
        start_payload(["echo"], tty="yes"),
        start_payload(["echo"], env={"A=B": "c"}),
    ],
    ids=["bad-json", "not-object", "empty-cmd", "cmd-string", "tty-string", "env-key"],
)
def test_invalid_start(path: str, payload: bytes) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send(FrameType.START, payload)
        result = connection.read_until_exit()
    assert result.exit_code == 125
    assert result.stderr.startswith(b"start: ")


def test_unknown_user(path: str) -> None:
    result = run(path, ["id"], user="fcvsock-no-such-user")
    assert result.exit_code == 126
    assert b"unknown user" in result.stderr


@pytest.mark.parametrize("user", ["\ud800", "\u0663", "1:x"])
def test_invalid_user_spec(path: str, user: str) -> None:
    result = run(path, ["id"], user=user)
    assert result.exit_code == 126
    assert b"unknown user" in result.stderr


def test_long_start_error_truncated(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send(FrameType.START, start_payload("x" * 1_000_000))
        result = connection.read_until_exit()
    assert result.exit_code == 125
    assert len(result.stderr) < 8192
    assert result.stderr.endswith(b"(truncated)\n")


@requires_root
def test_user_by_name(path: str) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody")
    result = run(path, ["sh", "-c", "id -u; echo $HOME"], user="nobody")
    assert result.stdout.split() == [
        str(nobody.pw_uid).encode(),
        nobody.pw_dir.encode(),
    ]


@requires_root
def test_user_by_uid_and_gid(path: str) -> None:
    result = run(path, ["sh", "-c", "id -u; id -g; id -G"], user="12345:23456")
    assert result.stdout.split() == [b"12345", b"23456", b"23456"]


def test_user_switch_needs_root() -> None:
    with pytest.raises(PermissionError, match="only root"):
        resolve_user("0:0", euid=1000, egid=1000)


def test_user_switch_to_self_without_root() -> None:
    assert resolve_user("1000:1000", euid=1000, egid=1000) is None


# Stdin.


def test_stdin_megabyte_to_wc(path: str) -> None:
    data = os.urandom(1 << 20)
    with AgentConnection.connect(path) as connection:
        connection.send_start(["wc", "-c"])
        for offset in range(0, len(data), 64 * 1024):
            connection.send(FrameType.STDIN, data[offset : offset + 64 * 1024])
        connection.send(FrameType.EOF)
        result = connection.read_until_exit()
    assert result.stdout.strip() == b"1048576"


def test_empty_stdin_is_not_eof(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["cat"])
        connection.send(FrameType.STDIN, b"")
        connection.send(FrameType.STDIN, b"abc")
        assert connection.read_stdout_until(b"abc") == b"abc"
        connection.send(FrameType.EOF)
        assert connection.read_until_exit().exit_code == 0


def test_stdin_after_eof_dropped(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["cat"])
        connection.send(FrameType.STDIN, b"before")
        connection.send(FrameType.EOF)
        connection.send(FrameType.STDIN, b"after")
        result = connection.read_until_exit()
    assert result.stdout == b"before"


def test_unread_stdin_stops_host_reads(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        pid = start_and_read_pid(connection, "exec sleep 300")
        accepted = _send_until_blocked(connection.sock, limit=64 << 20)
        assert accepted < 32 << 20
        assert process_exists(pid)
        connection.close()
        assert wait_until(lambda: not process_exists(pid))


def _send_until_blocked(sock: socket.socket, limit: int) -> int:
    """Send STDIN frames until the peer stops reading, and return the bytes sent."""
    stream = memoryview(encode_frame(FrameType.STDIN, bytes(64 * 1024)) * 16)
    accepted = 0
    while accepted < limit:
        # A socket that stays full for 0.3 s means the peer stopped reading.
        sock.settimeout(0.3)
        try:
            accepted += sock.send(stream[accepted % len(stream) :])
        except TimeoutError:
            return accepted
    return accepted


# Signals, timeouts and disconnects.


def test_signal_frame_ends_sleep(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["sleep", "300"])
        connection.send(FrameType.SIGNAL, encode_signal(signal.SIGTERM))
        result = connection.read_until_exit()
    assert result.exit_payload == exit_payload(128 + 15, 15)


def test_signal_reaches_whole_group(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["sh", "-c", "sleep 300 & echo $!; wait"])
        background_pid = int(connection.read_stdout_until(b"\n"))
        connection.send(FrameType.SIGNAL, encode_signal(signal.SIGKILL))
        result = connection.read_until_exit()
    assert result.exit_code == 137
    assert wait_until(lambda: not process_exists(background_pid))


def test_invalid_signal_ignored(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["sleep", "300"])
        connection.send(FrameType.SIGNAL, struct.pack("<i", 0))
        connection.send(FrameType.SIGNAL, struct.pack("<i", 65))
        connection.send(FrameType.SIGNAL, b"\x01")
        connection.send(FrameType.SIGNAL, encode_signal(signal.SIGINT))
        result = connection.read_until_exit()
    assert result.exit_payload == exit_payload(128 + 2, 2)


def test_unknown_frame_type_ignored(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["cat"])
        connection.send(0x42, b"whatever")
        connection.send(FrameType.RESIZE, encode_resize(10, 10))
        connection.send(FrameType.STDIN, b"still here")
        connection.send(FrameType.EOF)
        result = connection.read_until_exit()
    assert result.stdout == b"still here"


def test_timeout_kills_process_group(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        # The background sleep is forked before the shell prints its pid.
        connection.send_start(
            ["sh", "-c", "sleep 300 & echo $$; sleep 300"], timeout_seconds=1
        )
        pid = int(connection.read_stdout_until(b"\n"))
        assert len(pids_in_group(pid)) >= 2
        result = connection.read_until_exit()
    assert result.exit_payload == exit_payload(137, 9)
    assert wait_until(lambda: not pids_in_group(pid))


def test_host_disconnect_kills_command(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        pid = start_and_read_pid(connection, "sleep 300 & exec sleep 300")
    assert wait_until(lambda: not pids_in_group(pid))


def test_output_backpressure_blocks_command(agent: AgentProcess) -> None:
    size = 32 << 20
    baseline = resident_bytes(agent.pid)
    with AgentConnection.connect(agent.unix_path) as connection:
        connection.send_start(["head", "-c", str(size), "/dev/zero"])
        connection.send(FrameType.EOF)
        head_pid = _wait_for_child(agent.pid, b"head")
        assert wait_until(lambda: _pipe_full(head_pid, 1))
        # Unbuffered, the rest of the output would take milliseconds.
        assert not wait_until(lambda: not process_exists(head_pid), timeout=0.5)
        assert resident_bytes(agent.pid) - baseline < size // 2
        result = connection.read_until_exit()
    assert len(result.stdout) == size
    assert result.exit_code == 0


def _wait_for_child(parent: int, name: bytes) -> int:
    found: list[int] = []

    def look() -> bool:
        for pid in child_pids(parent):
            try:
                if Path(f"/proc/{pid}/comm").read_bytes().strip() == name:
                    found.append(pid)
                    return True
            except OSError:
                continue
        return False

    assert wait_until(look)
    return found[0]


def _pipe_full(pid: int, fd: int) -> bool:
    # A second write end is harmless: nothing is written through it.
    pipe = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        queued = array.array("i", [0])
        fcntl.ioctl(pipe, termios.FIONREAD, queued)
        return queued[0] >= fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ) - 4096
    finally:
        os.close(pipe)


# Terminal mode.


def test_tty_initial_size(path: str) -> None:
    result = run(path, ["stty", "size"], tty=True, tty_width=100, tty_height=40)
    assert result.stdout.strip() == b"40 100"


def test_tty_resize_sends_sigwinch(path: str) -> None:
    script = (
        "import os, signal, sys\n"
        "def winch(number, frame):\n"
        "    size = os.get_terminal_size(0)\n"
        "    print('winch', size.lines, size.columns, flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGWINCH, winch)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    signal.pause()\n"
    )
    with AgentConnection.connect(path) as connection:
        connection.send_start(
            [PYTHON, "-c", script], tty=True, tty_width=80, tty_height=24
        )
        connection.read_stdout_until(b"ready")
        connection.send(FrameType.RESIZE, encode_resize(120, 50))
        result = connection.read_until_exit()
    assert b"winch 50 120" in result.stdout
    assert result.exit_code == 0


def test_tty_is_a_pts(path: str) -> None:
    result = run(path, ["tty"], tty=True)
    assert result.stdout.startswith(b"/dev/pts/")


def test_tty_merges_stderr(path: str) -> None:
    result = run(path, ["sh", "-c", "echo out; echo err >&2"], tty=True)
    assert b"out" in result.stdout
    assert b"err" in result.stdout
    assert not [t for t, _ in result.frames if t == FrameType.STDERR]


def test_tty_is_controlling_terminal(path: str) -> None:
    script = (
        "import os\n"
        "os.close(os.open('/dev/tty', os.O_RDWR))\n"
        "print(os.tcgetpgrp(0) == os.getpgrp())\n"
    )
    result = run(path, [PYTHON, "-c", script], tty=True)
    assert result.stdout.strip() == b"True"


def test_tty_eof_ends_input(path: str) -> None:
    result = run(path, ["cat"], stdin=b"typed\n", tty=True)
    assert result.exit_code == 0
    assert b"typed" in result.stdout


def test_tty_output_complete(path: str) -> None:
    result = run(path, ["seq", "100000"], tty=True)
    lines = result.stdout.split(b"\r\n")
    assert lines[-2:] == [b"100000", b""]
    assert len(lines) == 100001


def test_tty_term_from_env(path: str) -> None:
    result = run(path, ["sh", "-c", "echo $TERM"], tty=True, env={"TERM": "vt100"})
    assert result.stdout.strip() == b"vt100"


# First frame, limits and bad input.


def test_bad_first_frame_closes_without_reply(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send(FrameType.STDIN, b"hello")
        assert connection.closed_by_peer()


def test_oversize_first_frame_closes(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.sock.sendall(struct.pack("<BI", FrameType.START, MAX_PAYLOAD + 1))
        assert connection.closed_by_peer()


def test_oversize_frame_ends_session(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        pid = start_and_read_pid(connection, "exec sleep 300")
        connection.sock.sendall(struct.pack("<BI", FrameType.STDIN, MAX_PAYLOAD + 1))
        assert connection.read_frame() is None
    assert wait_until(lambda: not process_exists(pid))


def test_idle_connection_closed(capped_agent: AgentProcess) -> None:
    with AgentConnection.connect(capped_agent.unix_path) as connection:
        assert connection.closed_by_peer()


def test_session_cap_rejects_start(capped_agent: AgentProcess) -> None:
    path = capped_agent.unix_path
    with (
        AgentConnection.connect(path) as first,
        AgentConnection.connect(path) as second,
    ):
        for connection in (first, second):
            start_and_read_pid(connection, "exec sleep 300")
        result = run(path, ["true"])
        assert result.exit_code == 126
        assert b"session limit of 2" in result.stderr
    assert wait_until(lambda: run(path, ["true"]).exit_code == 0)


def test_session_cap_rejects_clock_sync(capped_agent: AgentProcess) -> None:
    path = capped_agent.unix_path
    with (
        AgentConnection.connect(path) as first,
        AgentConnection.connect(path) as second,
    ):
        for connection in (first, second):
            start_and_read_pid(connection, "exec sleep 300")
        assert _clock_sync(path, encode_clock_sync(1, 0)) == exit_payload(-1, 0)


# Clock sync.


def _clock_sync(path: str, payload: bytes) -> bytes:
    with AgentConnection.connect(path) as connection:
        connection.send(FrameType.CLOCK_SYNC, payload)
        result = connection.read_until_exit()
        assert connection.closed_by_peer()
    return result.exit_payload


def test_clock_sync_sets_virtual_clock(agent: AgentProcess) -> None:
    seconds = 2_000_000_000
    assert _clock_sync(agent.unix_path, encode_clock_sync(seconds, 5)) == (
        exit_payload(0, 0)
    )
    now = VirtualClock(agent.clock_path).now_ns()
    assert seconds * 10**9 + 5 <= now < (seconds + 60) * 10**9


@pytest.mark.parametrize(
    "payload",
    [b"\x00" * 11, struct.pack("<qI", 1, 10**9)],
    ids=["short", "nanoseconds"],
)
def test_clock_sync_invalid_payload(path: str, payload: bytes) -> None:
    assert _clock_sync(path, payload) == exit_payload(-1, 0)


def test_clock_sync_unwritable_clock_fails(tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fcvu") as directory:
        process = AgentProcess(directory, "--clock", f"virtual:{tmp_path}/no/clock")
        process.start()
        try:
            payload = _clock_sync(process.unix_path, encode_clock_sync(1, 0))
        finally:
            process.stop()
    assert payload == exit_payload(-1, 0)


def test_clock_sync_failing_setter_in_process() -> None:
    def reject(seconds: int, nanoseconds: int) -> None:
        raise PermissionError("clock_settime: operation not permitted")

    payload = _in_process(
        Agent(clock_setter=reject),
        lambda path: _clock_sync(path, encode_clock_sync(1, 0)),
    )
    assert payload == exit_payload(-1, 0)


def test_clock_setter_receives_time_in_process() -> None:
    received: list[tuple[int, int]] = []
    agent = Agent(clock_setter=lambda s, ns: received.append((s, ns)))
    payload = _in_process(
        agent, lambda path: _clock_sync(path, encode_clock_sync(1234, 5678))
    )
    assert payload == exit_payload(0, 0)
    assert received == [(1234, 5678)]


def test_command_in_process() -> None:
    result = _in_process(Agent(), lambda path: run(path, ["echo", "in process"]))
    assert result.stdout == b"in process\n"
    assert result.exit_code == 0


def _in_process(agent: Agent, client: object) -> object:
    """Serve ``agent`` on this thread's loop while ``client(path)`` runs."""
    assert callable(client)

    async def scenario(path: str) -> object:
        async with agent:
            await agent.listen_unix(path)
            return await asyncio.to_thread(client, path)

    with tempfile.TemporaryDirectory(prefix="fcvi") as directory:
        return asyncio.run(scenario(os.path.join(directory, "agent.sock")))


# Handoff of pre-connected sockets.


def _handoff_channel(agent: AgentProcess) -> socket.socket:
    channel = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel.settimeout(10)
    channel.connect(agent.handoff_path)
    return channel


def _hand_off(channel: socket.socket, fds: list[int], payload: bytes) -> None:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
    channel.sendmsg([payload], rights if fds else [])


def _handoff_payload(host_port: int) -> bytes:
    return json.dumps({"host_port": host_port, "guest_port": 52}).encode()


def test_handoff_serves_session(agent: AgentProcess) -> None:
    host, guest = socket.socketpair()
    with _handoff_channel(agent) as channel, AgentConnection(host) as connection:
        # Bytes the host sent before the handoff must still be read.
        connection.send_start(["echo", "handed off"])
        connection.send(FrameType.EOF)
        _hand_off(channel, [guest.fileno()], _handoff_payload(1073741824))
        guest.close()
        result = connection.read_until_exit()
        assert result.stdout == b"handed off\n"
        assert json.loads(channel.recv(4096)) == {"closed": 1073741824}


def test_handoff_reply_written_first(agent: AgentProcess) -> None:
    host, guest = socket.socketpair()
    host.settimeout(10)
    payload = {"host_port": 14, "guest_port": 52, "reply": "OK 14\n"}
    with _handoff_channel(agent) as channel, host:
        host.sendall(encode_frame(FrameType.START, start_payload(["echo", "late"])))
        _hand_off(channel, [guest.fileno()], json.dumps(payload).encode())
        guest.close()
        received = b""
        while chunk := host.recv(65536):
            received += chunk
        assert json.loads(channel.recv(4096)) == {"closed": 14}
    decoder = FrameDecoder()
    frames = decoder.feed(received[len(b"OK 14\n") :])
    assert received[: len(b"OK 14\n")] == b"OK 14\n"
    assert (FrameType.STDOUT, b"late\n") in frames
    assert frames[-1][0] == FrameType.EXIT
    assert decoder.buffered == 0


def test_handoff_without_fd_dropped(agent: AgentProcess) -> None:
    host, guest = socket.socketpair()
    with _handoff_channel(agent) as channel, AgentConnection(host) as connection:
        _hand_off(channel, [], _handoff_payload(7))
        _hand_off(channel, [guest.fileno()], _handoff_payload(8))
        guest.close()
        connection.send_start(["true"])
        assert connection.read_until_exit().exit_code == 0
        assert json.loads(channel.recv(4096)) == {"closed": 8}


def test_handoff_with_two_fds_closes_both(agent: AgentProcess) -> None:
    pairs = [socket.socketpair() for _ in range(2)]
    with _handoff_channel(agent) as channel:
        _hand_off(channel, [guest.fileno() for _, guest in pairs], _handoff_payload(9))
        for host, guest in pairs:
            guest.close()
            with AgentConnection(host) as connection:
                assert connection.closed_by_peer()
        assert json.loads(channel.recv(4096)) == {"closed": 9}


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"[]",
        json.dumps({"host_port": "1"}).encode(),
        b"\xff",
        json.dumps({"host_port": 1, "reply": 5}).encode(),
        json.dumps({"host_port": 1, "reply": "\ud800"}).encode(),
    ],
    ids=[
        "bad-json",
        "not-object",
        "port-string",
        "not-utf8",
        "reply-not-string",
        "reply-lone-surrogate",
    ],
)
def test_handoff_bad_payload_closes_fd(agent: AgentProcess, payload: bytes) -> None:
    host, guest = socket.socketpair()
    with _handoff_channel(agent) as channel, AgentConnection(host) as connection:
        _hand_off(channel, [guest.fileno()], payload)
        guest.close()
        assert connection.closed_by_peer()


def test_handoff_of_non_socket_closes_fd(agent: AgentProcess) -> None:
    read_fd, write_fd = os.pipe()
    try:
        with _handoff_channel(agent) as channel:
            _hand_off(channel, [read_fd], _handoff_payload(10))
            os.close(read_fd)
            read_fd = -1
            assert json.loads(channel.recv(4096)) == {"closed": 10}
            assert _pipe_has_no_reader(write_fd)
    finally:
        os.close(write_fd)
        if read_fd >= 0:
            os.close(read_fd)


def test_handoff_reset_logged_at_debug() -> None:
    with tempfile.TemporaryDirectory(prefix="fcvr") as directory:
        process = AgentProcess(directory)
        process.start()
        try:
            host, guest = socket.socketpair()
            with (
                _handoff_channel(process) as channel,
                AgentConnection(host) as connection,
            ):
                _hand_off(channel, [guest.fileno()], _handoff_payload(12))
                guest.close()
                connection.send_start(["true"])
                connection.read_until_exit()
                # Closing with the {"closed": 12} reply unread resets the
                # agent's end, as when a stand-in VM stops.
                assert channel.recv(4096, socket.MSG_PEEK)
            assert wait_until(lambda: "[Errno 104]" in process.log())
        finally:
            process.stop()
        log_lines = process.log().splitlines()
        reset_lines = [line for line in log_lines if "[Errno 104]" in line]
        assert len(reset_lines) == 1
        assert " DEBUG " in reset_lines[0]


def _pipe_has_no_reader(write_fd: int) -> bool:
    try:
        os.write(write_fd, b"x")
    except BrokenPipeError:
        return True
    return False


def test_random_frames_end_only_their_session(path: str) -> None:
    generator = random.Random(52)
    frame_types = [0x02, 0x03, 0x04, 0x05, 0x07, 0x10, 0x12, 0x99]
    for _ in range(40):
        with AgentConnection.connect(path) as connection:
            connection.send_start(["cat"])
            for _ in range(generator.randrange(1, 8)):
                payload = generator.randbytes(generator.randrange(0, 16))
                connection.send(generator.choice(frame_types), payload)
        with AgentConnection.connect(path) as connection:
            connection.sock.sendall(generator.randbytes(generator.randrange(1, 64)))
    assert run(path, ["echo", "still serving"]).stdout == b"still serving\n"


# Exit once the handoff channels close (--exit-with-handoff).


@pytest.fixture
def exiting_agent() -> Iterator[AgentProcess]:
    with tempfile.TemporaryDirectory(prefix="fcve") as directory:
        process = AgentProcess(directory, "--exit-with-handoff")
        process.start()
        yield process
        process.stop()


def _exit_code(agent: AgentProcess) -> int:
    assert agent.process is not None
    return agent.process.wait(10)


def test_exit_with_handoff_on_close(exiting_agent: AgentProcess) -> None:
    _handoff_channel(exiting_agent).close()
    assert _exit_code(exiting_agent) == 0
    assert not os.path.exists(exiting_agent.unix_path)
    assert not os.path.exists(exiting_agent.handoff_path)


def test_exit_with_handoff_kills_commands(exiting_agent: AgentProcess) -> None:
    host, guest = socket.socketpair()
    with AgentConnection(host) as connection:
        with _handoff_channel(exiting_agent) as channel:
            _hand_off(channel, [guest.fileno()], _handoff_payload(13))
            guest.close()
            pid = start_and_read_pid(connection, "exec sleep 60")
        assert _exit_code(exiting_agent) == 0
        assert connection.read_frame() is None
    assert wait_until(lambda: not process_exists(pid))


def test_exit_with_handoff_waits_for_first(exiting_agent: AgentProcess) -> None:
    result = run(exiting_agent.unix_path, ["echo", "before any channel"])
    assert result.stdout == b"before any channel\n"
    assert exiting_agent.process is not None
    assert exiting_agent.process.poll() is None


def test_exit_with_handoff_waits_for_all(exiting_agent: AgentProcess) -> None:
    with _handoff_channel(exiting_agent):
        _handoff_channel(exiting_agent).close()
        assert wait_until(lambda: "1 still open" in exiting_agent.log())
        result = run(exiting_agent.unix_path, ["echo", "one channel left"])
        assert result.stdout == b"one channel left\n"
    assert _exit_code(exiting_agent) == 0


def test_exit_with_handoff_needs_handoff(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--unix", "/nonexistent/agent.sock", "--exit-with-handoff"])
    assert raised.value.code == 2
    assert "--exit-with-handoff requires --handoff" in capsys.readouterr().err


# Whole-agent properties, which run last in this file.


def test_no_fds_leaked(agent: AgentProcess) -> None:
    # A session closes its fds in the step that kills its command, so once no
    # child is left the count is the idle baseline.
    assert wait_until(lambda: not child_pids(agent.pid))
    before = open_fd_count(agent.pid)
    run(agent.unix_path, ["echo", "x"])
    run(agent.unix_path, ["echo", "x"], tty=True)
    run(agent.unix_path, ["fcvsock-no-such-command"])
    run(agent.unix_path, ["true"], tty=True, user="fcvsock-no-such-user")
    with AgentConnection.connect(agent.unix_path) as connection:
        connection.send(FrameType.EOF)
        assert connection.closed_by_peer()
    host, guest = socket.socketpair()
    with _handoff_channel(agent) as channel, AgentConnection(host) as connection:
        _hand_off(channel, [guest.fileno()], _handoff_payload(11))
        guest.close()
        connection.send_start(["true"])
        connection.read_until_exit()
        assert json.loads(channel.recv(4096)) == {"closed": 11}
    assert wait_until(lambda: open_fd_count(agent.pid) == before)


def test_agent_still_serving(agent: AgentProcess) -> None:
    assert agent.process is not None
    assert agent.process.poll() is None
    assert run(agent.unix_path, ["echo", "alive"]).stdout == b"alive\n"
    assert "Traceback" not in agent.log()


# Command line.


def test_main_requires_a_listener(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--max-sessions", "3"])
    assert raised.value.code == 2
    assert "--unix" in capsys.readouterr().err


def test_main_rejects_unknown_clock(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--unix", "/nonexistent/agent.sock", "--clock", "sundial"])
    assert raised.value.code == 2
    assert "virtual:FILE" in capsys.readouterr().err


def test_clock_defaults_to_none_off_vsock() -> None:
    assert _clock_setter(None, vsock=False) is None
    assert isinstance(_clock_setter(None, vsock=True), SystemClock)
    assert isinstance(
        _clock_setter("virtual:/run/clock.json", vsock=True), VirtualClock
    )


def test_sigterm_stops_agent_cleanly() -> None:
    with tempfile.TemporaryDirectory(prefix="fcvt") as directory:
        process = AgentProcess(directory)
        process.start()
        assert process.process is not None
        popen = process.process
        process.stop()
        assert popen.returncode == 0
        assert not os.path.exists(process.unix_path)
        assert not os.path.exists(process.handoff_path)


# The virtual clock.


def test_virtual_clock_defaults_to_host_time(tmp_path: Path) -> None:
    before = time.time_ns()
    now = VirtualClock(tmp_path / "clock.json").now_ns()
    assert before <= now <= time.time_ns()


def test_virtual_clock_advances_from_set_time(tmp_path: Path) -> None:
    clock = VirtualClock(tmp_path / "clock.json")
    clock(100, 7)
    first = clock.now_ns()
    second = clock.now_ns()
    assert 100 * 10**9 + 7 <= first <= second
    assert first < 160 * 10**9


def test_virtual_clock_file_format(tmp_path: Path) -> None:
    clock = VirtualClock(tmp_path / "clock.json")
    clock(3, 4)
    record = json.loads((tmp_path / "clock.json").read_text())
    assert record["realtime_ns"] == 3_000_000_004
    assert isinstance(record["monotonic_ns"], int)
    assert sorted(os.listdir(tmp_path)) == ["clock.json"]


@pytest.mark.parametrize("seconds", [-1, 2**63 // 10**9 + 1, 2**63 - 1, -(2**63)])
def test_virtual_clock_rejects_out_of_range(tmp_path: Path, seconds: int) -> None:
    clock = VirtualClock(tmp_path / "clock.json")
    with pytest.raises(OSError, match="time must be in"):
        clock(seconds, 0)
    assert not (tmp_path / "clock.json").exists()


def test_virtual_clock_rejects_bad_file(tmp_path: Path) -> None:
    (tmp_path / "clock.json").write_text('{"realtime_ns": "soon"}')
    with pytest.raises(ValueError, match="realtime_ns must be an integer"):
        VirtualClock(tmp_path / "clock.json").now_ns()
