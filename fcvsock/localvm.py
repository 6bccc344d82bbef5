"""A local stand-in for a microVM: the VMM's hybrid-vsock socket and an agent.

The muxer (:mod:`fcvsock.muxer`) runs on its own asyncio loop in a background
thread, so blocking and asyncio code can drive the same VM.  The reference
agent runs as a child process in its own session.  Its sockets and clock file
live in a private temporary directory, and guest port 52 leads to it.

Run ``python -m fcvsock.localvm PATH`` to serve one until Ctrl-C, SIGTERM or
SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType, TracebackType
from typing import Any, Self, TypeVar

from .clock import VirtualClock
from .errors import FcvsockError
from .muxer import (
    DEFAULT_MAX_CONNECTIONS,
    GARBAGE_REPLIES,
    AgentLink,
    Faults,
    Muxer,
    Parser,
    Reply,
)
from .protocol import AGENT_PORT

__all__ = [
    "GARBAGE_REPLIES",
    "Faults",
    "LocalVM",
    "LocalVMError",
    "Parser",
    "Reply",
    "main",
]

logger = logging.getLogger("fcvsock.localvm")

_T = TypeVar("_T")
_READY_LINE = b"ready\n"
_CALL_TIMEOUT = 10.0
_AGENT_STOP_TIMEOUT = 5.0


class LocalVMError(FcvsockError):
    """The stand-in VM could not start or its agent failed."""


class LocalVM:
    """The VMM side of a hybrid-vsock socket at ``uds_path``, with an agent.

    ``parser`` is ``"firecracker"`` (one-shot command parsing) or
    ``"cloud-hypervisor"`` (waits for a split line).  For ``boot_delay``
    seconds from the end of :meth:`start`, nothing listens on port 52, so
    connections to it get EOF before any reply.  ``max_connections`` live
    connections are served; more are accepted and closed at once.  With
    ``agent=False`` no agent runs and port 52 is served only through
    :meth:`listen`.  ``max_sessions``, ``default_cwd`` and ``agent_log_level``
    are passed to the agent; ``agent_command`` replaces the command that
    starts it (``python -m fcvsock.agent``).  The command also gets the
    options ``--handoff``, ``--unix``, ``--clock``, ``--ready-fd`` and
    ``--exit-with-handoff``.  That last one makes the agent stop, killing
    its commands, when this process dies without :meth:`close`.

    Switch faults at run time through :attr:`faults` (a
    :class:`~fcvsock.muxer.Faults`) and the scenario methods.  Every method
    is safe to call from any thread except the VM's own loop thread.
    """

    def __init__(
        self,
        uds_path: str | os.PathLike[str],
        *,
        parser: Parser | str = Parser.FIRECRACKER,
        boot_delay: float = 0.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        agent: bool = True,
        max_sessions: int | None = None,
        default_cwd: str | None = None,
        agent_log_level: str | None = None,
        agent_command: Sequence[str] | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.faults = Faults()
        self._muxer = Muxer(
            os.fspath(uds_path),
            parser=parser,
            max_connections=max_connections,
            faults=self.faults,
        )
        self._boot_delay = boot_delay
        self._with_agent = agent
        self._agent_options = _agent_options(max_sessions, default_cwd, agent_log_level)
        self._agent_command = (
            list(agent_command)
            if agent_command is not None
            else [sys.executable, "-m", "fcvsock.agent"]
        )
        self._start_timeout = start_timeout
        self._state_dir: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._agent: subprocess.Popen[bytes] | None = None
        self._agent_finalizer: weakref.finalize[Any, Any] | None = None
        self._files_finalizer: weakref.finalize[Any, Any] | None = None
        self._bind_later: concurrent.futures.Future[None] | None = None
        self._snapshot_ns: int | None = None

    # Life cycle.

    def start(self, *, create_socket_after: float | None = 0.0) -> Self:
        """Start the loop thread and the agent, then create the socket file.

        Returns once the agent is ready.  ``create_socket_after`` delays the
        socket file by that many seconds after this returns; ``None`` leaves
        it absent until :meth:`create_socket`.
        """
        if self._loop is not None:
            raise LocalVMError("local vm: start: already started")
        try:
            self._state_dir = tempfile.mkdtemp(prefix="fcvsock-localvm-")
            self._files_finalizer = weakref.finalize(
                self, _remove_files, self._muxer, self._state_dir
            )
            self._start_loop()
            if self._with_agent:
                self._start_agent()
            if self._boot_delay > 0:
                self.no_listener_for(self._boot_delay, AGENT_PORT)
            self._open_socket(create_socket_after)
        except BaseException:
            self.close()
            raise
        return self

    def create_socket(self) -> None:
        """Create the socket file now, if it does not exist yet."""
        self._run(self._muxer.bind())

    def close(self) -> None:
        """Close every connection, stop the agent and remove the VM's files.

        The files are the socket file and the temporary directory of the
        agent's sockets and clock.  Ends only the agent process this VM
        started and waits for it.  Safe to call more than once.  A VM that
        is never closed is cleaned up the same way when it is garbage
        collected or the interpreter exits.
        """
        if self._bind_later is not None:
            self._bind_later.cancel()
            self._bind_later = None
        try:
            if self._loop is not None:
                self._run(self._muxer.close())
        finally:
            try:
                self._stop_agent()
                self._stop_loop()
            finally:
                self._remove_files()

    def __enter__(self) -> Self:
        if self._loop is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        if self._loop is None:
            await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    # What tests look at.

    @property
    def uds_path(self) -> str:
        """Path of the hybrid-vsock socket file."""
        return self._muxer.uds_path

    @property
    def connections(self) -> int:
        """Live guest connections, relayed or handed off to the agent."""
        return self._muxer.connections

    @property
    def host_ports_assigned(self) -> list[int]:
        """Host ports assigned so far, in order: the last 10,000 of them."""
        return list(self._muxer.host_ports_assigned)

    @property
    def agent_pid(self) -> int | None:
        """Process id of the agent, while it runs."""
        return self._agent.pid if self._agent is not None else None

    @property
    def agent_unix_path(self) -> str | None:
        """The agent's own stream listener, which skips the handshake."""
        return self._state_path("agent.sock") if self._with_agent else None

    @property
    def agent_data_path(self) -> str:
        """``"handoff"`` (the default) or ``"relay"`` for new port 52 streams."""
        return self._muxer.agent_data_path

    @agent_data_path.setter
    def agent_data_path(self, value: str) -> None:
        if value not in ("handoff", "relay"):
            raise ValueError(
                f"agent data path: expected 'handoff' or 'relay', got {value!r}"
            )
        self._muxer.agent_data_path = value

    def guest_time_ns(self) -> int:
        """Return the guest's wall clock in nanoseconds since the epoch.

        The agent keeps it in a :class:`~fcvsock.clock.VirtualClock` file,
        which CLOCK_SYNC sets.  Before the file exists it is the host's
        clock, and between :meth:`snapshot` and :meth:`restore` it does not
        advance.  Raises ``ValueError`` if the file is not a clock record.
        """
        if self._snapshot_ns is not None:
            return self._snapshot_ns
        return self._clock().now_ns()

    # Guest ports and scenarios.

    def listen(self, guest_port: int, unix_path: str | os.PathLike[str]) -> None:
        """Relay connections to ``guest_port`` to a Unix stream listener."""
        path = os.fspath(unix_path)

        def register() -> None:
            self._muxer.listeners[guest_port] = path

        self._on_loop(register)

    def unlisten(self, guest_port: int) -> None:
        """Stop serving ``guest_port`` through :meth:`listen`."""

        def unregister() -> None:
            self._muxer.listeners.pop(guest_port, None)

        self._on_loop(unregister)

    def no_listener_for(self, seconds: float, guest_port: int = AGENT_PORT) -> None:
        """Let nothing listen on ``guest_port`` for ``seconds`` from now.

        Connections to it get EOF before any reply, as when the guest
        service is not up yet.
        """
        until = time.monotonic() + seconds

        def close_port() -> None:
            self._muxer.no_listener_until[guest_port] = until

        self._on_loop(close_port)

    def snapshot(self) -> int:
        """Take a snapshot; return the guest time it was taken at, in ns.

        Every relayed stream goes silent.  Its guest side is reset, and its
        host side receives nothing, not even EOF, until the host writes.  The
        VM then closes it.  Connections handed off to the agent are not
        affected, so set :attr:`agent_data_path` to ``"relay"`` first to
        include port 52.  New connections wait, unanswered, until
        :meth:`restore`.
        """
        taken_ns = self.guest_time_ns()
        self._run(self._muxer.snapshot())
        self._snapshot_ns = taken_ns
        return taken_ns

    def restore(self, *, hang: float = 0.0) -> None:
        """Resume after :meth:`snapshot` with the guest clock at snapshot time.

        Connections that arrive in the next ``hang`` seconds, and those that
        waited since the snapshot, get no reply until then.
        """
        if self._snapshot_ns is None:
            raise LocalVMError("local vm: restore: no snapshot was taken")
        self._clock().set_ns(self._snapshot_ns)
        self._snapshot_ns = None
        self._run(self._muxer.restore(hang))

    def abort(
        self, guest_port: int | None = None, *, unread_host_bytes: bool = False
    ) -> int:
        """Close live relayed streams abruptly; return how many were closed.

        The host reads the bytes already sent to it, then EOF.  With
        ``unread_host_bytes`` the VM instead waits until the host writes and
        closes without reading those bytes.  The host then reads the bytes
        already sent to it, and its next read fails with ``ECONNRESET``.
        """
        return self._run(self._muxer.abort(guest_port, unread=unread_host_bytes))

    # Internals.

    def _state_path(self, name: str) -> str:
        if self._state_dir is None:
            raise LocalVMError("local vm: not started")
        return os.path.join(self._state_dir, name)

    def _start_loop(self) -> None:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name="fcvsock-localvm", daemon=True
        )
        self._loop = loop
        self._thread = thread
        thread.start()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        if thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
        loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coroutine.close()
            raise LocalVMError("local vm: not started")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result(_CALL_TIMEOUT)

    def _on_loop(self, action: Callable[[], object]) -> None:
        if self._loop is None:
            action()
            return

        async def call() -> None:
            action()

        self._run(call())

    def _open_socket(self, create_socket_after: float | None) -> None:
        if create_socket_after is None:
            return
        if create_socket_after <= 0:
            self.create_socket()
            return
        assert self._loop is not None
        self._bind_later = asyncio.run_coroutine_threadsafe(
            self._bind_after(create_socket_after), self._loop
        )

    async def _bind_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self._muxer.bind()
        except OSError as exc:
            logger.error("local vm: create socket %s failed: %s", self.uds_path, exc)

    def _clock(self) -> VirtualClock:
        return VirtualClock(self._state_path("clock.json"))

    def _start_agent(self) -> None:
        handoff_path = self._state_path("handoff.sock")
        unix_path = self._state_path("agent.sock")
        read_fd, write_fd = os.pipe()
        try:
            process = self._spawn_agent(handoff_path, unix_path, write_fd)
            os.close(write_fd)
            write_fd = -1
            _wait_ready(read_fd, process, self._start_timeout)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        # NOTE: if this process dies before attach_agent() connects the
        # handoff channel, the agent waits for a channel and keeps running.
        self._run(self._muxer.attach_agent(AgentLink(handoff_path, unix_path)))

    def _spawn_agent(
        self, handoff_path: str, unix_path: str, ready_fd: int
    ) -> subprocess.Popen[bytes]:
        command = [
            *self._agent_command,
            "--handoff", handoff_path,
            "--unix", unix_path,
            "--clock", f"virtual:{self._state_path('clock.json')}",
            "--ready-fd", str(ready_fd),
            # The kernel closes the muxer's handoff channel when this process
            # dies, even by SIGKILL, and the agent then stops.
            "--exit-with-handoff",
            *self._agent_options,
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            pass_fds=(ready_fd,),
            env=_agent_environment(),
            # Ctrl-C in a terminal then reaches this process only, which
            # stops the agent itself.
            start_new_session=True,
        )
        self._agent = process
        self._agent_finalizer = weakref.finalize(self, _stop_unclosed_agent, process)
        return process

    def _remove_files(self) -> None:
        if self._files_finalizer is not None:
            self._files_finalizer()
            self._files_finalizer = None
        self._state_dir = None

    def _stop_agent(self) -> None:
        process, self._agent = self._agent, None
        if self._agent_finalizer is not None:
            self._agent_finalizer.detach()
            self._agent_finalizer = None
        if process is not None:
            _stop_process(process)


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(_AGENT_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.warning(
            "local vm: agent pid %d ignored SIGTERM for %.0f s, killing it",
            process.pid,
            _AGENT_STOP_TIMEOUT,
        )
        process.kill()
        process.wait()


def _stop_unclosed_agent(process: subprocess.Popen[bytes]) -> None:
    # The agent runs in its own session, so nothing else would end it.
    logger.warning(
        "local vm: stopping agent pid %d of a LocalVM that was never closed",
        process.pid,
    )
    _stop_process(process)


def _remove_files(muxer: Muxer, state_dir: str) -> None:
    # Also the exit-time cleanup of a LocalVM that was never closed, so it must
    # not need the loop thread.
    muxer.remove_socket_file()
    shutil.rmtree(state_dir, ignore_errors=True)


def _agent_options(
    max_sessions: int | None, default_cwd: str | None, log_level: str | None
) -> list[str]:
    options: list[str] = []
    if max_sessions is not None:
        options += ["--max-sessions", str(max_sessions)]
    if default_cwd is not None:
        options += ["--default-cwd", default_cwd]
    if log_level is not None:
        options += ["--log-level", log_level]
    return options


def _agent_environment() -> dict[str, str]:
    # The agent must import this same fcvsock, installed or not.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = (
        package_parent if not existing else package_parent + os.pathsep + existing
    )
    return env


