"""Measure and print fcvsock's reliability figures.

Run from the repository root::

    python fuzz/reliability.py                  # about two minutes
    python fuzz/reliability.py --scale 1 --fuzz-seconds 60

It keeps concurrent sessions open on stand-in VMs, runs sequential cycles,
and runs commands that leave background children.  It then measures memory
peaks and rates under hostile guests, fuzzes the frame core, and runs the
fault and hostile-peer test files to count their cases.  Everything runs on
this machine against Unix sockets in temporary directories, and the figures
come out as a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import io
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
FUZZ_DIR = REPO_ROOT / "fuzz"
FAULT_TEST_FILES = [
    "tests/test_faults.py",
    "tests/test_hostile_agent.py",
    "tests/test_agent_hostile.py",
]
MIB = 1024 * 1024

# A guest in its own process, so its sends do not compete with the host for
# the GIL.  It replies to the handshake, reads START and floods empty frames
# of an unknown type until the host closes the connection.
FLOOD_GUEST = r"""
import socket, struct, sys
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sys.argv[1])
server.listen(4)
chunk = struct.pack("<BI", 0x7F, 0) * 200_000
while True:
    conn, _ = server.accept()
    try:
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        conn.sendall(b"OK 1073741824\n")
        _, length = struct.unpack("<BI", conn.recv(5, socket.MSG_WAITALL))
        conn.recv(length, socket.MSG_WAITALL)
        while True:
            conn.sendall(chunk)
    except OSError:
        pass
    finally:
        conn.close()
