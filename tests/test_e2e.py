"""Real commands through the whole path: client, stand-in VM, agent, process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import processes_with_args, wait_until

import fcvsock
import fcvsock.aio
from fcvsock.localvm import LocalVM


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalVM]:
    path = tmp_path_factory.mktemp("e2e") / "vm.sock"
    with LocalVM(path) as local_vm:
        yield local_vm


def test_urandom_100mb_byte_exact(vm: LocalVM, tmp_path: Path) -> None:
    source = tmp_path / "random.bin"
    cmd = ["sh", "-c", f"head -c 100000000 /dev/urandom > {source} && cat {source}"]
    digest = hashlib.sha256()
    received = 0
    status = None
    for item in fcvsock.stream(vm.uds_path, cmd, timeout=120):
        if isinstance(item, fcvsock.Output):
            assert item.stream == "stdout"
            digest.update(item.data)
            received += len(item.data)
        else:
            status = item
    assert status == fcvsock.ExitStatus(0, None) or status.exit_code == 0
    assert received == 100_000_000
    assert digest.hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()


def test_stdout_stderr_and_exit_code(vm: LocalVM) -> None:
    result = fcvsock.run(vm.uds_path, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert result.stdout == b"out\n"
    assert result.stderr == b"err\n"
    assert result.exit_code == 3
    assert result.signal is None


def test_stdout_stderr_asyncio(vm: LocalVM) -> None:
    cmd = ["sh", "-c", "echo out; echo err >&2; exit 3"]
    result = asyncio.run(fcvsock.aio.run(vm.uds_path, cmd))
    assert (result.stdout, result.stderr, result.exit_code) == (b"out\n", b"err\n", 3)


def test_one_mib_stdin_to_wc(vm: LocalVM) -> None:
    data = os.urandom(1 << 20)
    result = fcvsock.run(vm.uds_path, ["wc", "-c"], input=data)
    assert result.exit_code == 0
    assert result.stdout.strip() == b"1048576"


def test_stdin_round_trip_exact(vm: LocalVM) -> None:
    data = os.urandom(3 << 20)
    result = fcvsock.run(vm.uds_path, ["cat"], input=data)
    assert result.stdout == data


def test_tty_size_and_resize(vm: LocalVM) -> None:
    cmd = ["sh", "-c", "stty size; read line; stty size"]
    with fcvsock.exec(vm.uds_path, cmd, tty=True, tty_size=(100, 30), timeout=30) as session:
        output = b""
        for chunk in session:
            output += chunk.data
            if b"30 100" in output:
                break
        session.resize(120, 40)
        session.write(b"go\n")
        for chunk in session:
            output += chunk.data
        status = session.wait()
    assert status.exit_code == 0
    assert b"30 100" in output
    assert b"40 120" in output


def test_agent_timeout_kills_process_group(vm: LocalVM) -> None:
    seconds = str(300 + random.randrange(1_000_000))
    cmd = ["sh", "-c", f"sleep {seconds} & sleep {seconds}"]
    result = fcvsock.run(vm.uds_path, cmd, timeout_seconds=1, timeout=30)
    assert result.exit_code == 137
    assert result.signal == 9
    assert wait_until(lambda: not processes_with_args("sleep", seconds))


def test_command_not_found(vm: LocalVM) -> None:
    result = fcvsock.run(vm.uds_path, ["fcvsock-no-such-command"])
    assert result.exit_code == 127
    assert b"fcvsock-no-such-command" in result.stderr


def test_host_disconnect_kills_command(vm: LocalVM) -> None:
    seconds = str(300 + random.randrange(1_000_000))
    cmd = ["sh", "-c", f"echo started; exec sleep {seconds}"]
    with fcvsock.exec(vm.uds_path, cmd, timeout=30) as session:
        first = session.read()
        assert first is not None and first.data == b"started\n"
        assert wait_until(lambda: bool(processes_with_args("sleep", seconds)))
    assert wait_until(lambda: not processes_with_args("sleep", seconds))


def test_fifty_sessions_at_once(vm: LocalVM) -> None:
    async def run_all() -> list[fcvsock.RunResult]:
        return await asyncio.gather(
            *(
                fcvsock.aio.run(vm.uds_path, ["sh", "-c", f"echo {i}"], timeout=60)
                for i in range(50)
            )
        )

    results = asyncio.run(run_all())
    assert [r.stdout for r in results] == [f"{i}\n".encode() for i in range(50)]
    assert all(r.exit_code == 0 for r in results)


def test_clock_sync_moves_virtual_clock(vm: LocalVM) -> None:
    vm.snapshot()
    time.sleep(0.3)  # lets the guest clock fall behind, as a restore does
    vm.restore()
    assert vm.guest_time_ns() < time.time_ns() - 200_000_000

    sent_ns = fcvsock.sync_clock(vm.uds_path)
    guest_ns = vm.guest_time_ns()
    host_ns = time.time_ns()
    assert sent_ns <= guest_ns <= host_ns


def test_retry_across_boot_delay(tmp_path: Path) -> None:
    with LocalVM(tmp_path / "vm.sock", boot_delay=2.0) as booting:
        handshake = fcvsock.connect(booting.uds_path, 52, timeout=20)
        handshake.sock.close()
        assert handshake.attempts > 1
        result = fcvsock.run(booting.uds_path, ["echo", "up"], connect_timeout=20)
    assert result.stdout == b"up\n"


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "fcvsock", *args],
        input=stdin,
        capture_output=True,
        check=False,
        timeout=60,
    )


def test_cli_local_runs_command() -> None:
    done = _cli("run", "--local", "--", "sh", "-c", "echo hi; echo oops >&2; exit 5")
    assert done.stdout == b"hi\n"
    assert done.stderr == b"oops\n"
    assert done.returncode == 5


def test_cli_forwards_piped_stdin(vm: LocalVM) -> None:
    done = _cli("run", vm.uds_path, "--", "cat", stdin=b"hello through stdin\n")
    assert done.stdout == b"hello through stdin\n"
    assert done.returncode == 0


def test_cli_reports_missing_socket(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent.sock")
    done = _cli("run", "--connect-timeout", "0.3", missing, "--", "true")
    assert done.returncode == 255
    message = done.stderr.decode()
    assert missing in message
    assert "attempts" in message
    assert message.count("\n") == 1


def test_cli_signal_exit_status(vm: LocalVM) -> None:
    done = _cli("run", vm.uds_path, "--", "sh", "-c", "kill -TERM $$")
    assert done.returncode == 128 + 15


def test_cli_exits_while_stdin_stays_open(vm: LocalVM) -> None:
    # The command ignores stdin and exits; fcvsock must not wait for the
    # still-open pipe to reach EOF.
    process = subprocess.Popen(
        [sys.executable, "-m", "fcvsock", "run", vm.uds_path, "--", "echo", "done"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        returncode = process.wait(timeout=30)
        assert process.stdout is not None
        assert process.stdout.read() == b"done\n"
        assert returncode == 0
    finally:
        assert process.stdin is not None
        process.stdin.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_cli_closed_stdout_ends_quietly(vm: LocalVM) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "fcvsock", "run", vm.uds_path, "--", "yes"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.read(1) == b"y"
    process.stdout.close()
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=30) == 141
    assert b"Traceback" not in stderr
