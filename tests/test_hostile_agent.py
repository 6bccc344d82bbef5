"""The host side against a guest agent that breaks every rule.

A scripted agent behind a Unix socket completes the VMM handshake, reads
START and then sends what each test scripts.  Every call runs in a worker
thread with a guard: a call still running after ``GUARD`` seconds counts as
hung, and the test then closes the guest side so the worker can end.
Each case runs through the blocking API and the asyncio API on both the
standard event loop and uvloop.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from scripted_peer import accept_start, exit_frame, frame, stdout_frame, wait_until_eof

import fcvsock
import fcvsock.aio
from fcvsock.errors import (
    ClockSyncError,
    ConnectionLostError,
    FrameTooLargeError,
    IncompleteFrameError,
    SessionProtocolError,
    SessionTimeoutError,
)
from fcvsock.protocol import MAX_OUTPUT_CHUNK, MAX_PAYLOAD, FrameType

APIS = ["blocking", "asyncio", "uvloop"]
# Seconds after which a call counts as hung.
GUARD = 15.0
HOST_TIMEOUT = 0.5
MIB = 1024 * 1024
UNKNOWN_TYPE = 0x7F

Handler = Callable[[socket.socket], None]
T = TypeVar("T")


def header(frame_type: int, length: int) -> bytes:
    return struct.pack("<BI", frame_type, length)


class HostileAgent:
    """Listen at ``path``; run ``handler`` on each connection in a thread."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.errors: list[BaseException] = []
        self._connections: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(64)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._connections.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except (OSError, EOFError):
            pass
        except BaseException as exc:  # noqa: BLE001 - reported by close()
            self.errors.append(exc)
        finally:
            conn.close()

    def cut_connections(self) -> None:
        """Shut down every connection, so blocked handlers and hosts return."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._acceptor.join(GUARD)
        self.cut_connections()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(GUARD)
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def sock_path() -> Iterator[str]:
    # AF_UNIX paths are limited to 107 bytes, so pytest's tmp_path may not fit.
    with tempfile.TemporaryDirectory(prefix="hostile-") as directory:
        yield os.path.join(directory, "vm.sock")


@pytest.fixture
def start_agent(sock_path: str) -> Iterator[Callable[[Handler], HostileAgent]]:
    agents: list[HostileAgent] = []

    def start(handler: Handler) -> HostileAgent:
        agent = HostileAgent(sock_path, handler)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.close()


@dataclass
class Outcome:
    result: Any
    error: BaseException | None
    hung: bool


def guarded(
    agent: HostileAgent, call: Callable[[], Any], limit: float = GUARD
) -> Outcome:
    """Run ``call`` in a thread; cut the guest side if it still runs after ``limit``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    hung = thread.is_alive()
    if hung:
        agent.cut_connections()
        thread.join(GUARD)
    return Outcome(box.get("result"), box.get("error"), hung)


