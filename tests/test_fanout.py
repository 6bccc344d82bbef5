"""Fan-out: one command on many VMs, through the API and ``fcvsock fanout``.

Most tests run against scripted VMM sockets.  The fleet tests run real
commands through stand-in VMs: one LocalVM runs the agent, and the others
relay their port 52 to it, because starting an agent process per VM costs
about a third of a second each.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from processes import processes_with_args, wait_until
from scripted_peer import (
    WAIT,
    Agent,
    Peers,
    accept_start,
    exit_frame,
    run_in_loop,
    stderr_frame,
    stdout_frame,
    wait_event,
    wait_until_eof,
)

from fcvsock import cli, fanout, fanout_cli
from fcvsock.fanout import (
    ErrorKind,
    LineSplitter,
    Target,
    VMOutput,
    VMResult,
)
from fcvsock.localvm import LocalVM
from fcvsock.protocol import FrameType, StartRequest
from fcvsock.session import ExitStatus

# A connect deadline for sockets that never become ready: short, because
# nothing can change within it.
UNREACHABLE_WITHIN = 0.2


@pytest.fixture
def vms_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte limit of sun_path.
    with tempfile.TemporaryDirectory(prefix="fcv") as directory:
        yield Path(directory)


@pytest.fixture
def peers(vms_dir: Path) -> Iterator[Peers]:
    started = Peers(str(vms_dir / "unused.sock"))
    yield started
    started.close()


def socket_path(vms_dir: Path, name: str) -> str:
    """Return ``vms_dir/NAME/v.sock``, creating the directory."""
    directory = vms_dir / name
    directory.mkdir(exist_ok=True)
    return str(directory / "v.sock")


def open_sockets() -> dict[str, str]:
    """Return this process's open socket fds, each with its inode."""
    # Socket objects that are unreachable but not yet collected still hold
    # their fds.
    gc.collect()
    sockets = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:"):
                sockets[fd] = target
    return sockets


def start_vm(
    peers: Peers, vms_dir: Path, name: str, handler: Callable[..., None]
) -> str:
    path = socket_path(vms_dir, name)
    peers.start(handler, path)
    return path


def ok_agent(*chunks: bytes, code: int = 0) -> Agent:
    return Agent(*(stdout_frame(chunk) for chunk in chunks), exit_frame(code))


def result_named(results: list[VMResult], name: str) -> VMResult:
    return next(result for result in results if result.name == name)


# -- line splitter ------------------------------------------------------------


def test_splitter_whole_lines() -> None:
    splitter = LineSplitter()
    assert splitter.feed("a", b"one\ntwo\n") == [b"one\n", b"two\n"]
    assert splitter.pending == 0


def test_splitter_joins_across_chunks() -> None:
    splitter = LineSplitter()
    assert splitter.feed("a", b"on") == []
    assert splitter.feed("a", b"e\ntw") == [b"one\n"]
    assert splitter.feed("a", b"o\n") == [b"two\n"]


def test_splitter_keys_independent() -> None:
    splitter = LineSplitter()
    assert splitter.feed(("vm-1", "stdout"), b"from one ") == []
    assert splitter.feed(("vm-2", "stdout"), b"from two\n") == [b"from two\n"]
    assert splitter.feed(("vm-1", "stdout"), b"done\n") == [b"from one done\n"]


def test_splitter_flush_returns_partial() -> None:
    splitter = LineSplitter()
    splitter.feed("a", b"whole\npartial")
    assert splitter.pending == 1
    assert splitter.flush("a") == b"partial"
    assert splitter.flush("a") == b""
    assert splitter.pending == 0


def test_splitter_keeps_carriage_return() -> None:
    splitter = LineSplitter()
    assert splitter.feed("a", b"10%\r50%\r100%\n") == [b"10%\r50%\r100%\n"]


def test_splitter_cuts_long_line() -> None:
    splitter = LineSplitter(max_line=4)
    assert splitter.feed("a", b"abcdefghij") == [b"abcd", b"efgh"]
    assert splitter.flush("a") == b"ij"


def test_splitter_rejects_zero_max_line() -> None:
    with pytest.raises(ValueError, match="max_line"):
        LineSplitter(max_line=0)


# -- names and targets --------------------------------------------------------


@pytest.mark.parametrize(
    ("name_from", "expected"),
    [
        ("parent", "web-1"),
        ("stem", "v"),
        ("path", "/srv/vms/web-1/v.sock"),
        ("{parent}.{file}", "web-1.v.sock"),
        ("{stem}@{parent}", "v@web-1"),
    ],
)
def test_vm_name_styles(name_from: str, expected: str) -> None:
    assert fanout.vm_name("/srv/vms/web-1/v.sock", name_from) == expected


def test_vm_name_callable() -> None:
    assert fanout.vm_name("/a/b.sock", lambda path: path.upper()) == "/A/B.SOCK"


def test_vm_name_empty_falls_back_to_path() -> None:
    assert fanout.vm_name("/v.sock", "parent") == "/v.sock"


@pytest.mark.parametrize(
    ("name_from", "reason"),
    [
        ("basename", "expected parent, stem, path or a format"),
        ("{unknown}", "unknown field {unknown}; use {path}, {parent}, {file} or"),
        ("{}", "unknown field {}"),
        ("{path.__class__}", "unknown field {path.__class__}"),
        ("{", "write '{{' or '}}' for a literal brace"),
        ("{file:d}", "unknown format code 'd'"),
    ],
)
def test_vm_name_invalid_style(name_from: str, reason: str) -> None:
    with pytest.raises(ValueError) as raised:
        fanout.vm_name("/srv/vms/web-1/v.sock", name_from)
    message = str(raised.value)
    assert message.startswith(f"vm name: invalid name_from {name_from!r}: ")
    assert reason in message


