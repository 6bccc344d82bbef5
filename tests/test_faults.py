"""Faults of the VMM and the guest, through the stand-in VM and its agent.

Each test starts its own :class:`~fcvsock.localvm.LocalVM`, because the
faults leave it broken or changed.  Calls that could hang run in a worker
thread with a guard, as in ``test_hostile_agent.py``.  Every process a test
kills is one that this product started: the VM's agent or a command the
agent spawned.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from scripted_peer import watch_retries

import fcvsock
import fcvsock.aio
from fcvsock.errors import (
    ConnectionLostError,
    HandshakeTimeoutError,
    SessionTimeoutError,
)
from fcvsock.localvm import LocalVM
from fcvsock.muxer import FIRST_HOST_PORT

APIS = ["blocking", "asyncio"]
GUARD = 20.0
HOST_TIMEOUT = 1.0
SHORT_CONNECT = 0.3
# A command that reports it runs and then waits, so a test can act mid-session.
RUNNING = ["sh", "-c", "echo up; exec sleep 30"]


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to 107 bytes, so pytest's tmp_path may not fit.
    with tempfile.TemporaryDirectory(prefix="faults-") as directory:
        yield directory


@pytest.fixture
def vm(sock_dir: str) -> Iterator[LocalVM]:
    with LocalVM(os.path.join(sock_dir, "vm.sock")) as machine:
        yield machine


@dataclass
class Outcome:
    result: Any
    error: BaseException | None
    hung: bool


class Worker:
    """Runs one call in a thread and keeps its result or exception."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._box: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            self._box["error"] = exc

    def join(self, limit: float = GUARD) -> Outcome:
        self._thread.join(limit)
        return Outcome(
            self._box.get("result"), self._box.get("error"), self._thread.is_alive()
        )


def run_command(api: str, path: str, cmd: list[str], **options: Any) -> Any:
    if api == "blocking":
        return fcvsock.run(path, cmd, **options)
    return asyncio.run(fcvsock.aio.run(path, cmd, **options))


def wait_for(predicate: Callable[[], Any], timeout: float = GUARD) -> Any:
    """Poll ``predicate`` until it returns a true value; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {predicate!r}")
        time.sleep(0.01)


def children_of(pid: int) -> list[int]:
    """Return the child pids of ``pid``, or an empty list once it is gone."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(word) for word in text.split()]


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def sleeping_children(vm: LocalVM) -> list[int]:
    """Return the agent's children that run ``sleep``."""
    assert vm.agent_pid is not None
    return [pid for pid in children_of(vm.agent_pid) if command_name(pid) == "sleep"]


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("api", APIS)
def test_abort_mid_stream(vm: LocalVM, api: str) -> None:
    # The agent's first frame, STDOUT "up\n", is 8 bytes; the VM closes after it.
    vm.faults.abort_after_bytes = 8
    worker = Worker(lambda: run_command(api, vm.uds_path, RUNNING, timeout=GUARD))
    outcome = worker.join()
    assert not outcome.hung
    assert isinstance(outcome.error, ConnectionLostError)
    assert outcome.error.stdout == b"up\n"


def test_abort_kills_command(vm: LocalVM) -> None:
    vm.faults.abort_after_bytes = 8
    with pytest.raises(ConnectionLostError):
        fcvsock.run(vm.uds_path, RUNNING, timeout=GUARD)
    assert wait_for(lambda: not sleeping_children(vm))


@pytest.mark.parametrize("unread", [False, True], ids=["clean", "unread-bytes"])
def test_abort_live_session(vm: LocalVM, unread: bool) -> None:
    vm.agent_data_path = "relay"
    cmd = ["sh", "-c", "echo up; exec cat"]
    with fcvsock.exec(vm.uds_path, cmd, timeout=GUARD) as session:
        first = session.read()
        assert first is not None
        assert first.data == b"up\n"
        assert vm.abort(unread_host_bytes=unread) == 1
        if unread:
            # The VM closes only after the host wrote bytes it will not read.
            session.write(b"never read\n")
        with pytest.raises(ConnectionLostError):
            session.read()


@pytest.mark.parametrize("api", APIS)
def test_snapshot_silence_hits_deadline(vm: LocalVM, api: str) -> None:
    vm.agent_data_path = "relay"
    worker = Worker(lambda: run_command(api, vm.uds_path, RUNNING, timeout=2.0))
    wait_for(lambda: sleeping_children(vm))
    vm.snapshot()
    outcome = worker.join()
    vm.restore()
    assert not outcome.hung
    assert isinstance(outcome.error, SessionTimeoutError)
    assert outcome.error.stdout == b"up\n"


