"""The client's contract against a scripted agent.

``run``, ``stream`` and ``sync_clock`` are tested through the blocking API,
the asyncio API on the default loop and the asyncio API on uvloop.  The
blocking ``exec`` session is tested here; the asyncio one, cancellation and
raw streams on the event loop are in test_client_aio.py.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from scripted_peer import (
    HOST_PORT,
    OK_REPLY,
    WAIT,
    Agent,
    Firehose,
    Peers,
    accept_start,
    exit_frame,
    frame,
    open_sockets,
    read_frame,
    read_frames_until_eof,
    read_line,
    run_in_loop,
    stderr_frame,
    stdout_frame,
    wait_until_eof,
)

import fcvsock
from fcvsock import (
    ClockSyncError,
    CommandFailedError,
    ConnectionLostError,
    ExitStatus,
    FrameTooLargeError,
    FrameType,
    IncompleteFrameError,
    Output,
    ProtocolError,
    RunResult,
    SessionError,
    SessionProtocolError,
    SessionTimeoutError,
    StreamItem,
    aio,
)
from fcvsock._request import STDIN_CHUNK, InputFeeder
from fcvsock.handshake import Handshake
from fcvsock.protocol import HEADER_SIZE, MAX_PAYLOAD, decode_clock_sync
from fcvsock.session import SessionCore


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


class BlockingApi:
    def run(self, path: str, cmd: list[str], **options: Any) -> RunResult:
        options.setdefault("connect_timeout", WAIT)
        return fcvsock.run(path, cmd, **options)

    def stream(self, path: str, cmd: list[str], **options: Any) -> list[StreamItem]:
        options.setdefault("connect_timeout", WAIT)
        return list(fcvsock.stream(path, cmd, **options))

    def sync_clock(self, path: str, **options: Any) -> int:
        options.setdefault("connect_timeout", WAIT)
        return fcvsock.sync_clock(path, **options)


class AsyncApi:
    def __init__(self, loop_kind: str) -> None:
        self.loop_kind = loop_kind

    def run(self, path: str, cmd: list[str], **options: Any) -> RunResult:
        options.setdefault("connect_timeout", WAIT)
        return run_in_loop(self.loop_kind, aio.run(path, cmd, **options))

    def stream(self, path: str, cmd: list[str], **options: Any) -> list[StreamItem]:
        options.setdefault("connect_timeout", WAIT)

        async def collect() -> list[StreamItem]:
            return [item async for item in aio.stream(path, cmd, **options)]

        return run_in_loop(self.loop_kind, collect())

    def sync_clock(self, path: str, **options: Any) -> int:
        options.setdefault("connect_timeout", WAIT)
        return run_in_loop(self.loop_kind, aio.sync_clock(path, **options))


Api = BlockingApi | AsyncApi


@pytest.fixture(params=["blocking", "asyncio", "uvloop"])
def api(request: pytest.FixtureRequest) -> Api:
    if request.param == "blocking":
        return BlockingApi()
    return AsyncApi(request.param)


def start_document(agent: Agent) -> dict[str, Any]:
    frame_type, payload = agent.frames[0]
    assert frame_type == FrameType.START
    document: dict[str, Any] = json.loads(payload)
    return document


# -- run: what the agent receives --------------------------------------------


def test_run_sends_start_then_eof(api: Api, peers: Peers) -> None:
    agent = Agent(exit_frame(0), wait_for=FrameType.EOF)
    peers.start(agent)
    api.run(peers.path, ["true"])
    assert agent.client_closed.wait(WAIT)
    assert agent.line == b"CONNECT 52\n"
    assert agent.frame_types() == [FrameType.START, FrameType.EOF]
    assert agent.frames[1] == (FrameType.EOF, b"")


def test_start_defaults(api: Api, peers: Peers) -> None:
    agent = Agent(exit_frame(0))
    peers.start(agent)
    api.run(peers.path, ["uname", "-a"])
    assert agent.client_closed.wait(WAIT)
    assert start_document(agent) == {
        "cmd": ["uname", "-a"],
        "env": {},
        "working_dir": "",
        "user": "",
        "tty": False,
        "tty_width": 0,
        "tty_height": 0,
        "timeout_seconds": 0,
    }


def test_start_fields(api: Api, peers: Peers) -> None:
    agent = Agent(exit_frame(0))
    peers.start(agent)
    api.run(
        peers.path,
        ["sh", "-c", "echo $LANG"],
        env={"LANG": "C.UTF-8"},
        cwd="/tmp",
        user="1000:1000",
        tty=True,
        tty_size=(120, 40),
        timeout_seconds=7,
    )
    assert agent.client_closed.wait(WAIT)
    assert start_document(agent) == {
        "cmd": ["sh", "-c", "echo $LANG"],
        "env": {"LANG": "C.UTF-8"},
        "working_dir": "/tmp",
        "user": "1000:1000",
        "tty": True,
        "tty_width": 120,
        "tty_height": 40,
        "timeout_seconds": 7,
    }


def test_run_uses_given_port(api: Api, peers: Peers) -> None:
    agent = Agent(exit_frame(0))
    peers.start(agent)
    api.run(peers.path, ["true"], port=1024)
    assert agent.client_closed.wait(WAIT)
    assert agent.line == b"CONNECT 1024\n"


def test_run_input_delivered(api: Api, peers: Peers) -> None:
    data = bytes(range(256)) * 4096
    agent = Agent(exit_frame(0), wait_for=FrameType.EOF)
    peers.start(agent)
    api.run(peers.path, ["cat"], input=data)
    assert agent.client_closed.wait(WAIT)
    types = agent.frame_types()
    assert types[0] == FrameType.START
    assert types[-1] == FrameType.EOF
    assert set(types[1:-1]) == {FrameType.STDIN}
    assert b"".join(agent.payloads(FrameType.STDIN)) == data


def test_run_empty_input_is_eof(api: Api, peers: Peers) -> None:
    agent = Agent(exit_frame(0), wait_for=FrameType.EOF)
    peers.start(agent)
    api.run(peers.path, ["cat"], input=b"")
    assert agent.client_closed.wait(WAIT)
    assert agent.frame_types() == [FrameType.START, FrameType.EOF]


@pytest.mark.parametrize(
    "options",
    [
        {"input": "text"},
        {"timeout": -1.0},
        {"cmd": "ls -l"},
        {"cmd": []},
        {"tty_size": (70000, 1)},
        {"env": {"A": 1}},
    ],
    ids=["str-input", "negative-timeout", "str-cmd", "empty-cmd", "size", "env"],
)
def test_bad_argument_before_connect(
    api: Api, peers: Peers, options: dict[str, Any]
) -> None:
    peer = peers.start(Agent(exit_frame(0)))
    options = dict(options)
    cmd = options.pop("cmd", ["true"])
    before = open_sockets()
    with pytest.raises((TypeError, ValueError)):
        api.run(peers.path, cmd, **options)
    assert peer.connections == 0
    assert open_sockets() == before


class PartialFlushWriter:
    """A frame writer whose kernel takes all but one byte on the first flush
    and everything on later ones."""

    def __init__(self) -> None:
        self.pending = 0
        self.flushes = 0

    def write(self, frame_type: int, payload: bytes = b"") -> None:
        self.pending += HEADER_SIZE + len(payload)

    def flush(self, fd: int) -> int:
        self.flushes += 1
        self.pending = 1 if self.flushes == 1 else 0
        return self.pending


def test_send_input_leaves_work_pending() -> None:
    # Returning with stdin left and nothing pending would make the caller
    # poll only for output, which the command may write only after EOF.
    host, guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    core = SessionCore(Handshake(host, HOST_PORT, b"", 1))
    core.writer = PartialFlushWriter()
    feeder = InputFeeder(b"x" * (2 * STDIN_CHUNK))
    try:
        core.send_input(feeder)
        assert core.pending_writes > 0
        assert not feeder.eof_sent
    finally:
        core.close()
        guest.close()


# -- run: what the caller receives -------------------------------------------


def test_run_output_exact(api: Api, peers: Peers) -> None:
    binary = bytes(range(256))
    peers.start(
        Agent(
            stdout_frame(b"one "),
            stderr_frame(binary),
            stdout_frame(b"two\n"),
            stderr_frame(b"\x00end"),
            exit_frame(0),
        )
    )
    result = api.run(peers.path, ["prog"])
    assert result.stdout == b"one two\n"
    assert result.stderr == binary + b"\x00end"
    assert result.exit_code == 0
    assert result.signal is None
    assert result.ok


def test_run_output_in_one_write(api: Api, peers: Peers) -> None:
    script = b"".join(stdout_frame(b"%d," % i) for i in range(1000))
    peers.start(Agent(script + exit_frame(0)))
    result = api.run(peers.path, ["seq"])
    assert result.stdout == b"".join(b"%d," % i for i in range(1000))


def test_stream_keeps_order(api: Api, peers: Peers) -> None:
    peers.start(
        Agent(
            stdout_frame(b"a"),
            stderr_frame(b"b"),
            stdout_frame(b"c"),
            stderr_frame(b"d"),
            exit_frame(3),
        )
    )
    items = api.stream(peers.path, ["prog"])
    assert items == [
        Output("stdout", b"a"),
        Output("stderr", b"b"),
        Output("stdout", b"c"),
        Output("stderr", b"d"),
        ExitStatus(3),
    ]


def test_stream_exit_only(api: Api, peers: Peers) -> None:
    peers.start(Agent(exit_frame(0)))
    assert api.stream(peers.path, ["true"]) == [ExitStatus(0)]


def test_exit_code_four_bytes(api: Api, peers: Peers) -> None:
    peers.start(Agent(exit_frame(42)))
    result = api.run(peers.path, ["false"])
    assert result.exit_code == 42
    assert result.signal is None
    assert not result.ok


def test_exit_code_negative(api: Api, peers: Peers) -> None:
    peers.start(Agent(exit_frame(-1)))
    assert api.run(peers.path, ["x"]).exit_code == -1


def test_exit_with_signal(api: Api, peers: Peers) -> None:
    peers.start(Agent(exit_frame(137, 9)))
    result = api.run(peers.path, ["sleep", "100"])
    assert result.exit_code == 137
    assert result.signal == 9


def test_exit_signal_zero_is_none(api: Api, peers: Peers) -> None:
    peers.start(Agent(frame(FrameType.EXIT, struct.pack("<ii", 1, 0))))
    assert api.run(peers.path, ["false"]).signal is None


@pytest.mark.parametrize("size", [0, 1, 3])
def test_short_exit_payload(api: Api, peers: Peers, size: int) -> None:
    peers.start(
        Agent(
            stdout_frame(b"out"),
            stderr_frame(b"err"),
            frame(FrameType.EXIT, b"\x00" * size),
        )
    )
    with pytest.raises(SessionProtocolError) as caught:
        api.run(peers.path, ["prog"])
    assert isinstance(caught.value, ProtocolError)
    assert isinstance(caught.value, ValueError)
    assert caught.value.stdout == b"out"
    assert caught.value.stderr == b"err"


def test_frames_after_exit_ignored(api: Api, peers: Peers) -> None:
    peers.start(
        Agent(
            stdout_frame(b"before"),
            exit_frame(0) + stdout_frame(b"after") + frame(0x7F, b"junk"),
            stdout_frame(b"late"),
            frame(FrameType.EXIT, b""),
        )
    )
    result = api.run(peers.path, ["prog"])
    assert result.stdout == b"before"
    assert result.exit_code == 0


def test_garbage_after_exit_ignored(api: Api, peers: Peers) -> None:
    oversized = struct.pack("<BI", FrameType.STDOUT, MAX_PAYLOAD + 1)
    peers.start(Agent(exit_frame(5) + oversized))
    assert api.run(peers.path, ["prog"]).exit_code == 5


def test_unknown_frame_skipped(api: Api, peers: Peers) -> None:
    peers.start(
        Agent(
            stdout_frame(b"a"),
            frame(0x7F, b"future"),
            frame(FrameType.START, b"{}"),
            frame(0x13),
            stdout_frame(b"b"),
            exit_frame(0),
        )
    )
    assert api.run(peers.path, ["prog"]).stdout == b"ab"


def test_empty_output_frame_skipped(api: Api, peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b""), stdout_frame(b"x"), exit_frame(0)))
    items = api.stream(peers.path, ["prog"])
    assert items == [Output("stdout", b"x"), ExitStatus(0)]


def test_reply_output_exit_and_close(api: Api, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        read_line(conn)
        conn.sendall(OK_REPLY + stdout_frame(b"early") + exit_frame(0))

    peers.start(handler)
    result = api.run(peers.path, ["prog"])
    assert result.stdout == b"early"
    assert result.exit_code == 0


def test_first_frame_with_reply(api: Api, peers: Peers) -> None:
    agent = Agent(stdout_frame(b"second"), exit_frame(0))
    agent.reply = OK_REPLY + stdout_frame(b"first ")
    peers.start(agent)
    assert api.run(peers.path, ["prog"]).stdout == b"first second"


def test_check_raises(api: Api, peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"o"), stderr_frame(b"e"), exit_frame(2)))
    with pytest.raises(CommandFailedError) as caught:
        api.run(peers.path, ["false"], check=True)
    assert caught.value.exit_code == 2
    assert caught.value.signal is None
    assert caught.value.stdout == b"o"
    assert caught.value.stderr == b"e"
    assert "code 2" in str(caught.value)


def test_check_names_signal(api: Api, peers: Peers) -> None:
    peers.start(Agent(exit_frame(143, 15)))
    with pytest.raises(CommandFailedError) as caught:
        api.run(peers.path, ["sleep"], check=True)
    assert caught.value.signal == 15
    assert "signal 15" in str(caught.value)


def test_check_passes(api: Api, peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"fine"), exit_frame(0)))
    assert api.run(peers.path, ["true"], check=True).stdout == b"fine"


def test_max_size_frame_accepted(api: Api, peers: Peers) -> None:
    payload = bytes(range(256)) * (MAX_PAYLOAD // 256)
    peers.start(Agent(stdout_frame(payload), exit_frame(0)))
    result = api.run(peers.path, ["prog"])
    assert len(result.stdout) == MAX_PAYLOAD
    assert result.stdout == payload


# -- run: failures ------------------------------------------------------------


def test_close_without_exit(api: Api, peers: Peers) -> None:
    peers.start(
        Agent(
            stdout_frame(b"part"),
            stderr_frame(b"ial"),
            close=True,
            wait_for=FrameType.EOF,
        )
    )
    with pytest.raises(ConnectionLostError) as caught:
        api.run(peers.path, ["prog"])
    assert isinstance(caught.value, ConnectionError)
    assert isinstance(caught.value, SessionError)
    assert caught.value.stdout == b"part"
    assert caught.value.stderr == b"ial"
    assert caught.value.__cause__ is None


def close_with_unread(*script: bytes) -> Callable[[socket.socket], None]:
    """A handler that sends ``script`` and closes with START still unread."""

    def handler(conn: socket.socket) -> None:
        read_line(conn)
        conn.sendall(OK_REPLY + b"".join(script))
        conn.recv(1, socket.MSG_PEEK)

    return handler


def test_reset_without_exit(api: Api, peers: Peers) -> None:
    peers.start(close_with_unread(stdout_frame(b"part"), stderr_frame(b"ial")))
    with pytest.raises(ConnectionLostError) as caught:
        api.run(peers.path, ["prog"])
    assert caught.value.stdout == b"part"
    assert caught.value.stderr == b"ial"
    assert isinstance(caught.value.__cause__, ConnectionResetError)


def test_reset_inside_payload(api: Api, peers: Peers) -> None:
    header = struct.pack("<BI", FrameType.STDOUT, 10)
    peers.start(close_with_unread(stdout_frame(b"part"), header + b"123"))
    with pytest.raises(ConnectionLostError) as caught:
        api.run(peers.path, ["prog"])
    assert caught.value.stdout == b"part"
    cause = caught.value.__cause__
    assert isinstance(cause, IncompleteFrameError)
    assert cause.part == "payload"
    assert isinstance(cause.__context__, ConnectionResetError)


def test_stream_close_without_exit(api: Api, peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"part"), close=True, wait_for=FrameType.EOF))
    with pytest.raises(ConnectionLostError):
        api.stream(peers.path, ["prog"])


def test_eof_inside_header(api: Api, peers: Peers) -> None:
    header = struct.pack("<BI", FrameType.STDOUT, 10)
    peers.start(
        Agent(stdout_frame(b"part"), header[:3], close=True, wait_for=FrameType.EOF)
    )
    with pytest.raises(ConnectionLostError) as caught:
        api.run(peers.path, ["prog"])
    cause = caught.value.__cause__
    assert isinstance(cause, IncompleteFrameError)
    assert cause.part == "header"
    assert caught.value.stdout == b"part"


def test_eof_inside_payload(api: Api, peers: Peers) -> None:
    header = struct.pack("<BI", FrameType.STDERR, 10)
    peers.start(
        Agent(
            stderr_frame(b"part"), header + b"1234", close=True, wait_for=FrameType.EOF
        )
    )
    with pytest.raises(ConnectionLostError) as caught:
        api.run(peers.path, ["prog"])
    cause = caught.value.__cause__
    assert isinstance(cause, IncompleteFrameError)
    assert cause.part == "payload"
    assert cause.received == 4
    assert cause.expected == 10
    assert caught.value.stderr == b"part"


def test_oversized_frame_rejected(api: Api, peers: Peers) -> None:
    agent = Agent(
        stdout_frame(b"part"), struct.pack("<BI", FrameType.STDOUT, MAX_PAYLOAD + 1)
    )
    peers.start(agent)
    tracemalloc.start()
    try:
        with pytest.raises(SessionProtocolError) as caught:
            api.run(peers.path, ["prog"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(caught.value.__cause__, FrameTooLargeError)
    assert caught.value.stdout == b"part"
    assert peak < MAX_PAYLOAD // 4
    assert agent.client_closed.wait(WAIT)


def test_guest_closes_at_once(api: Api, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        read_line(conn)
        conn.sendall(OK_REPLY)

    peers.start(handler)
    with pytest.raises(ConnectionLostError):
        api.run(peers.path, ["prog"], input=b"x" * (1024 * 1024))


def test_exit_before_input_read(api: Api, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        accept_start(conn)
        conn.sendall(stdout_frame(b"done") + exit_frame(0))
        wait_until_eof(conn)

    peers.start(handler)
    result = api.run(peers.path, ["head", "-c0"], input=b"x" * (8 * 1024 * 1024))
    assert result.stdout == b"done"


def test_host_timeout(api: Api, peers: Peers) -> None:
    agent = Agent(stdout_frame(b"partial"), stderr_frame(b"err"))
    peers.start(agent)
    with pytest.raises(SessionTimeoutError) as caught:
        api.run(peers.path, ["sleep", "100"], timeout=0.3)
    assert isinstance(caught.value, TimeoutError)
    assert caught.value.stdout == b"partial"
    assert caught.value.stderr == b"err"
    assert "0.3 s" in str(caught.value)
    assert agent.client_closed.wait(WAIT)


def test_stream_host_timeout(api: Api, peers: Peers) -> None:
    agent = Agent(stdout_frame(b"partial"))
    peers.start(agent)
    with pytest.raises(SessionTimeoutError):
        api.stream(peers.path, ["sleep", "100"], timeout=0.3)
    assert agent.client_closed.wait(WAIT)


def test_run_closes_socket(api: Api, peers: Peers) -> None:
    peer = peers.start(Agent(stdout_frame(b"x"), exit_frame(0)))
    before = open_sockets()
    api.run(peers.path, ["prog"])
    peer.wait_served(1)
    assert open_sockets() == before


def test_failed_run_closes_socket(api: Api, peers: Peers) -> None:
    peer = peers.start(Agent(frame(FrameType.EXIT, b"")))
    before = open_sockets()
    with pytest.raises(SessionProtocolError):
        api.run(peers.path, ["prog"])
    peer.wait_served(1)
    assert open_sockets() == before


# -- sync_clock ---------------------------------------------------------------


class ClockAgent:
    """Reply to the handshake after a pause, then reply to CLOCK_SYNC."""

    def __init__(
        self,
        reply_code: int | None = 0,
        pause: float = 0.05,
        reply_signal: int | None = None,
    ) -> None:
        self.reply_code = reply_code
        self.reply_signal = reply_signal
        self.pause = pause
        self.ok_sent_ns = 0
        self.frames: list[tuple[int, bytes]] = []
        self.client_closed = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        read_line(conn)
        # The pause separates the handshake from the time the client sends,
        # so a timestamp taken before the reply would show.
        threading.Event().wait(self.pause)
        self.ok_sent_ns = time.time_ns()
        conn.sendall(OK_REPLY)
        self.frames.append(read_frame(conn))
        if self.reply_code is not None:
            conn.sendall(exit_frame(self.reply_code, self.reply_signal))
        read_frames_until_eof(conn, self.frames)
        self.client_closed.set()


def test_sync_clock_sends_time(api: Api, peers: Peers) -> None:
    agent = ClockAgent()
    peers.start(agent)
    before = time.time_ns()
    sent = api.sync_clock(peers.path)
    after = time.time_ns()
    assert agent.client_closed.wait(WAIT)
    [(frame_type, payload)] = agent.frames
    assert frame_type == FrameType.CLOCK_SYNC
    assert len(payload) == 12
    seconds, nanoseconds = decode_clock_sync(payload)
    guest_time = seconds * 1_000_000_000 + nanoseconds
    assert guest_time == sent
    assert before <= guest_time <= after


def test_sync_clock_time_after_handshake(api: Api, peers: Peers) -> None:
    agent = ClockAgent(pause=0.05)
    peers.start(agent)
    sent = api.sync_clock(peers.path)
    assert sent >= agent.ok_sent_ns


@pytest.mark.parametrize("code", [-1, 1])
def test_sync_clock_failure_code(api: Api, peers: Peers, code: int) -> None:
    peers.start(ClockAgent(reply_code=code, pause=0))
    with pytest.raises(ClockSyncError) as caught:
        api.sync_clock(peers.path)
    assert caught.value.exit_code == code
    assert f"code {code}" in str(caught.value)


def test_sync_clock_failure_explains_minus_one(api: Api, peers: Peers) -> None:
    peers.start(ClockAgent(reply_code=-1, pause=0))
    with pytest.raises(ClockSyncError, match="could not set the clock"):
        api.sync_clock(peers.path)


def test_sync_clock_signal_is_failure(api: Api, peers: Peers) -> None:
    peers.start(ClockAgent(reply_code=0, reply_signal=9, pause=0))
    with pytest.raises(ClockSyncError) as caught:
        api.sync_clock(peers.path)
    assert "signal 9" in str(caught.value)


def test_sync_clock_no_reply(api: Api, peers: Peers) -> None:
    agent = ClockAgent(reply_code=None, pause=0)
    peers.start(agent)
    with pytest.raises(ClockSyncError) as caught:
        api.sync_clock(peers.path, reply_timeout=0.3)
    assert caught.value.exit_code is None
    assert "no reply" in str(caught.value)
    assert agent.client_closed.wait(WAIT)


def test_sync_clock_connection_lost(api: Api, peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        accept_start(conn)

    peers.start(handler)
    with pytest.raises(ClockSyncError) as caught:
        api.sync_clock(peers.path)
    assert caught.value.exit_code is None
    assert isinstance(caught.value.__cause__, ConnectionLostError)


# -- blocking stream and exec --------------------------------------------------


def test_stream_close_closes_socket(peers: Peers) -> None:
    agent = Agent(stdout_frame(b"first") + stdout_frame(b"second"))
    peer = peers.start(agent)
    before = open_sockets()
    items = fcvsock.stream(peers.path, ["prog"], connect_timeout=WAIT)
    assert next(items) == Output("stdout", b"first")
    items.close()
    assert agent.client_closed.wait(WAIT)
    peer.wait_served(1)
    assert open_sockets() == before


def test_stream_memory_bounded(peers: Peers) -> None:
    max_buffered = 16 * 1024
    frame_size = 4096
    firehose = Firehose(frame_size)
    peers.start(firehose)
    items = fcvsock.stream(
        peers.path, ["yes"], connect_timeout=WAIT, max_buffered=max_buffered
    )
    try:
        assert next(items) == Output("stdout", b"x" * frame_size)
        assert firehose.blocked.wait(WAIT)
        assert firehose.sent > 4 * max_buffered
        core = items.gi_frame.f_locals["core"]
        assert_bounded(core, max_buffered, frame_size)

        for _ in range(len(core.queue) + 1):
            assert next(items) == Output("stdout", b"x" * frame_size)
        assert_bounded(core, max_buffered, frame_size)
    finally:
        items.close()


def assert_bounded(core: Any, max_buffered: int, frame_size: int) -> None:
    assert core.buffered <= max_buffered + frame_size
    assert core.buffered + core.decoder.buffered <= (
        max_buffered + frame_size + HEADER_SIZE
    )


def open_exec(path: str, **options: Any) -> fcvsock.ExecSession:
    options.setdefault("connect_timeout", WAIT)
    return fcvsock.exec(path, ["sh"], **options)


def test_exec_sends_control_frames(peers: Peers) -> None:
    agent = Agent(stdout_frame(b"out"), exit_frame(0), wait_for=FrameType.EOF)
    peers.start(agent)
    with open_exec(peers.path, tty=True) as session:
        session.write(b"echo hi\n")
        session.write(b"")
        session.resize(100, 30)
        session.signal(15)
        session.close_stdin()
        session.close_stdin()
        assert list(session) == [Output("stdout", b"out")]
        assert session.wait() == ExitStatus(0)
    assert agent.client_closed.wait(WAIT)
    assert agent.frames[1:] == [
        (FrameType.STDIN, b"echo hi\n"),
        (FrameType.RESIZE, struct.pack("<HH", 100, 30)),
        (FrameType.SIGNAL, struct.pack("<i", 15)),
        (FrameType.EOF, b""),
    ]


def test_exec_host_port(peers: Peers) -> None:
    peers.start(Agent(exit_frame(0)))
    with open_exec(peers.path) as session:
        assert session.host_port == HOST_PORT
        assert session.exit_status is None
        session.wait()
        assert session.exit_status == ExitStatus(0)


def test_exec_large_write(peers: Peers) -> None:
    data = bytes(range(256)) * 8192
    agent = Agent(exit_frame(0), wait_for=FrameType.EOF)
    peers.start(agent)
    with open_exec(peers.path) as session:
        session.write(data)
        session.close_stdin()
        assert session.wait() == ExitStatus(0)
    assert agent.client_closed.wait(WAIT)
    assert b"".join(agent.payloads(FrameType.STDIN)) == data


@pytest.mark.parametrize("number", [0, 65, -1, 2**31])
def test_exec_invalid_signal(peers: Peers, number: int) -> None:
    agent = Agent()
    peers.start(agent)
    with open_exec(peers.path) as session, pytest.raises(ValueError, match="signal"):
        session.signal(number)
    assert agent.client_closed.wait(WAIT)
    assert agent.frame_types() == [FrameType.START]


@pytest.mark.parametrize("number", ["9", 9.0, True, None])
def test_exec_signal_wrong_type(peers: Peers, number: object) -> None:
    agent = Agent()
    peers.start(agent)
    with open_exec(peers.path) as session, pytest.raises((TypeError, ValueError)):
        session.signal(number)  # type: ignore[arg-type]
    assert agent.client_closed.wait(WAIT)
    assert agent.frame_types() == [FrameType.START]


def test_exec_invalid_resize(peers: Peers) -> None:
    agent = Agent()
    peers.start(agent)
    with open_exec(peers.path) as session, pytest.raises(ValueError, match="resize"):
        session.resize(65536, 10)
    assert agent.client_closed.wait(WAIT)
    assert agent.frame_types() == [FrameType.START]


def test_exec_write_after_close_stdin(peers: Peers) -> None:
    peers.start(Agent())
    with open_exec(peers.path) as session:
        session.close_stdin()
        with pytest.raises(ValueError, match="stdin"):
            session.write(b"late")


def test_exec_exit_after_output(peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"a"), stderr_frame(b"b"), exit_frame(1, None)))
    with open_exec(peers.path) as session:
        assert session.read() == Output("stdout", b"a")
        assert session.read() == Output("stderr", b"b")
        assert session.read() is None
        assert session.read() is None
        assert session.wait() == ExitStatus(1)


def test_exec_wait_discards_output(peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"a" * 100_000), exit_frame(0)))
    with open_exec(peers.path, max_buffered=1024) as session:
        assert session.wait() == ExitStatus(0)
        assert session.read() is None


def test_exec_context_closes_socket(peers: Peers) -> None:
    agent = Agent(stdout_frame(b"running"))
    peer = peers.start(agent)
    before = open_sockets()
    with open_exec(peers.path) as session:
        assert session.read() == Output("stdout", b"running")
    assert agent.client_closed.wait(WAIT)
    peer.wait_served(1)
    assert open_sockets() == before


def test_exec_read_after_close(peers: Peers) -> None:
    peers.start(Agent())
    with open_exec(peers.path) as session:
        pass
    with pytest.raises(ConnectionLostError):
        session.read()
    with pytest.raises(ConnectionLostError):
        session.write(b"x")


def test_exec_lost_connection(peers: Peers) -> None:
    peers.start(Agent(stdout_frame(b"out"), close=True))
    with open_exec(peers.path) as session:
        assert session.read() == Output("stdout", b"out")
        with pytest.raises(ConnectionLostError):
            session.read()


def test_exec_session_timeout(peers: Peers) -> None:
    agent = Agent(stdout_frame(b"partial"))
    peers.start(agent)
    with open_exec(peers.path, timeout=0.3) as session:
        assert session.read() == Output("stdout", b"partial")
        with pytest.raises(SessionTimeoutError):
            session.read()
    assert agent.client_closed.wait(WAIT)


def test_exec_wait_timeout(peers: Peers) -> None:
    agent = Agent(stdout_frame(b"unread"))
    peers.start(agent)
    with open_exec(peers.path) as session, pytest.raises(SessionTimeoutError) as caught:
        session.wait(timeout=0.2)
    assert "0.2 s" in str(caught.value)
    assert agent.client_closed.wait(WAIT)


def test_exec_memory_bounded(peers: Peers) -> None:
    max_buffered = 16 * 1024
    frame_size = 4096
    firehose = Firehose(frame_size)
    peers.start(firehose)
    with open_exec(peers.path, max_buffered=max_buffered) as session:
        assert firehose.blocked.wait(WAIT)
        assert firehose.sent > 4 * max_buffered
        assert session.read() == Output("stdout", b"x" * frame_size)
        assert_bounded(session._core, max_buffered, frame_size)


# -- raw connections -------------------------------------------------------------


def test_connect_initial_data_first(peers: Peers) -> None:
    def handler(conn: socket.socket) -> None:
        read_line(conn)
        conn.sendall(OK_REPLY + b"first")
        conn.sendall(b" second")
        wait_until_eof(conn)

    peers.start(handler)
    handshake = fcvsock.connect(peers.path, 5000, timeout=WAIT)
    with handshake.sock:
        handshake.sock.setblocking(True)
        handshake.sock.settimeout(WAIT)
        received = handshake.initial_data
        while len(received) < len(b"first second"):
            received += handshake.sock.recv(64)
    assert received == b"first second"
    assert handshake.initial_data.startswith(b"first")
