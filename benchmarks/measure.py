"""Interleaved repetitions, medians and ratios, and child-process plumbing.

Every comparison runs its contenders in turn within one repetition (A B C,
then B C A, ...), so slow phases of a shared, noisy machine hit all of them.
Ratios are the median over repetitions of the per-repetition ratio, which
cancels drift between repetitions; medians of absolute values are reported
beside them.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_READY_TIMEOUT = 60.0


def run_interleaved(
    trials: Mapping[str, Callable[[], T]], repetitions: int
) -> dict[str, list[T]]:
    """Run each trial once per repetition, rotating the order every time."""
    names = list(trials)
    samples: dict[str, list[T]] = {name: [] for name in names}
    for repetition in range(repetitions):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(trials[name]())
    return samples


def calibrate(
    trial: Callable[[int], float],
    units: int,
    target_seconds: float,
    max_units: int,
) -> int:
    """Return how many units of work make ``trial(units)`` last ``target_seconds``.

    Starts at ``units`` and grows it until a trial lasts a tenth of the
    target, then scales linearly; the trials also warm caches and allocators.
    """
    units = max(1, min(units, max_units))
    elapsed = trial(units)
    while elapsed < target_seconds / 10 and units < max_units:
        units = min(units * 8, max_units)
        elapsed = trial(units)
    scaled = int(units * target_seconds / max(elapsed, 1e-9))
    return max(1, min(scaled, max_units))


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Return the median, min, max and every sample."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "samples": list(values),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Return the median of per-repetition ratios ``numerator / denominator``."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True) if b > 0]
    return statistics.median(ratios) if ratios else float("nan")


def rates(work: float, seconds: Sequence[float]) -> list[float]:
    """Convert trial durations to rates of ``work`` units per second."""
    return [work / elapsed for elapsed in seconds]


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return an environment in which ``python -m benchmarks.child`` imports."""
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = root if not existing else root + os.pathsep + existing
    if extra:
        env.update(extra)
    return env


def child_command(role: str, *arguments: str) -> list[str]:
    """Return the command line of one child role."""
    return [sys.executable, "-m", "benchmarks.child", role, *arguments]


@contextmanager
def server_child(
    role: str, *arguments: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server role, wait for its ``ready`` line, stop it on exit.

    The child exits when its stdin closes; it is killed by pid only if it
    has not exited 30 s after that.
    """
    process = subprocess.Popen(
        child_command(role, *arguments),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=child_environment(env),
        cwd=REPO_ROOT,
    )
    try:
        _wait_ready(process)
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def _wait_ready(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + CHILD_READY_TIMEOUT
    received = b""
    while not received.endswith(b"ready\n"):
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([fd], [], [], max(0.0, remaining))
        if not readable:
            raise RuntimeError(
                f"start {process.args!r}: no ready line within "
                f"{CHILD_READY_TIMEOUT:g} s"
            )
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(
                f"start {process.args!r}: exited with {process.wait()} before "
                f"writing a ready line"
            )
        received += chunk


def run_child_json(
    command: Sequence[str], *, env: dict[str, str] | None = None, timeout: float
) -> Any:
    """Run a workload child to completion and return the JSON it printed."""
    completed = subprocess.run(
        list(command),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=child_environment(env),
        cwd=REPO_ROOT,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"run {' '.join(command)}: exit status {completed.returncode}, "
            f"expected 0; stderr: {completed.stderr.decode(errors='replace')[-2000:]}"
        )
    return json.loads(completed.stdout)
