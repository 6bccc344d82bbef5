"""Load from one process: many concurrent sessions, many sequential cycles.

Marked slow, so the default suite skips them; run them with ``-m slow``.
``FCVSOCK_LOAD_SCALE`` multiplies every count, so a CI run can use a small
form such as 0.1.  At the default of 1 the counts are 1,000 concurrent
sessions across 10 stand-in VMs, 10,000 sequential cycles, and 200 commands
that leave a background child.  Each measurement function returns its
figures, which ``fuzz/reliability.py`` prints as a table.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import fcvsock
import fcvsock.aio
from fcvsock.localvm import LocalVM

pytestmark = pytest.mark.slow

SCALE = float(os.environ.get("FCVSOCK_LOAD_SCALE", "1"))
VM_COUNT = 10
SESSIONS_PER_VM = 100
SEQUENTIAL_CYCLES = 10_000
BACKGROUND_COMMANDS = 200
DEADLINE = 120.0
MIB = 1024 * 1024


def scaled(count: int) -> int:
    return max(1, round(count * SCALE))


def open_fd_count() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def resident_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def zombie_children(parent: int) -> list[int]:
    """Return the pids of zombies whose parent is ``parent``."""
    zombies = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid ...
        fields = stat.rpartition(")")[2].split()
        if fields[0] == "Z" and int(fields[1]) == parent:
            zombies.append(int(entry))
    return zombies


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def start_vms(stack: ExitStack, directory: str, count: int) -> list[LocalVM]:
    vms = [
        LocalVM(os.path.join(directory, f"vm{index}.sock")) for index in range(count)
    ]
    for vm in vms:
        stack.callback(vm.close)
    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(lambda vm: vm.start(), vms))
    return vms


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to 107 bytes, so pytest's tmp_path may not fit.
    with tempfile.TemporaryDirectory(prefix="load-") as directory:
        yield directory


# Concurrent sessions.


async def _hold_session(
    path: str, index: int, ready: list[int], all_ready: asyncio.Event, total: int
) -> int:
    line = b"session %d\n" % index
    async with fcvsock.aio.exec(path, ["cat"], timeout=DEADLINE) as session:
        await session.write(line)
        echoed = b""
        while not echoed.endswith(line):
            item = await session.read()
            assert item is not None, f"session {index}: exit before echo"
            echoed += item.data
        ready[0] += 1
        if ready[0] == total:
            all_ready.set()
        await all_ready.wait()
        await session.close_stdin()
        status = await session.wait()
    return status.exit_code


async def _hold_all(
    paths: list[str], per_vm: int, vms: list[LocalVM]
) -> dict[str, Any]:
    total = len(paths) * per_vm
    ready = [0]
    all_ready = asyncio.Event()
    live_connections: list[int] = []

    async def watch() -> None:
        await all_ready.wait()
        live_connections.append(sum(vm.connections for vm in vms))

    watcher = asyncio.create_task(watch())
    tasks = [
        _hold_session(path, vm_index * per_vm + index, ready, all_ready, total)
        for vm_index, path in enumerate(paths)
        for index in range(per_vm)
    ]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    await watcher
    failures = [item for item in outcomes if item != 0]
    return {
        "sessions": total,
        "held_at_once": ready[0],
        "vm_connections_at_peak": live_connections[0] if live_connections else 0,
        "failures": failures,
    }


def measure_concurrent(directory: str, vm_count: int, per_vm: int) -> dict[str, Any]:
    """Hold ``vm_count * per_vm`` sessions at once; return the figures."""
    with ExitStack() as stack:
        vms = start_vms(stack, directory, vm_count)
        paths = [vm.uds_path for vm in vms]
        fds_before = open_fd_count()
        rss_before = resident_bytes()
        started = time.monotonic()
        figures = asyncio.run(_hold_all(paths, per_vm, vms))
        figures["seconds"] = time.monotonic() - started
        figures["fds_before"] = fds_before
        figures["fds_after"] = open_fd_count()
        figures["rss_before"] = rss_before
        figures["rss_after"] = resident_bytes()
    return figures


def test_concurrent_sessions(sock_dir: str) -> None:
    figures = measure_concurrent(sock_dir, VM_COUNT, scaled(SESSIONS_PER_VM))
    total = VM_COUNT * scaled(SESSIONS_PER_VM)
    assert figures["failures"] == []
    assert figures["held_at_once"] == total
    assert figures["vm_connections_at_peak"] == total
    assert figures["fds_after"] == figures["fds_before"]


# Sequential cycles.


def measure_sequential(directory: str, cycles: int) -> dict[str, Any]:
    """Run ``cycles`` connect/run/close cycles on one VM; return the figures."""
    failures: list[BaseException] = []
    with LocalVM(os.path.join(directory, "seq.sock")) as vm:
        assert vm.agent_pid is not None
        warmup = max(1, cycles // 10)
        for _ in range(warmup):
            fcvsock.run(vm.uds_path, ["true"], timeout=DEADLINE)
        fds_before = open_fd_count()
        rss_before = resident_bytes()
        agent_rss_before = resident_bytes(vm.agent_pid)
        started = time.monotonic()
        for _ in range(cycles):
            try:
                result = fcvsock.run(vm.uds_path, ["true"], timeout=DEADLINE)
                if result.exit_code != 0:
                    failures.append(AssertionError(f"exit code {result.exit_code}"))
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                failures.append(exc)
        seconds = time.monotonic() - started
        wait_until(lambda: vm.connections == 0)
        figures = {
            "cycles": cycles,
            "seconds": seconds,
            "failures": failures,
            "fds_before": fds_before,
            "fds_after": open_fd_count(),
            "rss_before": rss_before,
            "rss_after": resident_bytes(),
            "agent_rss_before": agent_rss_before,
            "agent_rss_after": resident_bytes(vm.agent_pid),
            "vm_connections_after": vm.connections,
        }
    return figures


def test_sequential_cycles(sock_dir: str) -> None:
    figures = measure_sequential(sock_dir, scaled(SEQUENTIAL_CYCLES))
    assert figures["failures"] == []
    assert figures["fds_after"] == figures["fds_before"]
    assert figures["vm_connections_after"] == 0
    assert figures["rss_after"] - figures["rss_before"] < 16 * MIB
    assert figures["agent_rss_after"] - figures["agent_rss_before"] < 16 * MIB


# Background children and zombies.


def measure_background_children(directory: str, commands: int) -> dict[str, Any]:
    """Run commands that leave a background child; count zombies afterwards."""
    failures: list[BaseException] = []
    lock = threading.Lock()
    with LocalVM(os.path.join(directory, "bg.sock")) as vm:
        agent_pid = vm.agent_pid
        assert agent_pid is not None

        def run_one(_: int) -> None:
            try:
                result = fcvsock.run(
                    vm.uds_path, ["sh", "-c", "sleep 0.1 &"], timeout=DEADLINE
                )
                if result.exit_code != 0:
                    raise AssertionError(f"exit code {result.exit_code}")
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                with lock:
                    failures.append(exc)

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(run_one, range(commands)))
        seconds = time.monotonic() - started
        settled = wait_until(lambda: not zombie_children(agent_pid), timeout=5.0)
        figures = {
            "commands": commands,
            "seconds": seconds,
            "failures": failures,
            "zombies_settled": settled,
            "zombies": len(zombie_children(agent_pid)),
        }
    return figures


def test_background_children_reaped(sock_dir: str) -> None:
    figures = measure_background_children(sock_dir, scaled(BACKGROUND_COMMANDS))
    assert figures["failures"] == []
    assert figures["zombies_settled"]
    assert figures["zombies"] == 0