"""


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def mib(count: float) -> str:
    return f"{count / MIB:.1f} MiB"


# Load.


def load_figures(load: ModuleType, scale: float) -> list[tuple[str, str]]:
    per_vm = max(1, round(load.SESSIONS_PER_VM * scale))
    cycles = max(1, round(load.SEQUENTIAL_CYCLES * scale))
    commands = max(1, round(load.BACKGROUND_COMMANDS * scale))
    rows = []
    with tempfile.TemporaryDirectory(prefix="rel-") as directory:
        concurrent = load.measure_concurrent(directory, load.VM_COUNT, per_vm)
        sequential = load.measure_sequential(directory, cycles)
        background = load.measure_background_children(directory, commands)

    concurrent_text = (
        f"{concurrent['held_at_once']} of {concurrent['sessions']} across "
        f"{load.VM_COUNT} VMs, {len(concurrent['failures'])} failures, "
        f"{concurrent['seconds']:.1f} s"
    )
    rows.append(("concurrent sessions held (one process)", concurrent_text))
    concurrent_resources = (
        f"{concurrent['fds_before']} -> {concurrent['fds_after']} fds, "
        f"{mib(concurrent['rss_before'])} -> {mib(concurrent['rss_after'])}"
    )
    rows.append(("  host fds / host RSS before -> after", concurrent_resources))

    rate = sequential["cycles"] / sequential["seconds"]
    sequential_text = (
        f"{sequential['cycles']}, {len(sequential['failures'])} failures, "
        f"{rate:.0f} cycles/s"
    )
    rows.append(("sequential connect/run/close cycles", sequential_text))
    sequential_resources = (
        f"{sequential['fds_before']} -> {sequential['fds_after']} fds, "
        f"{mib(sequential['rss_before'])} -> {mib(sequential['rss_after'])}, "
        f"{mib(sequential['agent_rss_before'])} -> "
        f"{mib(sequential['agent_rss_after'])}"
    )
    rows.append(("  host fds / host RSS / agent RSS", sequential_resources))

    background_text = (
        f"{background['commands']}, {len(background['failures'])} failures, "
        f"{background['zombies']} zombies left"
    )
    rows.append(("commands leaving a background child", background_text))
    return rows


# Fault and hostile-peer cases.


class _OutcomeCounter:
    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (
            report.when == "setup" and report.outcome != "passed"
        ):
            key = "xfailed" if hasattr(report, "wasxfail") else report.outcome
            self.outcomes[key] = self.outcomes.get(key, 0) + 1


def fault_figures() -> list[tuple[str, str]]:
    import pytest

    rows = []
    for test_file in FAULT_TEST_FILES:
        counter = _OutcomeCounter()
        # pytest's progress output would break up the table on stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            pytest.main(
                [
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "--no-header",
                    "-o",
                    "addopts=",
                    test_file,
                ],
                plugins=[counter],
            )
        summary = ", ".join(
            f"{count} {name}" for name, count in sorted(counter.outcomes.items())
        )
        rows.append((f"cases in {test_file}", summary))
    return rows


# Fuzzing.


def fuzz_figures(fuzz_frames: ModuleType, seconds: int) -> list[tuple[str, str]]:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return [("frame core inputs fuzzed", _random_fuzz(fuzz_frames, seconds))]
    command = [
        sys.executable,
        str(FUZZ_DIR / "fuzz_frames.py"),
        f"-max_total_time={seconds}",
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )
    output = completed.stdout + completed.stderr
    runs = re.findall(r"Done (\d+) runs in (\d+) second", output)
    coverage = re.findall(r"cov: (\d+)", output)
    crashes = list((fuzz_frames.CRASH_DIR).glob("crash-*"))
    if completed.returncode != 0 or not runs:
        summary = f"atheris failed with exit code {completed.returncode}"
    else:
        count, took = runs[-1]
        summary = (
            f"{int(count):,} inputs in {took} s (atheris), "
            f"{coverage[-1] if coverage else '?'} coverage edges, "
            f"{len(crashes)} crash inputs kept"
        )
    return [("frame core inputs fuzzed", summary)]


def _random_fuzz(fuzz_frames: ModuleType, seconds: int) -> str:
    deadline = time.monotonic() + seconds
    count = 0
    while time.monotonic() < deadline:
        fuzz_frames.check_input(os.urandom(count % 600))
        count += 1
    return f"{count:,} random inputs in {seconds} s (atheris not installed)"


# Memory peaks and rates under hostile guests.


def memory_figures(hostile: ModuleType) -> list[tuple[str, str]]:
    from fcvsock import _core
    from fcvsock.protocol import MAX_OUTPUT_CHUNK, MAX_PAYLOAD

    rows = []
    decoder = _core.FrameDecoder()
    tracemalloc.start()
    try:
        decoder.feed(b"\x10\xff\xff\xff\xff")
    except ValueError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rows.append(("decoder peak on a 4 GiB length field", f"{peak / 1024:.1f} KiB"))

    with tempfile.TemporaryDirectory(prefix="rel-") as directory:
        path = os.path.join(directory, "vm.sock")
        chunk = hostile.stdout_frame(b"o" * MAX_OUTPUT_CHUNK)
        agent = hostile.HostileAgent(path, hostile.flood(chunk))
        try:
            for api in hostile.APIS:
                peak = hostile._slow_reader_peak(api, path, 4 * MIB)
                rows.append(
                    (
                        f"host peak, guest floods, max_buffered 4 MiB ({api})",
                        mib(peak),
                    )
                )
        finally:
            agent.close()

        path = os.path.join(directory, "empty.sock")
        frames = 1_000_000
        empty = hostile.stdout_frame(b"") * frames
        agent = hostile.HostileAgent(
            path,
            hostile.script(empty, hostile.stdout_frame(b"end"), hostile.exit_frame(0)),
        )
        try:
            import fcvsock

            started = time.monotonic()
            fcvsock.run(path, ["cmd"])
            seconds = time.monotonic() - started
        finally:
            agent.close()
        rows.append(
            (
                f"empty STDOUT frames parsed by run() ({_core.core_impl} core)",
                f"{frames / seconds / 1e6:.2f} M frames/s",
            )
        )
    rows.append(("largest frame accepted", mib(MAX_PAYLOAD)))
    return rows


def loop_stall_figures() -> list[tuple[str, str]]:
    import fcvsock.aio
    from fcvsock.errors import SessionTimeoutError

    with tempfile.TemporaryDirectory(prefix="rel-") as directory:
        path = os.path.join(directory, "flood.sock")
        guest = subprocess.Popen([sys.executable, "-c", FLOOD_GUEST, path])
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.01)

            async def measure() -> tuple[float, float, int]:
                gaps: list[float] = []
                running = True

                async def ticker() -> None:
                    last = time.monotonic()
                    while running:
                        await asyncio.sleep(0)
                        now = time.monotonic()
                        gaps.append(now - last)
                        last = now

                task = asyncio.create_task(ticker())
                started = time.monotonic()
                try:
                    await fcvsock.aio.run(path, ["cmd"], timeout=2.0)
                except SessionTimeoutError:
                    pass
                took = time.monotonic() - started
                running = False
                await task
                return took, max(gaps), len(gaps)

            took, worst_gap, ticks = asyncio.run(measure())
        finally:
            guest.kill()
            guest.wait()
    return [
        (
            "asyncio run(timeout=2) under an empty-frame flood",
            f"returned after {took:.2f} s",
        ),
        (
            "  longest event-loop stall meanwhile",
            f"{worst_gap * 1000:.0f} ms ({ticks} loop turns)",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=0.1,
        help="load scale: 1 is 1,000 concurrent sessions and 10,000 cycles "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--fuzz-seconds",
        type=int,
        default=30,
        help="seconds of fuzzing (default: %(default)s)",
    )
    parser.add_argument(
        "--skip-faults", action="store_true", help="do not run the fault test files"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(TESTS_DIR))
    sys.path.insert(0, str(REPO_ROOT))
    load = load_module(TESTS_DIR / "test_load.py", "reliability_load")
    hostile = load_module(TESTS_DIR / "test_hostile_agent.py", "reliability_hostile")
    fuzz_frames = load_module(FUZZ_DIR / "fuzz_frames.py", "fuzz_frames")
    from fcvsock import _core

    rows: list[tuple[str, str]] = []
    rows += load_figures(load, args.scale)
    rows += memory_figures(hostile)
    rows += loop_stall_figures()
    rows += fuzz_figures(fuzz_frames, args.fuzz_seconds)
    if not args.skip_faults:
        rows += fault_figures()

    print()
    print(
        f"fcvsock reliability figures: {_core.core_impl} frame core, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load scale {args.scale:g}"
    )
    print()
    print("| what | figure |")
    print("| --- | --- |")
    for name, figure in rows:
        print(f"| {name} | {figure} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