def test_vm_name_format_spec() -> None:
    assert fanout.vm_name("/srv/vms/web-1/v.sock", "{parent:.3}") == "web"


def test_expand_invalid_style_before_paths() -> None:
    with pytest.raises(ValueError, match="expand targets: invalid name_from 'dir'"):
        fanout.expand_targets([], name_from="dir")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("web-1", "web-1"),
        ("caf\u00e9", "caf\u00e9"),
        ("a b", "a b"),
        ("evil\nweb-9 | FAKE OK", "evil\\nweb-9 | FAKE OK"),
        ("tab\there\r", "tab\\there\\r"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("\x00", "\\x00"),
        ("right\u202eleft", "right\\xe2\\x80\\xaeleft"),
        ("vm-\udcff", "vm-\\xff"),
        ("back\\slash", "back\\\\slash"),
    ],
)
def test_escape_name(name: str, shown: str) -> None:
    assert fanout.escape_name(name) == shown


def test_escape_name_keeps_names_apart() -> None:
    assert fanout.escape_name("a\nb") != fanout.escape_name("a\\nb")


def test_expand_glob_natural_order(vms_dir: Path) -> None:
    for number in (10, 2, 1):
        Path(socket_path(vms_dir, f"vm-{number}")).touch()
    targets = fanout.expand_targets(str(vms_dir / "*" / "v.sock"))
    assert [target.name for target in targets] == ["vm-1", "vm-2", "vm-10"]
    assert targets[0].uds_path == str(vms_dir / "vm-1" / "v.sock")


def test_expand_glob_without_match(vms_dir: Path) -> None:
    with pytest.raises(ValueError, match="matched no path"):
        fanout.expand_targets([str(vms_dir / "*" / "v.sock")])


def test_expand_keeps_missing_plain_path(vms_dir: Path) -> None:
    path = str(vms_dir / "later" / "v.sock")
    assert fanout.expand_targets([path]) == [Target("later", path)]


def test_expand_uses_path_once(vms_dir: Path) -> None:
    path = socket_path(vms_dir, "vm-1")
    Path(path).touch()
    targets = fanout.expand_targets([path, str(vms_dir / "vm-*" / "v.sock")])
    assert targets == [Target("vm-1", path)]


def test_expand_rejects_duplicate_names(vms_dir: Path) -> None:
    paths = [socket_path(vms_dir, "a"), socket_path(vms_dir, "b")]
    with pytest.raises(ValueError) as raised:
        fanout.expand_targets(paths, name_from="stem")
    message = str(raised.value)
    assert "'v' is used by both" in message
    assert message.endswith("; choose another name_from")


def test_expand_passes_targets_through() -> None:
    target = Target("db", "/run/db.sock", cmd=["true"], port=1024)
    assert fanout.expand_targets([target]) == [target]


def test_target_stores_cmd_as_tuple() -> None:
    target = Target("db", "/run/db.sock", cmd=["echo", "hi"])
    assert target.cmd == ("echo", "hi")
    assert hash(target) == hash(Target("db", "/run/db.sock", cmd=("echo", "hi")))


def test_target_rejects_string_cmd() -> None:
    with pytest.raises(TypeError, match="sequence of arguments"):
        Target("db", "/run/db.sock", cmd="echo hi")


# -- results ------------------------------------------------------------------


def make_result(
    exit_status: ExitStatus | None = None, error: ErrorKind | None = None
) -> VMResult:
    return VMResult(
        Target("vm-1", "/srv/vms/vm-1/v.sock"), exit_status, error,
        "connect failed" if error else "", 1.5, b"out", b"", 3, 0,
    )


@pytest.mark.parametrize(
    ("result", "description"),
    [
        (make_result(ExitStatus(0)), "ok"),
        (make_result(ExitStatus(3)), "exit code 3"),
        (make_result(ExitStatus(137, 9)), "killed by signal 9 (SIGKILL)"),
        (make_result(error=ErrorKind.TIMED_OUT), "timed out"),
        (make_result(error=ErrorKind.PROTOCOL_ERROR), "protocol error"),
    ],
)
def test_result_describe(result: VMResult, description: str) -> None:
    assert result.describe() == description


def test_result_to_dict() -> None:
    record = make_result(error=ErrorKind.UNREACHABLE).to_dict()
    assert record == {
        "name": "vm-1",
        "uds_path": "/srv/vms/vm-1/v.sock",
        "exit_code": None,
        "signal": None,
        "duration": 1.5,
        "error": "unreachable",
        "error_message": "connect failed",
        "stdout_bytes": 3,
        "stderr_bytes": 0,
    }


# -- running against scripted VMs ---------------------------------------------


def test_run_outcome_per_vm(peers: Peers, vms_dir: Path) -> None:
    start_vm(peers, vms_dir, "ok", ok_agent(b"fine\n"))
    start_vm(peers, vms_dir, "failing", Agent(stderr_frame(b"no\n"), exit_frame(3)))
    start_vm(peers, vms_dir, "killed", Agent(exit_frame(137, 9)))
    results = fanout.run_blocking(str(vms_dir / "*" / "v.sock"), ["true"])
    assert [result.name for result in results] == ["failing", "killed", "ok"]
    failing, killed, ok = results
    assert ok.ok
    assert ok.stdout == b"fine\n"
    assert ok.error is None
    assert failing.exit_code == 3
    assert failing.stderr == b"no\n"
    assert killed.exit_code == 137
    assert killed.signal == 9


