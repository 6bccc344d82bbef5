"""The guest agent against a host that breaks every rule.

A malformed START must get exit code 125 with a message on STDERR, frames
the agent does not expect must be ignored or end only their own session,
and the agent must go on serving other sessions after each case.  The
agents run as ``python -m fcvsock.agent`` on Unix sockets, driven with raw
frames; every socket operation has a deadline.
"""

from __future__ import annotations

import fcntl
import json
import select
import socket
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest
from agent_client import (
    AgentConnection,
    AgentProcess,
    RunResult,
    open_fd_count,
    process_exists,
    resident_bytes,
    run,
    start_payload,
    wait_until,
)

from fcvsock._core import encode_frame
from fcvsock.protocol import MAX_OUTPUT_CHUNK, MAX_PAYLOAD, FrameType

EXIT_INVALID_START = 125
EXIT_NOT_PERMITTED = 126
SESSION_CAP = 4
FIRST_FRAME_TIMEOUT = 0.5
UNKNOWN_TYPE = 0x7F


@pytest.fixture(scope="module")
def agent() -> Iterator[AgentProcess]:
    # pytest's tmp_path can exceed the 108-byte limit of sun_path.
    with tempfile.TemporaryDirectory(prefix="fcvh") as directory:
        process = AgentProcess(directory)
        process.start()
        yield process
        process.stop()


@pytest.fixture(scope="module")
def capped_agent() -> Iterator[AgentProcess]:
    with tempfile.TemporaryDirectory(prefix="fcvk") as directory:
        process = AgentProcess(
            directory,
            "--max-sessions",
            str(SESSION_CAP),
            "--first-frame-timeout",
            str(FIRST_FRAME_TIMEOUT),
        )
        process.start()
        yield process
        process.stop()


@pytest.fixture
def path(agent: AgentProcess) -> Iterator[str]:
    yield agent.unix_path
    assert agent.process is not None
    assert agent.process.poll() is None, agent.log()[-2000:]
    assert_serving(agent.unix_path)


def assert_serving(path: str) -> None:
    result = run(path, ["echo", "still serving"])
    assert result.exit_code == 0
    assert result.stdout == b"still serving\n"


def send_start(path: str, payload: bytes, timeout: float = 30.0) -> RunResult:
    with AgentConnection.connect(path) as connection:
        connection.sock.settimeout(timeout)
        connection.send(FrameType.START, payload)
        return connection.read_until_exit()


def header(frame_type: int, length: int) -> bytes:
    return struct.pack("<BI", frame_type, length)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


