"""Count system calls two ways: ``strace -c -f`` on a child, and in process.

strace counts every call the kernel saw, including those the compiled core
makes from C.  A workload child runs twice, with ``n`` units of work and
with none.  The difference divided by ``n`` is the count per unit, free of
interpreter start-up and imports.

The in-process counter wraps the Python-level functions that issue I/O
calls.  It sees what pure-Python code calls and nothing made from C, and a
``sendall`` that loops inside CPython counts once.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from benchmarks import measure

# Calls that move stream bytes or wait for a socket.
IO_CALLS = frozenset(
    {
        "read", "readv", "recvfrom", "recvmsg", "write", "writev", "sendto",
        "sendmsg", "poll", "ppoll", "select", "pselect6", "epoll_wait",
        "epoll_pwait", "epoll_pwait2",
    }
)  # fmt: skip
WAIT_CALLS = frozenset(
    {"poll", "ppoll", "select", "pselect6", "epoll_wait", "epoll_pwait", "epoll_pwait2"}
)
STRACE_TIMEOUT = 300.0


def strace_available() -> bool:
    """True when strace exists and may trace a child here."""
    if shutil.which("strace") is None:
        return False
    completed = subprocess.run(
        ["strace", "-f", "-c", "-o", os.devnull, "true"],
        capture_output=True,
        check=False,
    )
    return completed.returncode == 0


def parse_strace_summary(text: str) -> Counter[str]:
    """Return calls per syscall from the table ``strace -c`` writes."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[0][0].isdigit():
            continue
        name = fields[-1]
        if name == "total":
            continue
        # Columns: % time, seconds, usecs/call, calls, [errors,] syscall.
        counts[name] += int(fields[3])
    return counts


def strace_counts(
    command: Sequence[str], env: dict[str, str] | None = None
) -> Counter[str]:
    """Run ``command`` under ``strace -c -f`` and return calls per syscall."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as output:
        full = ["strace", "-f", "-c", "-o", output.name, *command]
        measure.run_child_json(full, env=env, timeout=STRACE_TIMEOUT)
        return parse_strace_summary(output.read())


def per_unit(loaded: Counter[str], empty: Counter[str], units: int) -> dict[str, float]:
    """Return (loaded - empty) / units per syscall, dropping calls at zero."""
    result: dict[str, float] = {}
    for name in set(loaded) | set(empty):
        difference = (loaded[name] - empty[name]) / units
        if difference:
            result[name] = difference
    return dict(sorted(result.items()))


def summarize_per_unit(calls: dict[str, float]) -> dict[str, Any]:
    """Return totals for all calls, I/O calls and wait calls, with the detail."""
    return {
        "all": sum(calls.values()),
        "io": sum(v for k, v in calls.items() if k in IO_CALLS),
        "wait": sum(v for k, v in calls.items() if k in WAIT_CALLS),
        "by_call": calls,
    }


def strace_per_unit(
    command_for: Callable[[int], Sequence[str]], units: int
) -> dict[str, Any]:
    """Trace ``command_for(units)`` and ``command_for(0)``; return counts per unit."""
    loaded = strace_counts(command_for(units))
    empty = strace_counts(command_for(0))
    return summarize_per_unit(per_unit(loaded, empty, units))


class _CountingPoll:
    def __init__(self, counts: Counter[str], real: Any) -> None:
        self._counts = counts
        self._poll = real

    def register(self, *args: Any) -> None:
        self._poll.register(*args)

    def unregister(self, *args: Any) -> None:
        self._poll.unregister(*args)

    def modify(self, *args: Any) -> None:
        self._poll.modify(*args)

    def poll(self, *args: Any) -> Any:
        self._counts["poll"] += 1
        return self._poll.poll(*args)


def _counting(counts: Counter[str], name: str, function: Callable[..., Any]) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return function(*args, **kwargs)

    return wrapper


@contextmanager
def count_python_calls() -> Iterator[Counter[str]]:
    """Count Python-level I/O calls made inside the block.

    Wraps ``os.read``/``readv``/``write``/``writev``, the ``socket.socket``
    send and receive methods, and ``select.poll`` objects; restores them on
    exit.
    """
    counts: Counter[str] = Counter()
    saved_os = {
        name: getattr(os, name) for name in ("read", "readv", "write", "writev")
    }
    socket_methods = ("send", "sendall", "sendmsg", "recv", "recv_into", "recvmsg")
    saved_socket = {name: getattr(socket.socket, name) for name in socket_methods}
    # The methods are inherited from _socket.socket; delete the wrappers
    # afterwards instead of shadowing the originals with class attributes.
    inherited = {name for name in socket_methods if name not in vars(socket.socket)}
    real_poll = select.poll

    def counting_poll() -> Any:
        return _CountingPoll(counts, real_poll())

    try:
        for name, function in saved_os.items():
            setattr(os, name, _counting(counts, name, function))
        for name, function in saved_socket.items():
            setattr(socket.socket, name, _counting(counts, name, function))
        select.poll = counting_poll  # type: ignore[misc,assignment]
        yield counts
    finally:
        for name, function in saved_os.items():
            setattr(os, name, function)
        for name, function in saved_socket.items():
            if name in inherited:
                delattr(socket.socket, name)
            else:
                setattr(socket.socket, name, function)
        select.poll = real_poll  # type: ignore[misc]
