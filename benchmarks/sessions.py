"""Many sessions: ``true`` on N stand-in VMs, and many sessions on one VM.

One child process hosts ``max(N)`` stand-in VMs, each with its own muxer
thread and agent process.  The smaller N use the first N of them, and the
rest stay idle meanwhile.  Two ways to run the sessions, interleaved:

- ``aio/concurrent``: one :func:`fcvsock.aio.run` per session, all gathered
  on one event loop;
- ``blocking/sequential``: :func:`fcvsock.run` for one session after another.

Wall time runs from the first connect to the last exit status.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import fcvsock
import fcvsock.aio
from benchmarks import measure, standin

FULL_VM_COUNTS = [1, 10, 100]
QUICK_VM_COUNTS = [1, 2]
FULL_SESSIONS_ON_ONE_VM = 100
QUICK_SESSIONS_ON_ONE_VM = 4
COMMAND = ["true"]


async def _gather_runs(paths: Sequence[str]) -> None:
    results = await asyncio.gather(*(fcvsock.aio.run(path, COMMAND) for path in paths))
    _check(results)


def run_concurrent(paths: Sequence[str]) -> float:
    start = time.perf_counter()
    asyncio.run(_gather_runs(paths))
    return time.perf_counter() - start


def run_sequential(paths: Sequence[str]) -> float:
    start = time.perf_counter()
    _check([fcvsock.run(path, COMMAND) for path in paths])
    return time.perf_counter() - start


def _check(results: Sequence[fcvsock.RunResult]) -> None:
    failed = [r for r in results if r.exit_code != 0]
    if failed:
        raise RuntimeError(f"sessions: {len(failed)} runs of true failed: {failed[0]}")


def _compare(paths: Sequence[str], repetitions: int) -> dict[str, Any]:
    trials = {
        "aio/concurrent": lambda: run_concurrent(paths),
        "blocking/sequential": lambda: run_sequential(paths),
    }
    seconds = measure.run_interleaved(trials, repetitions)
    per_second = {name: measure.rates(len(paths), v) for name, v in seconds.items()}
    return {
        "sessions": len(paths),
        "wall_s": {name: measure.summarize(v) for name, v in seconds.items()},
        "sessions_per_s": {
            name: measure.summarize(v) for name, v in per_second.items()
        },
        "ratios": {
            "aio/concurrent / blocking/sequential": measure.paired_ratio(
                per_second["aio/concurrent"], per_second["blocking/sequential"]
            )
        },
    }


def run(quick: bool, repetitions: int) -> dict[str, Any]:
    """Measure wall time and sessions/s across VMs and on one VM."""
    if not standin.has_agent():
        return {"skipped": f"stand-in VM has no agent ({standin.kind()})"}
    vm_counts = QUICK_VM_COUNTS if quick else FULL_VM_COUNTS
    on_one_vm = QUICK_SESSIONS_ON_ONE_VM if quick else FULL_SESSIONS_ON_ONE_VM
    with tempfile.TemporaryDirectory(prefix="fcvsock-bench-") as directory:
        start = time.perf_counter()
        with standin.stand_in_vms(directory, max(vm_counts)) as paths:
            startup = time.perf_counter() - start
            across = {str(n): _compare(paths[:n], repetitions) for n in vm_counts}
            one_vm = _compare([paths[0]] * on_one_vm, repetitions)
    return {
        "unit": "sessions/s of `true`, connect to exit status",
        "vms_started": max(vm_counts),
        "vm_startup_s": startup,
        "one_session_per_vm": across,
        "many_sessions_on_one_vm": one_vm,
    }