def test_snapshot_new_connect_hangs(vm: LocalVM) -> None:
    vm.snapshot()
    try:
        with pytest.raises(HandshakeTimeoutError):
            fcvsock.run(vm.uds_path, ["true"], connect_timeout=SHORT_CONNECT)
    finally:
        vm.restore()


@pytest.mark.parametrize("api", APIS)
def test_fresh_connect_after_restore(vm: LocalVM, api: str) -> None:
    vm.agent_data_path = "relay"
    with fcvsock.exec(vm.uds_path, ["cat"]) as session:
        vm.snapshot()
        vm.restore()
        with pytest.raises(SessionTimeoutError):
            session.wait(timeout=0.2)
    result = run_command(api, vm.uds_path, ["echo", "ok"], timeout=GUARD)
    assert result.exit_code == 0
    assert result.stdout == b"ok\n"


def test_restore_hang_then_connect(vm: LocalVM) -> None:
    vm.snapshot()
    vm.restore(hang=0.5)
    result = fcvsock.run(vm.uds_path, ["echo", "ok"], connect_timeout=GUARD)
    assert result.stdout == b"ok\n"


@pytest.mark.parametrize("api", APIS)
def test_agent_killed_mid_session(vm: LocalVM, api: str) -> None:
    worker = Worker(lambda: run_command(api, vm.uds_path, RUNNING, timeout=GUARD))
    orphans = wait_for(lambda: sleeping_children(vm))
    agent_pid = vm.agent_pid
    assert agent_pid is not None
    try:
        os.kill(agent_pid, signal.SIGKILL)
        outcome = worker.join()
    finally:
        for pid in orphans:
            kill_quietly(pid)
    assert not outcome.hung
    assert isinstance(outcome.error, ConnectionLostError)


def process_state(pid: int) -> str:
    """Return the state letter of ``pid`` from /proc, or "gone"."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat.rpartition(")")[2].split()[0]


def test_connect_after_agent_killed(vm: LocalVM) -> None:
    agent_pid = vm.agent_pid
    assert agent_pid is not None
    os.kill(agent_pid, signal.SIGKILL)
    # A zombie has closed its fds, so the VM's handoff channel has ended.
    wait_for(lambda: process_state(agent_pid) in ("Z", "gone"))
    with pytest.raises(HandshakeTimeoutError):
        fcvsock.run(vm.uds_path, ["true"], connect_timeout=SHORT_CONNECT)


def test_socket_path_removed(vm: LocalVM) -> None:
    os.unlink(vm.uds_path)
    with pytest.raises(HandshakeTimeoutError) as info:
        fcvsock.run(vm.uds_path, ["true"], connect_timeout=SHORT_CONNECT)
    last_error = info.value.last_error
    assert isinstance(last_error, OSError)
    assert last_error.errno == errno.ENOENT


def test_socket_path_recreated(vm: LocalVM, sock_dir: str) -> None:
    path = vm.uds_path
    os.unlink(path)
    with watch_retries() as watcher:
        worker = Worker(
            lambda: fcvsock.exec(path, ["echo", "ok"], connect_timeout=GUARD)
        )
        assert watcher.retried.wait(GUARD)
        with LocalVM(path) as replacement:
            outcome = worker.join()
            assert outcome.error is None
            with outcome.result as session:
                assert session.host_port == FIRST_HOST_PORT
                assert session.wait().exit_code == 0
            vm.close()
            assert os.path.exists(path)
            result = fcvsock.run(path, ["true"], connect_timeout=GUARD)
            assert result.exit_code == 0
            wait_for(lambda: replacement.connections == 0)


def test_connection_cap_reached(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "vm.sock")
    with LocalVM(path, max_connections=2) as vm:
        first = fcvsock.exec(path, ["cat"])
        second = fcvsock.exec(path, ["cat"])
        try:
            with pytest.raises(HandshakeTimeoutError):
                fcvsock.run(path, ["true"], connect_timeout=SHORT_CONNECT)
        finally:
            first.close()
        wait_for(lambda: vm.connections < 2)
        result = fcvsock.run(path, ["echo", "ok"], connect_timeout=GUARD)
        second.close()
    assert result.stdout == b"ok\n"


def test_connection_cap_then_all_closed(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "vm.sock")
    with LocalVM(path, max_connections=3) as vm:
        sessions = [fcvsock.exec(path, ["cat"]) for _ in range(3)]
        for session in sessions:
            session.close()
        wait_for(lambda: vm.connections == 0)
        results = [fcvsock.run(path, ["true"], connect_timeout=GUARD) for _ in range(6)]
    assert [result.exit_code for result in results] == [0] * 6