def test_run_unreachable_missing_socket(vms_dir: Path) -> None:
    path = str(vms_dir / "down" / "v.sock")
    [result] = fanout.run_blocking(
        [path], ["true"], connect_timeout=UNREACHABLE_WITHIN
    )
    assert result.error is ErrorKind.UNREACHABLE
    assert result.exit_status is None
    assert "not ready" in result.error_message


def test_run_unreachable_not_a_socket(vms_dir: Path) -> None:
    path = socket_path(vms_dir, "file")
    Path(path).touch()
    [result] = fanout.run_blocking([path], ["true"])
    assert result.error is ErrorKind.UNREACHABLE


def test_run_timed_out(peers: Peers, vms_dir: Path) -> None:
    agent = Agent(stdout_frame(b"started\n"))
    path = start_vm(peers, vms_dir, "stuck", agent)
    [result] = fanout.run_blocking([path], ["sleep", "60"], timeout=0.2)
    assert result.error is ErrorKind.TIMED_OUT
    assert result.stdout == b"started\n"
    assert agent.client_closed.wait(WAIT)


def test_run_protocol_error_in_handshake(peers: Peers, vms_dir: Path) -> None:
    path = start_vm(peers, vms_dir, "odd", Agent(reply=b"HELLO\n"))
    [result] = fanout.run_blocking([path], ["true"])
    assert result.error is ErrorKind.PROTOCOL_ERROR


def test_run_protocol_error_in_session(peers: Peers, vms_dir: Path) -> None:
    oversized = bytes([FrameType.STDOUT]) + (2**31).to_bytes(4, "little")
    path = start_vm(peers, vms_dir, "odd", Agent(oversized))
    [result] = fanout.run_blocking([path], ["true"])
    assert result.error is ErrorKind.PROTOCOL_ERROR


def test_run_rejects_frame_above_session_cap(peers: Peers, vms_dir: Path) -> None:
    # Legal under the protocol's 16 MiB limit, but above what fan-out accepts
    # per session; only the header is sent, so nothing is allocated for it.
    header = bytes([FrameType.STDOUT]) + (fanout.SESSION_MAX_FRAME + 1).to_bytes(
        4, "little"
    )
    path = start_vm(peers, vms_dir, "big", Agent(stdout_frame(b"x\n"), header))
    [result] = fanout.run_blocking([path], ["true"])
    assert result.error is ErrorKind.PROTOCOL_ERROR
    assert result.stdout == b"x\n"


def test_run_connection_lost(peers: Peers, vms_dir: Path) -> None:
    path = start_vm(peers, vms_dir, "gone", Agent(stdout_frame(b"x\n"), close=True))
    [result] = fanout.run_blocking([path], ["true"])
    assert result.error is ErrorKind.CONNECTION_LOST
    assert result.stdout == b"x\n"


def test_run_sends_start_and_input(peers: Peers, vms_dir: Path) -> None:
    agent = Agent(exit_frame(0), wait_for=FrameType.EOF)
    path = start_vm(peers, vms_dir, "vm", agent)
    fanout.run_blocking(
        [path], ["cat"], input=b"data", env={"A": "1"}, cwd="/tmp", user="nobody",
        timeout_seconds=7,
    )
    start = StartRequest.decode(agent.payloads(FrameType.START)[0])
    assert start.cmd == ["cat"]
    assert start.env == {"A": "1"}
    assert start.working_dir == "/tmp"
    assert start.user == "nobody"
    assert start.timeout_seconds == 7
    assert agent.payloads(FrameType.STDIN) == [b"data"]


def test_run_command_per_target(peers: Peers, vms_dir: Path) -> None:
    first, second = ok_agent(), ok_agent()
    targets = [
        Target("a", start_vm(peers, vms_dir, "a", first), cmd=["uname"]),
        Target("b", start_vm(peers, vms_dir, "b", second)),
    ]
    fanout.run_blocking(targets, ["hostname"])
    assert StartRequest.decode(first.payloads(FrameType.START)[0]).cmd == ["uname"]
    assert StartRequest.decode(second.payloads(FrameType.START)[0]).cmd == ["hostname"]


def test_run_keeps_output_head(peers: Peers, vms_dir: Path) -> None:
    path = start_vm(peers, vms_dir, "big", ok_agent(b"a" * 600, b"b" * 600))
    [result] = fanout.run_blocking([path], ["true"], max_output=1000)
    assert result.stdout == b"a" * 600 + b"b" * 400
    assert result.stdout_bytes == 1200
    assert result.truncated


def test_run_keeps_only_sizes(peers: Peers, vms_dir: Path) -> None:
    path = start_vm(peers, vms_dir, "big", ok_agent(b"a" * 600))
    [result] = fanout.run_blocking([path], ["true"], max_output=0)
    assert result.stdout == b""
    assert result.stdout_bytes == 600


class Gate:
    """A handler that counts sessions in flight and lets them go in groups.

    Each session waits at a barrier of ``parties`` before it exits, so a
    fan-out with fewer sessions in flight breaks the barrier.
    """

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=WAIT)
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0

    def __call__(self, conn: socket.socket) -> None:
        accept_start(conn)
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.barrier.wait()
        with self.lock:
            self.active -= 1
        conn.sendall(exit_frame(0))
        wait_until_eof(conn)


def test_run_parallel_limit(peers: Peers, vms_dir: Path) -> None:
    gate = Gate(3)
    paths = [start_vm(peers, vms_dir, f"vm-{i}", gate) for i in range(9)]
    results = fanout.run_blocking(paths, ["true"], parallel=3)
    peers.close()
    assert all(result.ok for result in results)
    assert gate.max_active == 3