MALFORMED_STARTS = {
    "not-json": b"{not json",
    "invalid-utf8": b"\xff\xfe\xfd",
    "empty-payload": b"",
    "json-array": b'["echo", "hi"]',
    "json-string": b'"echo hi"',
    "json-number": b"52",
    "json-null": b"null",
    "cmd-missing": b"{}",
    "cmd-missing-env-only": b'{"env": {}}',
    "cmd-empty": start_payload([]),
    "cmd-null": start_payload(None),
    "cmd-string": start_payload("echo hi"),
    "cmd-object": start_payload({"0": "echo"}),
    "cmd-numbers": start_payload([1, 2]),
    "cmd-null-item": start_payload(["echo", None]),
    "cmd-nested-list": start_payload([["echo"]]),
    "env-list": start_payload(["true"], env=["A=B"]),
    "env-string": start_payload(["true"], env="A=B"),
    "env-number-value": start_payload(["true"], env={"A": 1}),
    "env-empty-key": start_payload(["true"], env={"": "x"}),
    "env-key-with-equals": start_payload(["true"], env={"A=B": "x"}),
    "tty-number": start_payload(["true"], tty=1),
    "tty-string": start_payload(["true"], tty="yes"),
    "width-too-large": start_payload(["true"], tty=True, tty_width=70000, tty_height=5),
    "width-negative": start_payload(["true"], tty=True, tty_width=-1, tty_height=5),
    "height-float": start_payload(["true"], tty=True, tty_width=80, tty_height=1.5),
    "timeout-negative": start_payload(["true"], timeout_seconds=-1),
    "timeout-above-u32": start_payload(["true"], timeout_seconds=2**32),
    "timeout-string": start_payload(["true"], timeout_seconds="5"),
    "working-dir-number": start_payload(["true"], working_dir=1),
    "user-number": start_payload(["true"], user=0),
    "nul-in-argument": start_payload(["echo", "a\0b"]),
    "nul-in-program": start_payload(["ec\0ho"]),
    "nul-in-env-value": start_payload(["true"], env={"A": "x\0y"}),
    "nul-in-working-dir": start_payload(["true"], working_dir="/\0tmp"),
    "nul-in-user": start_payload(["true"], user="ro\0ot"),
    "surrogate-in-argument": b'{"cmd":["echo","\\ud800"]}',
    "surrogate-in-env": b'{"cmd":["true"],"env":{"A":"\\udfff"}}',
    "deep-nesting": b'{"cmd":' + nested(100_000) + b"}",
    "deep-nesting-near-limit": b'{"cmd":[' + nested(990) + b"]}",
    "json-array-16mib": b"[" + b"1," * ((MAX_PAYLOAD - 3) // 2) + b"1]",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_STARTS))
def test_malformed_start(path: str, name: str) -> None:
    payload = MALFORMED_STARTS[name]
    assert len(payload) <= MAX_PAYLOAD
    result = send_start(path, payload)
    assert result.exit_code == EXIT_INVALID_START
    assert result.stderr.startswith(b"start: ")


def test_start_16mib_json_runs(path: str) -> None:
    document = {"cmd": ["echo", "ok"], "padding": ""}
    padding = MAX_PAYLOAD - len(json.dumps(document))
    document["padding"] = "p" * padding
    payload = json.dumps(document).encode()
    assert len(payload) == MAX_PAYLOAD
    result = send_start(path, payload)
    assert result.exit_code == 0
    assert result.stdout == b"ok\n"


def test_start_16mib_string_cmd(path: str) -> None:
    payload = b'{"cmd":"' + b"a" * (MAX_PAYLOAD - 10) + b'"}'
    result = send_start(path, payload, timeout=5.0)
    assert result.exit_code == EXIT_INVALID_START


def test_start_error_frame_size(path: str) -> None:
    payload = b'{"cmd":"' + b"\\u0001" * 2_000_000 + b'"}'
    result = send_start(path, payload)
    assert result.exit_code == EXIT_INVALID_START
    sizes = [len(data) for kind, data in result.frames if kind == FrameType.STDERR]
    assert max(sizes) <= MAX_OUTPUT_CHUNK


def test_start_surrogate_user(path: str) -> None:
    result = send_start(path, b'{"cmd":["true"],"user":"\\ud800"}', timeout=5.0)
    assert result.exit_code in (EXIT_INVALID_START, EXIT_NOT_PERMITTED)
    assert result.stderr.startswith(b"start: ")


def test_start_non_ascii_digit_user(path: str) -> None:
    result = run(path, ["id", "-u"], user="\u0663")
    assert result.exit_code != 0


# Frames the agent does not expect.


def cat_session(path: str) -> AgentConnection:
    connection = AgentConnection.connect(path)
    connection.send_start(["cat"])
    return connection


UNEXPECTED_FRAMES = {
    "stdout": (FrameType.STDOUT, b"from host"),
    "stderr": (FrameType.STDERR, b"from host"),
    "exit": (FrameType.EXIT, struct.pack("<i", 0)),
    "second-start": (FrameType.START, start_payload(["false"])),
    "clock-sync": (FrameType.CLOCK_SYNC, struct.pack("<qI", 0, 0)),
    "unknown-type": (UNKNOWN_TYPE, b"?" * 100),
    "type-zero": (0, b""),
    "resize-without-tty": (FrameType.RESIZE, struct.pack("<HH", 80, 24)),
    "resize-short": (FrameType.RESIZE, b"\x01"),
    "signal-short": (FrameType.SIGNAL, b"\x09"),
    "signal-zero": (FrameType.SIGNAL, struct.pack("<i", 0)),
    "signal-65": (FrameType.SIGNAL, struct.pack("<i", 65)),
    "signal-negative": (FrameType.SIGNAL, struct.pack("<i", -9)),
    "empty-stdin": (FrameType.STDIN, b""),
    "eof-with-payload": (FrameType.EOF, b"ignored?"),
}


@pytest.mark.parametrize("name", sorted(UNEXPECTED_FRAMES))
def test_unexpected_frame_ignored(path: str, name: str) -> None:
    frame_type, payload = UNEXPECTED_FRAMES[name]
    with cat_session(path) as connection:
        connection.send(FrameType.STDIN, b"before\n")
        assert connection.read_stdout_until(b"before\n") == b"before\n"
        connection.send(frame_type, payload)
        if frame_type == FrameType.EOF:
            result = connection.read_until_exit()
            assert result.exit_code == 0
            return
        connection.send(FrameType.STDIN, b"after\n")
        connection.send(FrameType.EOF)
        result = connection.read_until_exit()
    assert result.stdout == b"after\n"
    assert result.exit_code == 0


def test_unknown_frame_flood_ignored(path: str) -> None:
    flood = (header(UNKNOWN_TYPE, 0) + header(0x40, 1) + b"x") * 50_000
    with cat_session(path) as connection:
        connection.sock.sendall(flood)
        connection.send(FrameType.STDIN, b"through\n")
        connection.send(FrameType.EOF)
        result = connection.read_until_exit()
    assert result.stdout == b"through\n"
    assert result.exit_code == 0


def test_stdin_after_eof_dropped(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["sh", "-c", "cat; echo done"])
        connection.send(FrameType.STDIN, b"kept\n")
        connection.send(FrameType.EOF)
        connection.send(FrameType.STDIN, b"dropped\n")
        result = connection.read_until_exit()
    assert result.stdout == b"kept\ndone\n"


def test_oversized_frame_ends_session(path: str) -> None:
    with cat_session(path) as connection:
        connection.send(FrameType.STDIN, b"up\n")
        connection.read_stdout_until(b"up\n")
        connection.sock.sendall(header(FrameType.STDIN, MAX_PAYLOAD + 1))
        assert connection.read_frame() is None


@pytest.mark.parametrize(
    "first",
    [
        header(FrameType.STDIN, 3) + b"abc",
        header(FrameType.EOF, 0),
        header(UNKNOWN_TYPE, 0),
        header(FrameType.STDOUT, 2) + b"hi",
        header(FrameType.START, MAX_PAYLOAD + 1),
    ],
    ids=["stdin", "eof", "unknown", "stdout", "oversized-start"],
)
def test_bad_first_frame_closes(path: str, first: bytes) -> None:
    with AgentConnection.connect(path) as connection:
        connection.sock.sendall(first)
        assert connection.read_frame() is None


# Connections that do nothing, and the session cap.


def test_silent_host_closed(capped_agent: AgentProcess) -> None:
    with AgentConnection.connect(capped_agent.unix_path) as silent:
        assert_serving(capped_agent.unix_path)
        assert silent.read_frame() is None


def test_half_frame_host_closed(capped_agent: AgentProcess) -> None:
    with AgentConnection.connect(capped_agent.unix_path) as stalled:
        stalled.sock.sendall(header(FrameType.START, 100) + b'{"cmd":')
        assert_serving(capped_agent.unix_path)
        assert stalled.read_frame() is None


def test_idle_flood_takes_no_slot(capped_agent: AgentProcess) -> None:
    before = open_fd_count(capped_agent.pid)
    idle = [AgentConnection.connect(capped_agent.unix_path) for _ in range(200)]
    try:
        for _ in range(SESSION_CAP + 1):
            assert_serving(capped_agent.unix_path)
    finally:
        for connection in idle:
            connection.close()
    assert wait_until(lambda: open_fd_count(capped_agent.pid) <= before)


def test_session_cap_reached(capped_agent: AgentProcess) -> None:
    running = [cat_session(capped_agent.unix_path) for _ in range(SESSION_CAP)]
    try:
        for connection in running:
            connection.send(FrameType.STDIN, b"up\n")
            connection.read_stdout_until(b"up\n")
        result = send_start(capped_agent.unix_path, start_payload(["true"]))
        assert result.exit_code == EXIT_NOT_PERMITTED
        assert b"session limit" in result.stderr
    finally:
        for connection in running:
            connection.close()
    assert wait_until(lambda: _serves(capped_agent.unix_path))


def _serves(path: str) -> bool:
    return run(path, ["true"]).exit_code == 0


def test_connect_flood_past_cap(capped_agent: AgentProcess) -> None:
    connections = []
    try:
        for _ in range(SESSION_CAP * 5):
            connection = cat_session(capped_agent.unix_path)
            connections.append(connection)
        codes = []
        for connection in connections:
            connection.send(FrameType.EOF)
        for connection in connections:
            codes.append(connection.read_until_exit().exit_code)
    finally:
        for connection in connections:
            connection.close()
    assert codes.count(0) >= SESSION_CAP
    assert set(codes) <= {0, EXIT_NOT_PERMITTED}
    assert wait_until(lambda: _serves(capped_agent.unix_path))


def test_host_reset_kills_command(path: str) -> None:
    connection = AgentConnection.connect(path)
    connection.send_start(["sh", "-c", "echo $$; exec cat"])
    pid = int(connection.read_stdout_until(b"\n"))
    # cat echoes input the host never reads, so the close is a reset.
    connection.send(FrameType.STDIN, b"x" * 100_000)
    connection.close()
    assert wait_until(lambda: not process_exists(pid))


# Hosts that stop reading or flood stdin.

MIB = 1024 * 1024


def send_until_stalled(sock: socket.socket, payload: bytes, limit: int) -> int:
    """Send ``payload`` frames until the peer stops taking bytes for a second.

    Return the bytes the kernel accepted, at most about ``limit``.
    """
    data = encode_frame(FrameType.STDIN, payload)
    pending = memoryview(data)
    sent = 0
    sock.setblocking(False)
    while sent < limit:
        if not pending:
            pending = memoryview(data)
        try:
            count = sock.send(pending)
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], 1.0)
            if not writable:
                break
            continue
        sent += count
        pending = pending[count:]
    sock.setblocking(True)
    return sent


