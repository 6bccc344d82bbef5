"""Describe the machine and the software a benchmark run used."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Any

import fcvsock
from fcvsock import _core


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=False,
        )
    except OSError:
        return None
    return completed.stdout.strip() or None


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages."""
    return list(os.getloadavg())


def describe() -> dict[str, Any]:
    """Return CPU, cores, memory, kernel, Python, date, commit and frame core."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_bytes": _memory_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "fcvsock_version": fcvsock.__version__,
        "git_commit": _git_commit(),
        "compiled_core_built": _core.cython_core is not None,
        "core_in_use": _core.core_impl,
        "load_average_start": load_average(),
    }
