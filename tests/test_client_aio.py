"""The asyncio API beyond run/stream/sync_clock: exec sessions, cancellation,
memory bounds and raw streams, on the default loop and on uvloop."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from scripted_peer import (
    HOST_PORT,
    LOOP_KINDS,
    OK_REPLY,
    WAIT,
    Agent,
    Firehose,
    Peers,
    accept_start,
    exit_frame,
    open_sockets,
    read_frame,
    read_line,
    run_in_loop,
    stdout_frame,
    wait_event,
    wait_hangup,
    wait_until_eof,
)

from fcvsock import (
    ConnectionLostError,
    ExitStatus,
    FrameType,
    HandshakeTimeoutError,
    Output,
    SessionTimeoutError,
    aio,
)
from fcvsock.protocol import HEADER_SIZE

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture
def uds_path() -> Iterator[str]:
    # pytest's tmp_path can exceed the 108-byte limit of sun_path.
    with tempfile.TemporaryDirectory(prefix="fcv") as directory:
        yield os.path.join(directory, "v.sock")


@pytest.fixture
def peers(uds_path: str) -> Iterator[Peers]:
    started = Peers(uds_path)
    yield started
    started.close()


@pytest.fixture(params=LOOP_KINDS)
def arun(request: pytest.FixtureRequest) -> Runner:
    """Run a test coroutine on one kind of event loop, bounded by WAIT."""

    def run(coroutine: Coroutine[Any, Any, None]) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(4 * WAIT):
                await coroutine

        run_in_loop(request.param, bounded())

    return run


def open_exec(path: str, **options: Any) -> aio.AsyncExecSession:
    options.setdefault("connect_timeout", WAIT)
    return aio.exec(path, ["sh"], **options)


def assert_bounded(core: Any, max_buffered: int, frame_size: int) -> None:
    assert core.buffered <= max_buffered + frame_size
    assert core.buffered + core.decoder.buffered <= (
        max_buffered + frame_size + HEADER_SIZE
    )


def echo_agent(conn: socket.socket) -> None:
    """Send every STDIN payload back as STDOUT; exit 0 after EOF."""
    accept_start(conn)
    while True:
        frame_type, payload = read_frame(conn)
        if frame_type == FrameType.STDIN:
            conn.sendall(stdout_frame(payload))
        elif frame_type == FrameType.EOF:
            conn.sendall(exit_frame(0))
            break
    wait_until_eof(conn)


# -- exec sessions ----------------------------------------------------------------


def test_exec_sends_control_frames(arun: Runner, peers: Peers) -> None:
    agent = Agent(stdout_frame(b"out"), exit_frame(0), wait_for=FrameType.EOF)
    peers.start(agent)

    async def scenario() -> None:
        async with open_exec(peers.path, tty=True) as session:
            await session.write(b"echo hi\n")
            await session.write(b"")
            await session.resize(100, 30)
            await session.signal(15)
            await session.close_stdin()
            await session.close_stdin()
            assert [item async for item in session] == [Output("stdout", b"out")]
            assert await session.wait() == ExitStatus(0)

    arun(scenario())
    assert agent.client_closed.wait(WAIT)
    assert agent.frames[1:] == [
        (FrameType.STDIN, b"echo hi\n"),
        (FrameType.RESIZE, struct.pack("<HH", 100, 30)),
        (FrameType.SIGNAL, struct.pack("<i", 15)),
        (FrameType.EOF, b""),
    ]


def test_exec_await_form(arun: Runner, peers: Peers) -> None:
    agent = Agent(stdout_frame(b"x"), exit_frame(137, 9))
    peers.start(agent)

    async def scenario() -> None:
        session = await open_exec(peers.path)
        try:
            assert session.host_port == HOST_PORT
            assert await session.read() == Output("stdout", b"x")
            assert await session.wait() == ExitStatus(137, 9)
            assert session.exit_status == ExitStatus(137, 9)
        finally:
            session.close()

    arun(scenario())
    assert agent.client_closed.wait(WAIT)


def test_exec_not_started(arun: Runner, peers: Peers) -> None:
    peer = peers.start(Agent())

    async def scenario() -> None:
        session = open_exec(peers.path)
        with pytest.raises(RuntimeError, match="not started"):
            await session.read()
        session.close()

    arun(scenario())
    assert peer.connections == 0


@pytest.mark.parametrize("number", [0, 65, "9", 9.0, True])
def test_exec_invalid_signal(arun: Runner, peers: Peers, number: Any) -> None:
    agent = Agent()
    peers.start(agent)

    async def scenario() -> None:
        async with open_exec(peers.path) as session:
            with pytest.raises((TypeError, ValueError), match="signal"):
                await session.signal(number)

    arun(scenario())
    assert agent.client_closed.wait(WAIT)
    assert agent.frame_types() == [FrameType.START]


def test_exec_large_write(arun: Runner, peers: Peers) -> None:
    data = bytes(range(256)) * 8192
    agent = Agent(exit_frame(0), wait_for=FrameType.EOF)
    peers.start(agent)

    async def scenario() -> None:
        async with open_exec(peers.path) as session:
            await session.write(data)
            await session.close_stdin()
            assert await session.wait() == ExitStatus(0)

    arun(scenario())
    assert agent.client_closed.wait(WAIT)
    assert b"".join(agent.payloads(FrameType.STDIN)) == data


def test_exec_concurrent_read_write(arun: Runner, peers: Peers) -> None:
    peers.start(echo_agent)
    chunks = [bytes([i]) * 100_000 for i in range(20)]

    async def feed(session: aio.AsyncExecSession) -> None:
        for chunk in chunks:
            await session.write(chunk)
        await session.close_stdin()

    async def scenario() -> None:
        async with open_exec(peers.path, max_buffered=64 * 1024) as session:
            writer = asyncio.create_task(feed(session))
            received = b"".join([item.data async for item in session])
            await writer
            assert received == b"".join(chunks)
            assert await session.wait() == ExitStatus(0)

    arun(scenario())


def test_exec_wait_discards_output(arun: Runner, peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"a" * 100_000), exit_frame(0)))

    async def scenario() -> None:
        async with open_exec(peers.path, max_buffered=1024) as session:
            assert await session.wait() == ExitStatus(0)
            assert await session.read() is None

    arun(scenario())


def test_exec_wait_timeout(arun: Runner, peers: Peers) -> None:
    agent = Agent(stdout_frame(b"unread"))
    peers.start(agent)

    async def scenario() -> None:
        async with open_exec(peers.path) as session:
            with pytest.raises(SessionTimeoutError) as caught:
                await session.wait(timeout=0.2)
            assert "0.2 s" in str(caught.value)

    arun(scenario())
    assert agent.client_closed.wait(WAIT)


def test_exec_session_timeout(arun: Runner, peers: Peers) -> None:
    agent = Agent(stdout_frame(b"partial"))
    peers.start(agent)

    async def scenario() -> None:
        async with open_exec(peers.path, timeout=0.3) as session:
            assert await session.read() == Output("stdout", b"partial")
            with pytest.raises(SessionTimeoutError) as caught:
                await session.read()
            assert "0.3 s" in str(caught.value)

    arun(scenario())
    assert agent.client_closed.wait(WAIT)


def test_exec_lost_connection(arun: Runner, peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"out"), close=True))

    async def scenario() -> None:
        async with open_exec(peers.path) as session:
            assert await session.read() == Output("stdout", b"out")
            with pytest.raises(ConnectionLostError):
                await session.read()

    arun(scenario())


def test_exec_bad_argument_before_connect(arun: Runner, peers: Peers) -> None:
    peer = peers.start(Agent())

    async def scenario() -> None:
        with pytest.raises(ValueError, match="timeout"):
            open_exec(peers.path, timeout=-1.0)
        with pytest.raises(ValueError, match="max_buffered"):
            open_exec(peers.path, max_buffered=0)

    arun(scenario())
    assert peer.connections == 0


def test_stream_bad_argument_at_call(peers: Peers) -> None:
    peer = peers.start(Agent())
    with pytest.raises(TypeError):
        aio.stream(peers.path, "ls -l")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        aio.stream(peers.path, ["cat"], input="text")  # type: ignore[arg-type]
    assert peer.connections == 0


# -- closing and cancellation ----------------------------------------------------


def test_context_exit_closes_socket(arun: Runner, peers: Peers) -> None:
    agent = Agent(stdout_frame(b"running"))
    peer = peers.start(agent)

    async def scenario() -> None:
        sockets = open_sockets()
        tasks = len(asyncio.all_tasks())
        async with open_exec(peers.path) as session:
            assert await session.read() == Output("stdout", b"running")
        assert await wait_event(agent.client_closed)
        await asyncio.to_thread(peer.wait_served, 1)
        assert open_sockets() == sockets
        assert len(asyncio.all_tasks()) == tasks

    arun(scenario())


def test_session_unregisters_fd(arun: Runner, peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"running")))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with open_exec(peers.path) as session:
            fd = session._live().core.fd
            assert await session.read() == Output("stdout", b"running")
        assert not loop.remove_reader(fd)
        assert not loop.remove_writer(fd)

    arun(scenario())


async def cancel_and_check(
    task: asyncio.Task[Any], agent: Agent, peer: Any, sockets: dict[str, str]
) -> None:
    assert await wait_event(agent.started)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_event(agent.client_closed)
    await asyncio.to_thread(peer.wait_served, 1)
    assert open_sockets() == sockets


def test_cancel_exec_read(arun: Runner, peers: Peers) -> None:
    agent = Agent()
    peer = peers.start(agent)

    async def blocked_read() -> None:
        async with open_exec(peers.path) as session:
            await session.read()

    async def scenario() -> None:
        sockets = open_sockets()
        tasks = len(asyncio.all_tasks())
        task = asyncio.create_task(blocked_read())
        await cancel_and_check(task, agent, peer, sockets)
        assert len(asyncio.all_tasks()) == tasks

    arun(scenario())


def test_cancel_exec_write(arun: Runner, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        accept_start(conn)
        agent.started.set()
        # Never reads stdin, so the client's write waits for room.
        if wait_hangup(conn):
            agent.client_closed.set()

    agent = Agent()
    peer = peers.start(handler)

    async def blocked_write() -> None:
        async with open_exec(peers.path) as session:
            await session.write(b"x" * (16 * 1024 * 1024))

    async def scenario() -> None:
        sockets = open_sockets()
        tasks = len(asyncio.all_tasks())
        task = asyncio.create_task(blocked_write())
        await cancel_and_check(task, agent, peer, sockets)
        assert len(asyncio.all_tasks()) == tasks

    arun(scenario())


def test_cancel_run(arun: Runner, peers: Peers) -> None:
    agent = Agent()
    peer = peers.start(agent)

    async def scenario() -> None:
        sockets = open_sockets()
        tasks = len(asyncio.all_tasks())
        task = asyncio.create_task(
            aio.run(peers.path, ["sleep", "100"], connect_timeout=WAIT)
        )
        await cancel_and_check(task, agent, peer, sockets)
        assert len(asyncio.all_tasks()) == tasks

    arun(scenario())


def test_cancel_stream(arun: Runner, peers: Peers) -> None:
    agent = Agent()
    peer = peers.start(agent)

    async def consume() -> None:
        async for _ in aio.stream(peers.path, ["sleep"], connect_timeout=WAIT):
            pass

    async def scenario() -> None:
        sockets = open_sockets()
        tasks = len(asyncio.all_tasks())
        task = asyncio.create_task(consume())
        await cancel_and_check(task, agent, peer, sockets)
        assert len(asyncio.all_tasks()) == tasks

    arun(scenario())


def test_cancel_handshake(arun: Runner, peers: Peers) -> None:
    agent = Agent()

    def handler(conn: socket.socket) -> None:
        read_line(conn)
        agent.started.set()
        wait_until_eof(conn)
        agent.client_closed.set()

    peer = peers.start(handler)

    async def scenario() -> None:
        sockets = open_sockets()
        task = asyncio.create_task(aio.run(peers.path, ["true"], connect_timeout=WAIT))
        await cancel_and_check(task, agent, peer, sockets)

    arun(scenario())


def test_outer_timeout_closes_run(arun: Runner, peers: Peers) -> None:
    agent = Agent()
    peer = peers.start(agent)

    async def scenario() -> None:
        sockets = open_sockets()
        with pytest.raises(TimeoutError) as caught:
            async with asyncio.timeout(0.3):
                await aio.run(peers.path, ["sleep"], connect_timeout=WAIT)
        assert not isinstance(caught.value, SessionTimeoutError)
        assert await wait_event(agent.client_closed)
        await asyncio.to_thread(peer.wait_served, 1)
        assert open_sockets() == sockets

    arun(scenario())


# -- memory bounds ------------------------------------------------------------------


def test_stream_memory_bounded(arun: Runner, peers: Peers) -> None:
    max_buffered = 16 * 1024
    frame_size = 4096
    firehose = Firehose(frame_size)
    peers.start(firehose)

    async def scenario() -> None:
        items = aio.stream(
            peers.path, ["yes"], connect_timeout=WAIT, max_buffered=max_buffered
        )
        try:
            assert await anext(items) == Output("stdout", b"x" * frame_size)
            assert await wait_event(firehose.blocked)
            assert firehose.sent > 4 * max_buffered
            core = items.ag_frame.f_locals["core"]  # type: ignore[attr-defined]
            assert_bounded(core, max_buffered, frame_size)

            for _ in range(len(core.queue) + 1):
                assert await anext(items) == Output("stdout", b"x" * frame_size)
            assert_bounded(core, max_buffered, frame_size)
        finally:
            await items.aclose()  # type: ignore[attr-defined]

    arun(scenario())


def test_exec_memory_bounded(arun: Runner, peers: Peers) -> None:
    max_buffered = 16 * 1024
    frame_size = 4096
    firehose = Firehose(frame_size)
    peers.start(firehose)

    async def scenario() -> None:
        async with open_exec(peers.path, max_buffered=max_buffered) as session:
            assert await wait_event(firehose.blocked)
            assert firehose.sent > 4 * max_buffered
            core = session._live().core
            assert_bounded(core, max_buffered, frame_size)
            assert await session.read() == Output("stdout", b"x" * frame_size)
            await asyncio.sleep(0)
            assert_bounded(core, max_buffered, frame_size)

    arun(scenario())


# -- raw streams ----------------------------------------------------------------------


def initial_then_more(conn: socket.socket) -> None:
    read_line(conn)
    conn.sendall(OK_REPLY + b"first")
    conn.sendall(b" second")


def test_open_connection_initial_bytes_first(arun: Runner, peers: Peers) -> None:
    peers.start(initial_then_more)

    async def scenario() -> None:
        reader, writer = await aio.open_connection(peers.path, 5000, timeout=WAIT)
        try:
            assert await reader.read() == b"first second"
        finally:
            writer.close()
            await writer.wait_closed()

    arun(scenario())


def test_open_connection_writes(arun: Runner, peers: Peers) -> None:
    received: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        read_line(conn)
        conn.sendall(OK_REPLY)
        received.append(conn.recv(64))

    peers.start(handler)

    async def scenario() -> None:
        reader, writer = await aio.open_connection(peers.path, 5000, timeout=WAIT)
        writer.write(b"ping")
        await writer.drain()
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()

    arun(scenario())
    assert received == [b"ping"]


def test_connect_initial_data(arun: Runner, peers: Peers) -> None:
    peers.start(initial_then_more)

    async def scenario() -> None:
        handshake = await aio.connect(peers.path, 5000, timeout=WAIT)
        loop = asyncio.get_running_loop()
        with handshake.sock:
            received = handshake.initial_data
            while chunk := await loop.sock_recv(handshake.sock, 64):
                received += chunk
        assert handshake.initial_data.startswith(b"first")
        assert received == b"first second"

    arun(scenario())


def test_connect_timeout(arun: Runner, uds_path: str) -> None:
    async def scenario() -> None:
        with pytest.raises(HandshakeTimeoutError):
            await aio.connect(uds_path, 5000, timeout=0.2)

    arun(scenario())