def test_unread_stdin_bounded(path: str) -> None:
    with AgentConnection.connect(path) as connection:
        connection.send_start(["sleep", "30"])
        sent = send_until_stalled(connection.sock, b"i" * 65536, 64 * MIB)
    assert sent < 4 * MIB


def unread_bytes(sock: socket.socket) -> int:
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def wait_queue_settled(sock: socket.socket, quiet: float = 0.5) -> int:
    """Wait until the unread bytes on ``sock`` stop changing; return them."""
    deadline = time.monotonic() + 10.0
    last = -1
    changed_at = time.monotonic()
    while time.monotonic() < deadline:
        queued = unread_bytes(sock)
        if queued != last:
            last = queued
            changed_at = time.monotonic()
        elif time.monotonic() - changed_at >= quiet:
            return queued
        time.sleep(0.02)
    raise AssertionError(f"receive queue still changing: {last} bytes")


def test_unread_output_bounded(agent: AgentProcess, path: str) -> None:
    rss_before = resident_bytes(agent.pid)
    with AgentConnection.connect(path) as connection:
        connection.send_start(["cat", "/dev/zero"])
        queued = wait_queue_settled(connection.sock)
        rss_during = resident_bytes(agent.pid)
    assert queued < 4 * MIB
    assert rss_during - rss_before < 16 * MIB