def test_stream_result_after_output(peers: Peers, vms_dir: Path) -> None:
    for name in ("a", "b", "c"):
        start_vm(peers, vms_dir, name, ok_agent(b"1\n", b"2\n", b"3\n"))

    async def collect() -> list[VMOutput | VMResult]:
        events = fanout.stream(str(vms_dir / "*" / "v.sock"), ["true"])
        async with contextlib.aclosing(events):
            return [event async for event in events]

    events = asyncio.run(collect())
    finished: set[str] = set()
    received: dict[str, bytes] = defaultdict(bytes)
    for event in events:
        if isinstance(event, VMResult):
            finished.add(event.name)
        else:
            assert event.target.name not in finished
            received[event.target.name] += event.data
    assert finished == {"a", "b", "c"}
    assert received == {"a": b"1\n2\n3\n", "b": b"1\n2\n3\n", "c": b"1\n2\n3\n"}


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_run_callbacks(peers: Peers, vms_dir: Path, loop_kind: str) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(b"x\n"))
    start_vm(peers, vms_dir, "b", ok_agent(b"y\n", code=1))
    outputs: list[tuple[str, str, bytes]] = []
    finished: list[str] = []

    def on_output(event: VMOutput) -> None:
        outputs.append((event.target.name, event.stream, event.data))

    async def on_result(result: VMResult) -> None:
        await asyncio.sleep(0)
        finished.append(result.name)

    results = run_in_loop(
        loop_kind,
        fanout.run(
            str(vms_dir / "*" / "v.sock"), ["true"], on_output=on_output,
            on_result=on_result,
        ),
    )
    assert sorted(outputs) == [("a", "stdout", b"x\n"), ("b", "stdout", b"y\n")]
    assert sorted(finished) == ["a", "b"]
    assert [result.exit_code for result in results] == [0, 1]


def test_callback_error_closes_sessions(peers: Peers, vms_dir: Path) -> None:
    start_vm(peers, vms_dir, "fast", ok_agent())
    stuck = [Agent(stdout_frame(b"started\n")) for _ in range(3)]
    for index, agent in enumerate(stuck):
        start_vm(peers, vms_dir, f"stuck-{index}", agent)

    async def on_result(result: VMResult) -> None:
        for agent in stuck:
            assert await wait_event(agent.started)
        raise RuntimeError(f"stop at {result.name}")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="stop at fast"):
            await fanout.run(
                str(vms_dir / "*" / "v.sock"), ["sleep", "60"], on_result=on_result
            )

    asyncio.run(main())
    for agent in stuck:
        assert agent.client_closed.wait(WAIT)


def test_cancel_closes_every_socket(peers: Peers, vms_dir: Path) -> None:
    sockets_before = open_sockets()
    stuck = [Agent(stdout_frame(b"started\n")) for _ in range(5)]
    for index, agent in enumerate(stuck):
        start_vm(peers, vms_dir, f"vm-{index}", agent)

    async def main() -> set[asyncio.Task[Any]]:
        task = asyncio.create_task(
            fanout.run(str(vms_dir / "*" / "v.sock"), ["sleep", "60"])
        )
        for agent in stuck:
            assert await wait_event(agent.started)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return asyncio.all_tasks() - {asyncio.current_task()}

    assert asyncio.run(main()) == set()
    for agent in stuck:
        assert agent.client_closed.wait(WAIT)
    peers.close()
    assert open_sockets() == sockets_before


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"cmd": None}, "no command for target"),
        ({"parallel": 0}, "parallel must be"),
        ({"timeout": -1.0}, "timeout must be"),
        ({"max_output": -1}, "max_output must be"),
        ({"cmd": ["a\0b"]}, "must not contain NUL"),
        ({"cmd": []}, "non-empty"),
    ],
)
def test_run_rejects_arguments_first(
    peers: Peers, vms_dir: Path, arguments: dict[str, object], error: str
) -> None:
    peer = peers.start(ok_agent(), socket_path(vms_dir, "vm"))
    call: dict[str, Any] = {"cmd": ["true"], **arguments}
    with pytest.raises(ValueError, match=error):
        fanout.run_blocking(peer.path, **call)
    assert peer.connections == 0


def test_stream_rejects_arguments_at_call(vms_dir: Path) -> None:
    with pytest.raises(ValueError, match="parallel must be"):
        fanout.stream(str(vms_dir / "vm.sock"), ["true"], parallel=0)


def test_run_rejects_string_cmd(vms_dir: Path) -> None:
    with pytest.raises(TypeError, match="sequence of arguments"):
        fanout.run_blocking(str(vms_dir / "vm.sock"), "uname -a")


# -- a fleet of stand-in VMs --------------------------------------------------

# About ten times what the slowest ok VM took with the pure-Python core on
# two cores.  The stuck VMs run this long, so it sets the fleet test's run time.
FLEET_TIMEOUT = 4.0
FLEET_CONNECT_TIMEOUT = 2.0
# A sleep with an unusual argument, so the test finds exactly its processes.
STUCK_SLEEP = "61.25"


@pytest.fixture(scope="module")
def hub() -> Iterator[LocalVM]:
    """One stand-in VM with an agent; fleet VMs relay port 52 to it."""
    with (
        tempfile.TemporaryDirectory(prefix="fcv") as directory,
        LocalVM(os.path.join(directory, "hub.sock")) as vm,
    ):
        yield vm