def run_async(api: str, coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on a new event loop of the kind ``api`` names."""
    if api == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    return asyncio.run(coroutine)


def run_command(api: str, path: str, **options: Any) -> fcvsock.RunResult:
    if api == "blocking":
        return fcvsock.run(path, ["cmd"], connect_timeout=GUARD, **options)
    return run_async(
        api, fcvsock.aio.run(path, ["cmd"], connect_timeout=GUARD, **options)
    )


def script(*chunks: bytes, close: bool = False) -> Handler:
    """Return a handler that sends ``chunks`` after START, then waits or closes."""

    def handler(conn: socket.socket) -> None:
        accept_start(conn)
        for chunk in chunks:
            conn.sendall(chunk)
        if not close:
            wait_until_eof(conn)

    return handler


def flood(chunk: bytes) -> Handler:
    """Return a handler that sends ``chunk`` after START until the host closes."""

    def handler(conn: socket.socket) -> None:
        accept_start(conn)
        while True:
            conn.sendall(chunk)

    return handler


def stall(*chunks: bytes) -> Handler:
    """Return a handler that sends ``chunks`` after START and then reads nothing.

    It returns once the host closes or the test cuts the connection.
    """

    def handler(conn: socket.socket) -> None:
        accept_start(conn)
        for chunk in chunks:
            conn.sendall(chunk)
        poller = select.poll()
        poller.register(conn, select.POLLRDHUP)
        poller.poll()

    return handler


def drip(data: bytes, interval: float) -> Handler:
    """Return a handler that sends ``data`` one byte per ``interval`` seconds."""

    def handler(conn: socket.socket) -> None:
        accept_start(conn)
        for index in range(len(data)):
            conn.sendall(data[index : index + 1])
            # The pace is the scenario under test, not a wait for an event.
            time.sleep(interval)
        wait_until_eof(conn)

    return handler


@pytest.mark.parametrize("api", APIS)
def test_length_above_limit(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    agent = start_agent(
        script(stdout_frame(b"before"), header(FrameType.STDOUT, MAX_PAYLOAD + 1))
    )
    peaks: list[int] = []

    def call() -> Any:
        tracemalloc.start()
        try:
            return run_command(api, sock_path)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    outcome = guarded(agent, call)
    assert not outcome.hung
    assert isinstance(outcome.error, SessionProtocolError)
    assert isinstance(outcome.error.__cause__, FrameTooLargeError)
    assert outcome.error.stdout == b"before"
    assert peaks[0] < 4 * MIB


@pytest.mark.parametrize("api", APIS)
def test_length_then_silence(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    agent = start_agent(
        script(stdout_frame(b"partial"), header(FrameType.STDOUT, 1000), b"y" * 10)
    )
    outcome = guarded(agent, lambda: run_command(api, sock_path, timeout=HOST_TIMEOUT))
    assert not outcome.hung
    assert isinstance(outcome.error, SessionTimeoutError)
    assert outcome.error.stdout == b"partial"


def _slow_reader_peak(api: str, path: str, max_buffered: int) -> int:
    """Read output slowly while the guest floods; return the traced peak.

    The blocking caller takes 100 items one at a time, and each ``next``
    lets the host read up to its limit again.  The asyncio caller takes one
    item and then idles while the loop keeps running its callbacks.  Tracing
    starts inside the event loop, so the loop's own buffers are not counted.
    """
    if api == "blocking":
        tracemalloc.start()
        try:
            items = fcvsock.stream(path, ["cmd"], max_buffered=max_buffered)
            for _ in range(100):
                next(items)
            peak = tracemalloc.get_traced_memory()[1]
            items.close()
            return peak
        finally:
            tracemalloc.stop()

    async def take_one() -> int:
        tracemalloc.start()
        try:
            items = fcvsock.aio.stream(path, ["cmd"], max_buffered=max_buffered)
            await items.__anext__()
            await asyncio.sleep(0.3)
            peak = tracemalloc.get_traced_memory()[1]
            await items.aclose()
            return peak
        finally:
            tracemalloc.stop()

    return run_async(api, take_one())


@pytest.mark.parametrize("api", APIS)
def test_unread_output_bounded(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    chunk = stdout_frame(b"o" * MAX_OUTPUT_CHUNK)
    agent = start_agent(flood(chunk))
    max_buffered = MIB
    outcome = guarded(agent, lambda: _slow_reader_peak(api, sock_path, max_buffered))
    assert not outcome.hung
    assert outcome.error is None
    # The receive buffer, the queue up to the limit, and two frames over it.
    assert outcome.result < max_buffered + 1 * MIB


@pytest.mark.parametrize("api", APIS)
def test_exit_then_garbage(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    garbage = b"\xff" * 64 + header(FrameType.STDOUT, 2**32 - 1)
    agent = start_agent(script(stdout_frame(b"out"), exit_frame(0), garbage))
    outcome = guarded(agent, lambda: run_command(api, sock_path))
    assert not outcome.hung
    assert outcome.error is None
    assert outcome.result.exit_code == 0
    assert outcome.result.stdout == b"out"


@pytest.mark.parametrize("api", APIS)
def test_exit_twice(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    agent = start_agent(
        script(stdout_frame(b"a"), exit_frame(3), stdout_frame(b"late"), exit_frame(4))
    )
    outcome = guarded(agent, lambda: run_command(api, sock_path))
    assert not outcome.hung
    assert outcome.error is None
    assert outcome.result.exit_code == 3
    assert outcome.result.stdout == b"a"


@pytest.mark.parametrize("api", APIS)
def test_short_exit_payload(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    agent = start_agent(script(frame(FrameType.EXIT, b"\0\0")))
    outcome = guarded(agent, lambda: run_command(api, sock_path))
    assert not outcome.hung
    assert isinstance(outcome.error, SessionProtocolError)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    "tail",
    [header(FrameType.STDOUT, 100) + b"z" * 10, b"\x10\x05"],
    ids=["in-payload", "in-header"],
)
def test_close_inside_frame(
    start_agent: Callable[[Handler], HostileAgent],
    sock_path: str,
    api: str,
    tail: bytes,
) -> None:
    agent = start_agent(script(stdout_frame(b"ok"), tail, close=True))
    outcome = guarded(agent, lambda: run_command(api, sock_path))
    assert not outcome.hung
    assert isinstance(outcome.error, ConnectionLostError)
    assert isinstance(outcome.error.__cause__, IncompleteFrameError)
    assert outcome.error.stdout == b"ok"


@pytest.mark.parametrize("api", APIS)
def test_close_with_unread_input(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    # The host's EOF frame stays unread, so Linux resets the host's socket.
    agent = start_agent(script(stdout_frame(b"partial"), close=True))
    outcome = guarded(agent, lambda: run_command(api, sock_path))
    assert not outcome.hung
    assert isinstance(outcome.error, ConnectionLostError)
    assert outcome.error.stdout == b"partial"


@pytest.mark.parametrize("api", APIS)
def test_unknown_frame_flood(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    unknown = b"".join(
        frame(kind, b"x" * (kind % 3))
        for kind in range(256)
        if kind not in set(FrameType)
    )
    repeats = 100_000 // (len(unknown) // 5) + 1
    agent = start_agent(
        script(stdout_frame(b"a"), unknown * repeats, stdout_frame(b"b"), exit_frame(0))
    )
    outcome = guarded(agent, lambda: run_command(api, sock_path))
    assert not outcome.hung
    assert outcome.error is None
    assert outcome.result.exit_code == 0
    assert outcome.result.stdout == b"ab"


@pytest.mark.parametrize("api", APIS)
def test_million_empty_stdout_frames(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    empty = stdout_frame(b"") * 1_000_000
    agent = start_agent(script(empty, stdout_frame(b"end"), exit_frame(0)))
    outcome = guarded(agent, lambda: run_command(api, sock_path))
    assert not outcome.hung
    assert outcome.error is None
    assert outcome.result.exit_code == 0
    assert outcome.result.stdout == b"end"


@pytest.mark.parametrize("api", APIS)
def test_slow_drip_hits_deadline(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    agent = start_agent(drip(stdout_frame(b"x" * 1000), 0.1))
    outcome = guarded(agent, lambda: run_command(api, sock_path, timeout=HOST_TIMEOUT))
    assert not outcome.hung
    assert isinstance(outcome.error, SessionTimeoutError)


@pytest.mark.parametrize("api", APIS)
def test_flood_hits_deadline(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    agent = start_agent(flood(frame(UNKNOWN_TYPE) * 200_000))
    outcome = guarded(
        agent, lambda: run_command(api, sock_path, timeout=HOST_TIMEOUT), limit=5.0
    )
    assert not outcome.hung
    assert isinstance(outcome.error, SessionTimeoutError)


def stream_items(api: str, path: str, **options: Any) -> list[Any]:
    if api == "blocking":
        return list(fcvsock.stream(path, ["cmd"], connect_timeout=GUARD, **options))

    async def collect() -> list[Any]:
        items = fcvsock.aio.stream(path, ["cmd"], connect_timeout=GUARD, **options)
        return [item async for item in items]

    return run_async(api, collect())


@pytest.mark.parametrize("api", APIS)
def test_empty_frame_flood_stream_deadline(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    # Empty output frames never count against max_buffered.
    agent = start_agent(flood(stdout_frame(b"") * 200_000))
    outcome = guarded(
        agent, lambda: stream_items(api, sock_path, timeout=HOST_TIMEOUT), limit=5.0
    )
    assert not outcome.hung
    assert isinstance(outcome.error, SessionTimeoutError)


def exec_wait(api: str, path: str, timeout: float) -> Any:
    if api == "blocking":
        with fcvsock.exec(path, ["cmd"], connect_timeout=GUARD) as session:
            return session.wait(timeout=timeout)

    async def wait() -> Any:
        async with fcvsock.aio.exec(path, ["cmd"], connect_timeout=GUARD) as session:
            return await session.wait(timeout=timeout)

    return run_async(api, wait())


@pytest.mark.parametrize("api", APIS)
def test_flood_exec_wait_deadline(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    agent = start_agent(flood(stdout_frame(b"z" * 100) * 10_000))
    outcome = guarded(agent, lambda: exec_wait(api, sock_path, HOST_TIMEOUT), limit=5.0)
    assert not outcome.hung
    assert isinstance(outcome.error, SessionTimeoutError)


def sync_clock(api: str, path: str) -> int:
    if api == "blocking":
        return fcvsock.sync_clock(path, reply_timeout=HOST_TIMEOUT)
    return run_async(api, fcvsock.aio.sync_clock(path, reply_timeout=HOST_TIMEOUT))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize(
    "handler",
    [
        script(),
        flood(frame(UNKNOWN_TYPE) * 200_000),
        script(header(FrameType.EXIT, 4) + b"\0", close=True),
        script(frame(FrameType.EXIT, b"\1")),
        script(header(FrameType.EXIT, MAX_PAYLOAD + 1)),
    ],
    ids=["silent", "flood", "close-in-exit", "short-exit", "oversized"],
)
def test_clock_sync_hostile_reply(
    start_agent: Callable[[Handler], HostileAgent],
    sock_path: str,
    api: str,
    handler: Handler,
) -> None:
    agent = start_agent(handler)
    outcome = guarded(agent, lambda: sync_clock(api, sock_path), limit=5.0)
    assert not outcome.hung
    assert isinstance(outcome.error, ClockSyncError)


@pytest.mark.parametrize("api", APIS)
def test_exit_while_input_pending(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    # The agent exits and closes without reading the 8 MiB of input.
    agent = start_agent(script(stdout_frame(b"bye"), exit_frame(0), close=True))
    data = b"i" * (8 * MIB)
    outcome = guarded(agent, lambda: run_command(api, sock_path, input=data))
    assert not outcome.hung
    assert outcome.error is None
    assert outcome.result.exit_code == 0
    assert outcome.result.stdout == b"bye"


def exec_write(api: str, path: str, data: bytes, timeout: float) -> None:
    if api == "blocking":
        with fcvsock.exec(path, ["cmd"], timeout=timeout) as session:
            session.write(data)
        return

    async def write() -> None:
        async with fcvsock.aio.exec(path, ["cmd"], timeout=timeout) as session:
            await session.write(data)

    run_async(api, write())


@pytest.mark.parametrize("api", APIS)
def test_stdin_never_read_hits_deadline(
    start_agent: Callable[[Handler], HostileAgent], sock_path: str, api: str
) -> None:
    agent = start_agent(stall(stdout_frame(b"reading nothing")))
    data = b"i" * (16 * MIB)
    outcome = guarded(agent, lambda: exec_write(api, sock_path, data, HOST_TIMEOUT))
    assert not outcome.hung
    assert isinstance(outcome.error, SessionTimeoutError)