@pytest.fixture
def fd_starved_agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[AgentProcess]:
    real_popen = subprocess.Popen

    def popen_with_fd_limit(command: list[str], **options: Any) -> Any:
        # The shell lowers the fd limit, then execs the agent in its place.
        wrapped = ["sh", "-c", 'ulimit -n 40 && exec "$@"', "sh", *command]
        return real_popen(wrapped, **options)

    with tempfile.TemporaryDirectory(prefix="fcvf") as directory:
        process = AgentProcess(directory, "--first-frame-timeout", "0.5")
        with monkeypatch.context() as patch:
            patch.setattr(subprocess, "Popen", popen_with_fd_limit)
            process.start()
        yield process
        process.stop()


def test_fd_exhaustion_survived(fd_starved_agent: AgentProcess) -> None:
    path = fd_starved_agent.unix_path
    idle = [AgentConnection.connect(path) for _ in range(80)]
    try:
        result = send_start(path, start_payload(["true"]), timeout=10.0)
        assert result.exit_code in (0, 127)
    finally:
        for connection in idle:
            connection.close()
    assert wait_until(lambda: _serves(path))
    assert fd_starved_agent.process is not None
    assert fd_starved_agent.process.poll() is None
    assert "Too many open files" in fd_starved_agent.log()