@contextlib.contextmanager
def fleet(
    hub: LocalVM, vms_dir: Path, names: list[str], down: set[str]
) -> Iterator[dict[str, LocalVM]]:
    """Start a stand-in VM per name; those in ``down`` have no agent listening."""
    assert hub.agent_unix_path is not None
    with contextlib.ExitStack() as stack:
        vms: dict[str, LocalVM] = {}
        for name in names:
            vm = LocalVM(socket_path(vms_dir, name), agent=False)
            stack.enter_context(vm)
            if name not in down:
                vm.listen(52, hub.agent_unix_path)
            vms[name] = vm
        yield vms


FLEET_KINDS = ("ok", "failing", "stuck", "down")


def fleet_command(kind: str, name: str) -> list[str]:
    if kind == "ok":
        return ["seq", "-f", f"{name} line %g", "1", "2000"]
    if kind == "failing":
        return ["sh", "-c", "echo failing >&2; exit 3"]
    if kind == "stuck":
        return ["sh", "-c", f"echo started; exec sleep {STUCK_SLEEP}"]
    return ["true"]


def test_fleet_of_100(hub: LocalVM, vms_dir: Path) -> None:
    names = [f"vm-{index:03d}" for index in range(100)]
    kinds = {name: FLEET_KINDS[index % 4] for index, name in enumerate(names)}
    down = {name for name in names if kinds[name] == "down"}
    splitter = LineSplitter()
    lines: dict[tuple[str, str], list[bytes]] = defaultdict(list)

    def on_output(event: VMOutput) -> None:
        key = (event.target.name, event.stream)
        lines[key] += splitter.feed(key, event.data)

    async def run(
        targets: list[Target],
    ) -> tuple[list[VMResult], set[asyncio.Task[Any]]]:
        results = await fanout.run(
            targets, on_output=on_output, parallel=100, timeout=FLEET_TIMEOUT,
            connect_timeout=FLEET_CONNECT_TIMEOUT,
        )
        return results, asyncio.all_tasks() - {asyncio.current_task()}

    with fleet(hub, vms_dir, names, down) as vms:
        targets = [
            Target(name, vm.uds_path, cmd=fleet_command(kinds[name], name))
            for name, vm in vms.items()
        ]
        sockets_before = open_sockets()
        results, tasks_left = asyncio.run(run(targets))
        assert tasks_left == set()
        assert [result.name for result in results] == names
        assert splitter.pending == 0
        for result in results:
            name = result.name
            kind = kinds[name]
            if kind == "ok":
                assert result.ok, name
                expected = [
                    b"%s line %d\n" % (name.encode(), i) for i in range(1, 2001)
                ]
                assert lines[name, "stdout"] == expected, name
                assert result.stdout == b"".join(expected), name
            elif kind == "failing":
                assert result.exit_code == 3, name
                assert lines[name, "stderr"] == [b"failing\n"], name
            elif kind == "stuck":
                assert result.error is ErrorKind.TIMED_OUT, name
                assert lines[name, "stdout"] == [b"started\n"], name
            else:
                assert result.error is ErrorKind.UNREACHABLE, name
                assert result.stdout_bytes == 0, name
        assert wait_until(lambda: all(vm.connections == 0 for vm in vms.values()))
        assert wait_until(lambda: not processes_with_args("sleep", STUCK_SLEEP))
        assert wait_until(lambda: open_sockets() == sockets_before)


def test_fleet_cancel_ends_commands(hub: LocalVM, vms_dir: Path) -> None:
    names = [f"vm-{index}" for index in range(5)]
    sleep = "62.5"
    command = ["sh", "-c", f"echo started; exec sleep {sleep}"]

    async def run_and_cancel(paths: list[str]) -> None:
        started: set[str] = set()
        all_started = asyncio.Event()

        def on_output(event: VMOutput) -> None:
            started.add(event.target.name)
            if len(started) == len(paths):
                all_started.set()

        task = asyncio.create_task(fanout.run(paths, command, on_output=on_output))
        async with asyncio.timeout(WAIT):
            await all_started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with fleet(hub, vms_dir, names, set()) as vms:
        asyncio.run(run_and_cancel([vm.uds_path for vm in vms.values()]))
        assert wait_until(lambda: all(vm.connections == 0 for vm in vms.values()))
        assert wait_until(lambda: not processes_with_args("sleep", sleep))


# -- the command line ---------------------------------------------------------


def run_cli(*words: str) -> int:
    return fanout.main(list(words))


def test_cli_prefixes_whole_lines(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(b"one\ntw", b"o\nthr"))
    start_vm(peers, vms_dir, "long-name", Agent(stderr_frame(b"warn\n"), exit_frame(0)))
    status = run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    out, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_OK
    assert out.splitlines() == ["a         | one", "a         | two", "a         | thr"]
    assert "long-name | warn\n" in err


def test_cli_no_prefix(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(b"one\ntwo"))
    status = run_cli("--no-prefix", str(vms_dir / "*" / "v.sock"), "--", "true")
    out, _ = capsys.readouterr()
    assert status == fanout_cli.EXIT_OK
    assert out == "one\ntwo\n"


