"""The fcvsock command line: exit statuses, usage errors, signals."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from scripted_peer import frame, read_frame

from fcvsock import cli
from fcvsock.protocol import FrameType, StartRequest
from fcvsock.session import ExitStatus


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (ExitStatus(0), 0),
        (ExitStatus(3), 3),
        (ExitStatus(255), 255),
        (ExitStatus(137, 9), 137),
        (ExitStatus(143, 15), 143),
        (ExitStatus(256), 1),
        (ExitStatus(-1), 1),
        (ExitStatus(-(2**31)), 1),
        (ExitStatus(5, -5), 5),
        (ExitStatus(7, 200), 7),
    ],
)
def test_exit_code_mapping(status: ExitStatus, expected: int) -> None:
    assert cli._exit_code(status) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--timeout", "-1", "vm.sock", "--", "true"],
        ["run", "--timeout", "nan", "vm.sock", "--", "true"],
        ["run", "--connect-timeout", "inf", "vm.sock", "--", "true"],
        ["run", "--port", "4294967296", "vm.sock", "--", "true"],
        ["run", "--remote-timeout", "-5", "vm.sock", "--", "true"],
        ["run", "--timeout", "0", "vm.sock", "--", "true"],
        ["run", "--bogus", "vm.sock", "--", "true"],
        ["sync-clock", "--port", "-1", "vm.sock"],
        ["run", "vm.sock", "--"],
        ["run", "-e", "NOEQUALS", "vm.sock", "--", "true"],
        ["run", "--local", "vm.sock", "--", "true"],
        ["sync-clock", "vm.sock", "--", "x"],
        ["no-such-command"],
    ],
)
def test_usage_error_exits_255(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        code = cli.main(argv)
        raise SystemExit(code)
    assert raised.value.code == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1
    assert err.startswith("fcvsock")


def test_missing_socket_named_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "absent.sock")
    code = cli.main(["run", "--connect-timeout", "0.2", missing, "--", "true"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILURE
    assert err.count(missing) == 1
    assert err.count("\n") == 1


def _serve_agent_via_entry_point(socket_path: Path) -> subprocess.Popen[bytes]:
    # The console entry point, as a systemd unit would start it.
    script = textwrap.dedent(
        f"""
        import sys
        from fcvsock.cli import entry_point
        sys.argv = ["fcvsock", "agent", "--unix", {str(socket_path)!r}]
        entry_point()
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail("agent did not start")
        time.sleep(0.02)
    return process


def _session(path: Path, request: StartRequest, stdin: bytes) -> tuple[int, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        for _ in range(200):
            try:
                sock.connect(str(path))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                time.sleep(0.02)
        sock.sendall(frame(FrameType.START, request.encode()))
        try:
            sock.sendall(frame(FrameType.STDIN, stdin) + frame(FrameType.EOF))
        except OSError:
            pass
        output = b""
        while True:
            frame_type, payload = read_frame(sock)
            if frame_type == FrameType.STDOUT:
                output += payload
            elif frame_type == FrameType.EXIT:
                return int.from_bytes(payload[:4], "little", signed=True), output


def test_agent_from_entry_point_survives_closed_stdin(tmp_path: Path) -> None:
    # head exits after one byte while the host still sends input, so the
    # agent writes into a closed pipe; SIGPIPE must not kill it.
    socket_path = tmp_path / "agent.sock"
    agent = _serve_agent_via_entry_point(socket_path)
    try:
        code, output = _session(
            socket_path, StartRequest(cmd=["head", "-c1"]), b"y\n" * (4 << 20)
        )
        assert output == b"y"
        assert code == 0
        assert agent.poll() is None
        code, output = _session(socket_path, StartRequest(cmd=["echo", "again"]), b"")
        assert output == b"again\n"
    finally:
        agent.terminate()
        agent.wait(timeout=20)


def test_sync_clock_names_socket_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "absent.sock")
    code = cli.main(["sync-clock", "--connect-timeout", "0.2", missing])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILURE
    assert err.count(missing) == 1
    assert "after" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-connections", "0", "vm.sock"],
        ["--boot-delay", "-1", "vm.sock"],
        ["--boot-delay", "nan", "vm.sock"],
        ["--max-sessions", "0", "vm.sock"],
    ],
)
def test_local_vm_rejects_bad_options(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["local-vm", *argv])
    assert raised.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