def _wait_ready(
    read_fd: int, process: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    received = b""
    while not received.endswith(_READY_LINE):
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([read_fd], [], [], max(0.0, remaining))
        if not readable:
            raise LocalVMError(
                f"local vm: start agent: not ready after {timeout:g} s "
                f"(pid {process.pid})"
            )
        chunk = os.read(read_fd, 64)
        if not chunk:
            raise LocalVMError(
                f"local vm: start agent: it closed the ready fd without writing "
                f"{_READY_LINE!r}; exit status {_exit_status(process)}"
            )
        received += chunk


def _exit_status(process: subprocess.Popen[bytes]) -> str:
    try:
        return str(process.wait(1.0))
    except subprocess.TimeoutExpired:
        return "none (still running)"


# Command line.


class _StopRequested(Exception):
    pass


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcvsock local-vm",
        description=(
            "Serve a local stand-in microVM: the VMM's hybrid-vsock socket at "
            "PATH, with the reference agent on guest port 52."
        ),
    )
    parser.add_argument("path", metavar="PATH", help="socket file to create")
    parser.add_argument(
        "--parser",
        choices=[member.value for member in Parser],
        default=Parser.FIRECRACKER.value,
        help="how the CONNECT line is parsed (default: %(default)s)",
    )
    parser.add_argument(
        "--boot-delay",
        type=_non_negative_seconds,
        default=0.0,
        metavar="S",
        help="seconds during which nothing listens on port 52 (default: 0)",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help="live connections served; more are closed (default: %(default)s)",
    )
    parser.add_argument(
        "--max-sessions",
        type=_positive_int,
        default=None,
        metavar="N",
        help="sessions the agent runs at once (default: the agent's own)",
    )
    return parser


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative number of seconds, got {text!r}"
        )
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _raise_stop(signal_number: int, frame: FrameType | None) -> None:
    raise _StopRequested(signal.Signals(signal_number).name)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fcvsock local-vm PATH [options]`` until SIGINT, SIGTERM or SIGHUP.

    Each of them closes the VM, so the socket file, the temporary directory
    and the agent are gone when this returns.
    """
    args = _build_parser().parse_args(argv)
    vm = LocalVM(
        args.path,
        parser=args.parser,
        boot_delay=args.boot_delay,
        max_connections=args.max_connections,
        max_sessions=args.max_sessions,
    )
    # SIGHUP comes when the controlling terminal closes.
    previous = {
        number: signal.signal(number, _raise_stop)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        vm.start()
        print(
            f"local-vm: listening on {vm.uds_path} (parser {args.parser}, "
            f"agent pid {vm.agent_pid}); stop with Ctrl-C",
            flush=True,
        )
        while True:
            signal.pause()
    except _StopRequested:
        return 0
    except (LocalVMError, OSError) as exc:
        print(f"fcvsock local-vm: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second signal must not interrupt the cleanup.
        for number in previous:
            signal.signal(number, signal.SIG_IGN)
        vm.close()
        for number, handler in previous.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