def test_cli_lines_never_interleave(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every VM sends each line in two frames; the first halves of all VMs
    # arrive before any second half is sent.
    first_halves = threading.Barrier(3, timeout=WAIT)

    def split_lines(conn: socket.socket) -> None:
        accept_start(conn)
        for number in range(3):
            conn.sendall(stdout_frame(b"left-%d " % number))
            if number == 0:
                first_halves.wait()
            conn.sendall(stdout_frame(b"right-%d\n" % number))
        conn.sendall(exit_frame(0))
        wait_until_eof(conn)

    for name in ("vm-1", "vm-2", "vm-3"):
        start_vm(peers, vms_dir, name, split_lines)
    status = run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    out, _ = capsys.readouterr()
    assert status == fanout_cli.EXIT_OK
    by_vm: dict[str, list[str]] = defaultdict(list)
    for line in out.splitlines():
        name, _, text = line.partition(" | ")
        by_vm[name].append(text)
    expected = [f"left-{number} right-{number}" for number in range(3)]
    assert by_vm == {"vm-1": expected, "vm-2": expected, "vm-3": expected}


def test_cli_out_dir(
    peers: Peers,
    vms_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = Agent(stdout_frame(b"x\ny"), stderr_frame(b"e\n"), exit_frame(0))
    start_vm(peers, vms_dir, "a", agent)
    start_vm(peers, vms_dir, "quiet", ok_agent())
    out_dir = tmp_path / "out"
    status = run_cli(
        "--out-dir", str(out_dir), str(vms_dir / "*" / "v.sock"), "--", "true"
    )
    out, _ = capsys.readouterr()
    assert status == fanout_cli.EXIT_OK
    assert out == ""
    assert (out_dir / "a.stdout").read_bytes() == b"x\ny"
    assert (out_dir / "a.stderr").read_bytes() == b"e\n"
    assert (out_dir / "quiet.stdout").read_bytes() == b""
    assert (out_dir / "quiet.stderr").read_bytes() == b""


def test_cli_out_dir_does_not_follow_symlinks(
    peers: Peers,
    vms_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(b"overwritten\n"))
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "a.stdout").symlink_to(victim)
    status = run_cli(
        "--out-dir", str(out_dir), str(vms_dir / "*" / "v.sock"), "--", "true"
    )
    _, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_FAILURE
    assert "a.stdout" in err
    assert victim.read_bytes() == b"precious\n"


def test_cli_out_dir_removed_while_running(
    peers: Peers,
    vms_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out_dir = tmp_path / "out"

    def remove_then_print(conn: socket.socket) -> None:
        accept_start(conn)
        shutil.rmtree(out_dir)
        conn.sendall(stdout_frame(b"lost\n"))
        wait_until_eof(conn)

    start_vm(peers, vms_dir, "a", remove_then_print)
    status = run_cli(
        "--out-dir", str(out_dir), str(vms_dir / "*" / "v.sock"), "--", "true"
    )
    _, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_FAILURE
    assert "writing the output failed" in err
    assert "fanout: stopped, 0 of 1 VM done" in err


def test_cli_out_dir_not_writable(
    vms_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.touch()
    status = run_cli(
        "--out-dir", str(blocker / "sub"), str(vms_dir / "vm.sock"), "--", "true"
    )
    _, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_FAILURE
    assert "--out-dir" in err


def test_cli_out_dir_escapes_names(
    peers: Peers,
    vms_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_vm(peers, vms_dir, FORGED_NAME, ok_agent(b"hi\n"))
    out_dir = tmp_path / "out"
    run_cli("--out-dir", str(out_dir), str(vms_dir / "*" / "v.sock"), "--", "true")
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "evil\\nweb-9 | FAKE OK.stderr", "evil\\nweb-9 | FAKE OK.stdout",
    ]
    assert (out_dir / "evil\\nweb-9 | FAKE OK.stdout").read_bytes() == b"hi\n"


@pytest.mark.parametrize(
    ("name_from", "stem"),
    [
        ("..{file:.0}", "_.."),
        ("{parent}/../../{stem}", "a_.._.._v"),
        ("{path}", None),
    ],
)
def test_cli_out_dir_files_stay_inside(
    peers: Peers,
    vms_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name_from: str,
    stem: str | None,
) -> None:
    uds_path = start_vm(peers, vms_dir, "a", ok_agent(b"hi\n"))
    out_dir = tmp_path / "out"
    status = run_cli(
        "--out-dir", str(out_dir), "--name-from", name_from, uds_path, "--", "true"
    )
    if stem is None:
        stem = uds_path.strip("/").replace("/", "_")
    assert status == fanout_cli.EXIT_OK
    assert list(tmp_path.iterdir()) == [out_dir]
    assert sorted(path.name for path in out_dir.iterdir()) == [
        f"{stem}.stderr", f"{stem}.stdout",
    ]


def test_cli_max_output_bytes_out_dir(
    peers: Peers,
    vms_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent = Agent(
        stdout_frame(b"abc"), stdout_frame(b"def"), stderr_frame(b"123456"),
        exit_frame(0),
    )
    start_vm(peers, vms_dir, "a", agent)
    start_vm(peers, vms_dir, "quiet", ok_agent(b"ok"))
    out_dir = tmp_path / "out"
    status = run_cli(
        "--out-dir", str(out_dir), "--max-output-bytes", "4",
        str(vms_dir / "*" / "v.sock"), "--", "true",
    )
    _, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_OK
    assert (out_dir / "a.stdout").read_bytes() == b"abcd"
    assert (out_dir / "a.stderr").read_bytes() == b"1234"
    assert (out_dir / "quiet.stdout").read_bytes() == b"ok"
    assert "fanout: output of 1 VM cut at --max-output-bytes 4 per stream" in err


def test_cli_max_output_bytes_printed(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(b"one\ntwo\nthree\n"))
    run_cli("--max-output-bytes", "6", str(vms_dir / "*" / "v.sock"), "--", "true")
    out, _ = capsys.readouterr()
    assert out == "a | one\na | tw\n"


def test_cli_max_output_bytes_suffix(
    peers: Peers,
    vms_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(b"x" * 3000))
    out_dir = tmp_path / "out"
    run_cli(
        "--out-dir", str(out_dir), "--max-output-bytes", "2k",
        str(vms_dir / "*" / "v.sock"), "--", "true",
    )
    assert (out_dir / "a.stdout").read_bytes() == b"x" * 2048


def test_cli_json(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", Agent(stdout_frame(b"12345\n"), exit_frame(2)))
    down = socket_path(vms_dir, "down")
    status = run_cli(
        "--json", "--connect-timeout", str(UNREACHABLE_WITHIN),
        str(vms_dir / "a" / "v.sock"), down, "--", "true",
    )
    out, _ = capsys.readouterr()
    records = {record["name"]: record for record in map(json.loads, out.splitlines())}
    assert status == fanout_cli.EXIT_VM_FAILED
    assert set(records) == {"a", "down"}
    assert records["a"]["exit_code"] == 2
    assert records["a"]["stdout_bytes"] == 6
    assert records["a"]["error"] is None
    assert records["down"]["error"] == "unreachable"
    assert records["down"]["uds_path"] == down
    assert set(records["a"]) == {
        "name", "uds_path", "exit_code", "signal", "duration", "error",
        "error_message", "stdout_bytes", "stderr_bytes",
    }


def test_cli_exit_command_failed(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent())
    start_vm(peers, vms_dir, "b", ok_agent(code=4))
    status = run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    assert status == fanout_cli.EXIT_COMMAND_FAILED


def test_cli_exit_timeout_over_failure(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(code=4))
    start_vm(peers, vms_dir, "b", Agent())
    status = run_cli("--timeout", "0.2", str(vms_dir / "*" / "v.sock"), "--", "true")
    assert status == fanout_cli.EXIT_VM_FAILED


def test_cli_summary(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "vm-1", ok_agent())
    start_vm(peers, vms_dir, "vm-2", ok_agent(code=3))
    start_vm(peers, vms_dir, "vm-3", Agent(exit_frame(137, 9)))
    start_vm(peers, vms_dir, "vm-4", Agent())
    start_vm(peers, vms_dir, "vm-5", Agent(reply=b"HELLO\n"))
    down = socket_path(vms_dir, "vm-6")
    status = run_cli(
        "--timeout", "0.2", "--connect-timeout", str(UNREACHABLE_WITHIN),
        str(vms_dir / "*" / "v.sock"), down, "--", "true",
    )
    _, err = capsys.readouterr()
    summary = err.splitlines()
    assert status == fanout_cli.EXIT_VM_FAILED
    assert summary[0].startswith(
        "fanout: 6 VMs: 1 ok, 2 failed, 1 timed out, 1 unreachable, 1 protocol error"
    )
    assert summary[1].split() == ["NAME", "RESULT", "DURATION", "DETAIL"]
    rows = {line.split()[0]: line for line in summary[2:]}
    assert list(rows) == ["vm-2", "vm-3", "vm-4", "vm-5", "vm-6"]
    assert "exit code 3" in rows["vm-2"]
    assert "killed by signal 9 (SIGKILL)" in rows["vm-3"]
    assert "timed out" in rows["vm-4"]
    assert "no exit status within 0.2 s" in rows["vm-4"]
    assert "protocol error" in rows["vm-5"]
    assert "unreachable" in rows["vm-6"]


def test_cli_summary_all_ok(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent())
    run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    _, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "fanout: 1 VM: 1 ok, 0 failed, 0 timed out, 0 unreachable in "
    )


def test_cli_name_from(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(b"hi\n"))
    glob = str(vms_dir / "*" / "v.sock")
    run_cli("--name-from", "{parent}/{stem}", glob, "--", "true")
    out, _ = capsys.readouterr()
    assert out == "a/v | hi\n"


# A directory name that would forge another VM's output line if printed as is.
FORGED_NAME = "evil\nweb-9 | FAKE OK"


def test_cli_escapes_name_in_prefix(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, FORGED_NAME, ok_agent(b"hi\n"))
    status = run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    out, _ = capsys.readouterr()
    assert status == fanout_cli.EXIT_OK
    assert out == "evil\\nweb-9 | FAKE OK | hi\n"


def test_cli_escapes_name_in_table(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "\x1b]0;title\x07vm", ok_agent(code=3))
    run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    _, err = capsys.readouterr()
    assert "\x1b" not in err
    assert "\x07" not in err
    assert err.splitlines()[-1].startswith("\\x1b]0;title\\x07vm  exit code 3")


def test_cli_escapes_non_utf8_name(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = os.fsdecode(b"vm-\xff")
    start_vm(peers, vms_dir, name, ok_agent(b"hi\n"))
    status = run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    out, _ = capsys.readouterr()
    assert status == fanout_cli.EXIT_OK
    assert out == "vm-\\xff | hi\n"


def test_cli_json_keeps_real_name(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, FORGED_NAME, ok_agent(b"hi\n"))
    run_cli("--json", str(vms_dir / "*" / "v.sock"), "--", "true")
    out, _ = capsys.readouterr()
    [line] = out.splitlines()
    assert json.loads(line)["name"] == FORGED_NAME


def test_cli_sends_options(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = ok_agent()
    path = start_vm(peers, vms_dir, "a", agent)
    status = run_cli(
        "-e", "A=1", "--cwd", "/tmp", "--user", "nobody", "--remote-timeout", "9",
        path, "--", "ls", "-l",
    )
    start = StartRequest.decode(agent.payloads(FrameType.START)[0])
    assert status == fanout_cli.EXIT_OK
    assert start.cmd == ["ls", "-l"]
    assert start.env == {"A": "1"}
    assert start.working_dir == "/tmp"
    assert start.user == "nobody"
    assert start.timeout_seconds == 9


def test_cli_progress_on_terminal(
    peers: Peers,
    vms_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start_vm(peers, vms_dir, "a", Agent(stderr_frame(b"warn\n"), exit_frame(0)))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    _, err = capsys.readouterr()
    assert "fanout: 0/1 done, 0 failed" in err
    assert "fanout: 1/1 done, 0 failed" in err
    # Each progress line is erased before the next write, so output and the
    # summary start at the beginning of a clean line.
    assert "\r\x1b[Ka | warn\n" in err
    assert "\r\x1b[Kfanout: 1 VM: 1 ok" in err


def test_cli_no_progress_off_terminal(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent())
    run_cli(str(vms_dir / "*" / "v.sock"), "--", "true")
    _, err = capsys.readouterr()
    assert "\r" not in err
    assert "done," not in err


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["vm.sock", "true"], "missing '--'"),
        (["vm.sock", "--"], "missing command"),
        (["--", "true"], "the following arguments are required: TARGET"),
        (["--bogus", "vm.sock", "--", "true"], "unrecognized arguments: --bogus"),
        (
            ["--parallel", "0", "vm.sock", "--", "true"],
            "argument -p/--parallel: invalid value '0': expected an integer >= 1",
        ),
        (
            ["--timeout", "soon", "vm.sock", "--", "true"],
            "argument --timeout: invalid value 'soon': expected seconds >= 0",
        ),
        (["-e", "NOVALUE", "vm.sock", "--", "true"], "invalid --env 'NOVALUE'"),
        (
            ["--port", "-1", "vm.sock", "--", "true"],
            "argument --port: invalid value '-1': expected an integer in 0..",
        ),
        (
            ["--remote-timeout", "-1", "vm.sock", "--", "true"],
            "argument --remote-timeout: invalid value '-1'",
        ),
        (
            ["--name-from", "dir", "vm.sock", "--", "true"],
            "argument --name-from: invalid value 'dir': expected parent, stem,",
        ),
        (
            ["--name-from", "{bogus}", "vm.sock", "--", "true"],
            "use {path}, {parent}, {file} or {stem}",
        ),
        (
            ["--max-output-bytes", "1X", "vm.sock", "--", "true"],
            "argument --max-output-bytes: invalid value '1X'",
        ),
        (["/nonexistent/*/v.sock", "--", "true"], "matched no path"),
    ],
)
def test_cli_usage_errors(
    words: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_cli(*words)
    _, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_FAILURE
    assert message in err
    assert err.startswith("fcvsock fanout: ")
    assert err.count("\n") == 1


def test_cli_usage_error_names_option(capsys: pytest.CaptureFixture[str]) -> None:
    run_cli("--name-from", "{bogus}", "vm.sock", "--", "true")
    _, err = capsys.readouterr()
    assert "--name-from" in err
    assert "name_from" not in err


def test_cli_usage_error_escapes_argument(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = run_cli("--bo\ngus\x1b[2J", "vm.sock", "--", "true")
    _, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_FAILURE
    assert err.count("\n") == 1
    assert "--bo\\ngus\\x1b[2J" in err


def test_cli_duplicate_names(vms_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [socket_path(vms_dir, "a"), socket_path(vms_dir, "b")]
    status = run_cli("--name-from", "stem", *paths, "--", "true")
    _, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_FAILURE
    assert "'v' is used by both" in err
    assert err.endswith("; choose another --name-from\n")


def test_cli_help_lists_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    status = run_cli("--help")
    out, _ = capsys.readouterr()
    assert status == 0
    assert "exit status:" in out
    for code in (0, 1, 2, 130, 255):
        assert f"\n  {code} " in out


def test_cli_interrupt(peers: Peers, vms_dir: Path) -> None:
    agent = Agent(stdout_frame(b"started\n"))
    path = start_vm(peers, vms_dir, "stuck", agent)
    command = [sys.executable, "-m", "fcvsock", "fanout", path, "--", "sleep", "60"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as process:
        try:
            started = agent.started.wait(WAIT)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=WAIT)
        finally:
            process.kill()
    assert started, err.decode(errors="replace")
    assert process.returncode == fanout_cli.EXIT_INTERRUPTED
    assert agent.client_closed.wait(WAIT)
    assert b"interrupted, 0 of 1 VM done" in err
    assert b"Traceback" not in err


def test_cli_through_fcvsock_main(
    peers: Peers, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    start_vm(peers, vms_dir, "a", ok_agent(b"hi\n"))
    status = cli.main(["fanout", str(vms_dir / "*" / "v.sock"), "--", "true"])
    out, _ = capsys.readouterr()
    assert status == 0
    assert out == "a | hi\n"


def test_cli_fleet(
    hub: LocalVM, vms_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["vm-1", "vm-2", "vm-3", "vm-10"]
    with fleet(hub, vms_dir, names, {"vm-10"}):
        status = run_cli(
            "--timeout", "2", "--connect-timeout", "0.5",
            str(vms_dir / "vm-*" / "v.sock"), "--",
            "printf", "a\\nb",
        )
    out, err = capsys.readouterr()
    assert status == fanout_cli.EXIT_VM_FAILED
    assert sorted(out.splitlines()) == [
        "vm-1  | a", "vm-1  | b", "vm-2  | a", "vm-2  | b", "vm-3  | a", "vm-3  | b",
    ]
    assert "4 VMs: 3 ok, 0 failed, 0 timed out, 1 unreachable" in err
    assert err.splitlines()[-1].startswith("vm-10  unreachable")
