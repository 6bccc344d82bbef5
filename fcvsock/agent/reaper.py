"""Reaping the agent's children and passing each wait status to its session."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Callable

log = logging.getLogger("fcvsock.agent")

# From <linux/prctl.h>.
_PR_SET_CHILD_SUBREAPER = 36


def set_child_subreaper() -> None:
    """Make orphaned descendants of this process its children (prctl(2)).

    The agent then reaps them, as an init process would.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl PR_SET_CHILD_SUBREAPER failed: {os.strerror(code)}")


def _exit_status(wait_status: int) -> tuple[int, int]:
    """Return ``(exit_code, signal)`` with 128+N and N for death by signal N."""
    if os.WIFSIGNALED(wait_status):
        signal_number = os.WTERMSIG(wait_status)
        return 128 + signal_number, signal_number
    return os.WEXITSTATUS(wait_status), 0


class _Reaper:
    """Reaps children on SIGCHLD and hands each wait status to its session.

    With ``reap_orphans`` it reaps any child, including orphans reparented to
    the agent as PID 1 or as a subreaper, and discards statuses of unknown
    pids.  Without it, it waits only for the pids it spawned, so an agent
    embedded in a bigger program leaves that program's children alone.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, reap_orphans: bool) -> None:
        self._loop = loop
        self._reap_orphans = reap_orphans
        self._children: dict[
            int, tuple[subprocess.Popen[bytes], Callable[[int], None] | None]
        ] = {}

    @property
    def watched(self) -> int:
        return len(self._children)

    def install(self) -> None:
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        self._loop.remove_signal_handler(signal.SIGCHLD)

    def watch(
        self, popen: subprocess.Popen[bytes], on_exit: Callable[[int], None]
    ) -> None:
        self._children[popen.pid] = (popen, on_exit)

    def forget(self, pid: int) -> None:
        entry = self._children.get(pid)
        if entry is not None:
            self._children[pid] = (entry[0], None)

    def reap(self) -> None:
        if self._reap_orphans:
            self._reap_any()
            return
        for pid in list(self._children):
            self._reap_one(pid)

    def _reap_any(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._dispatch(pid, wait_status)

    def _reap_one(self, pid: int) -> None:
        try:
            reaped, wait_status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            log.warning("reap pid %d: another waiter took its exit status", pid)
            reaped, wait_status = pid, 255 << 8
        if reaped:
            self._dispatch(pid, wait_status)

    def _dispatch(self, pid: int, wait_status: int) -> None:
        entry = self._children.pop(pid, None)
        if entry is None:
            log.debug("reaped orphan pid %d with wait status %#x", pid, wait_status)
            return
        popen, on_exit = entry
        # Popen.__del__ waits again for a child whose returncode is unset, which
        # could steal the status of a later child that reuses the pid.
        popen.returncode = os.waitstatus_to_exitcode(wait_status)
        if on_exit is None:
            return
        try:
            on_exit(wait_status)
        except Exception:
            log.exception("handle exit of pid %d", pid)
