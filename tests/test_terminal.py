"""The interactive terminal: escape filter, raw mode, interact(), and exec in tmux."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcvsock import terminal
from fcvsock.errors import FcvsockError
from fcvsock.localvm import LocalVM
from fcvsock.session import ExitStatus, Output
from fcvsock.terminal import EscapeCommand, EscapeFilter

DISCONNECT = EscapeCommand.DISCONNECT
HELP = EscapeCommand.HELP


# The escape filter.


def _merged(items: list[bytes | EscapeCommand]) -> list[bytes | EscapeCommand]:
    merged: list[bytes | EscapeCommand] = []
    for item in items:
        if isinstance(item, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += item
        elif item != b"":
            merged.append(item)
    return merged


def _feed_all(*chunks: bytes) -> list[bytes | EscapeCommand]:
    escapes = EscapeFilter()
    items: list[bytes | EscapeCommand] = []
    for chunk in chunks:
        items += escapes.feed(chunk)
    return _merged(items)


def test_escape_plain_bytes_pass() -> None:
    assert _feed_all(b"ls -l\r") == [b"ls -l\r"]


def test_escape_disconnect_at_session_start() -> None:
    assert _feed_all(b"~.") == [DISCONNECT]


def test_escape_disconnect_after_cr() -> None:
    assert _feed_all(b"ls\r~.") == [b"ls\r", DISCONNECT]


def test_escape_disconnect_after_lf() -> None:
    assert _feed_all(b"ls\n~.") == [b"ls\n", DISCONNECT]


def test_escape_ignored_mid_line() -> None:
    assert _feed_all(b"a~.") == [b"a~."]


def test_escape_ignored_after_tilde_mid_line() -> None:
    assert _feed_all(b"x~~.") == [b"x~~."]


def test_escape_split_across_reads() -> None:
    assert _feed_all(b"ls\r~", b".") == [b"ls\r", DISCONNECT]


def test_escape_line_start_split_across_reads() -> None:
    assert _feed_all(b"ls\r", b"~", b".") == [b"ls\r", DISCONNECT]


def test_escape_held_tilde_not_sent_early() -> None:
    escapes = EscapeFilter()
    assert escapes.feed(b"~") == []
    assert escapes.feed(b"x") == [b"~x"]


def test_escape_double_tilde_sends_one() -> None:
    assert _feed_all(b"~~") == [b"~"]


def test_escape_double_tilde_ends_line_start() -> None:
    assert _feed_all(b"~~.") == [b"~."]


def test_escape_double_tilde_split() -> None:
    assert _feed_all(b"\r~", b"~", b".") == [b"\r~."]


def test_escape_help() -> None:
    assert _feed_all(b"~?") == [HELP]


def test_escape_help_keeps_line_start() -> None:
    assert _feed_all(b"~?~.") == [HELP, DISCONNECT]


def test_escape_other_key_passes_both() -> None:
    assert _feed_all(b"~x~.") == [b"~x~."]


def test_escape_tilde_then_cr_starts_line() -> None:
    assert _feed_all(b"~\r~.") == [b"~\r", DISCONNECT]


def test_escape_bytes_after_help_kept() -> None:
    assert _feed_all(b"\n~?ls\r") == [b"\n", HELP, b"ls\r"]


def test_escape_control_keys_pass() -> None:
    assert _feed_all(b"\x03\x1a\x04") == [b"\x03\x1a\x04"]


@given(
    data=st.lists(st.sampled_from(b"~.?a\r\n"), max_size=40).map(bytes),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6),
)
def test_escape_split_points_agree(data: bytes, cuts: list[int]) -> None:
    bounds = sorted({0, len(data), *(min(cut, len(data)) for cut in cuts)})
    chunks = [data[start:end] for start, end in itertools.pairwise(bounds)]
    assert _feed_all(*chunks) == _feed_all(data)


@given(data=st.lists(st.sampled_from(b"~.?a\r\n"), max_size=40).map(bytes))
def test_escape_byte_by_byte_agrees(data: bytes) -> None:
    chunks = [data[index : index + 1] for index in range(len(data))]
    assert _feed_all(*chunks) == _feed_all(data)


# Raw mode and window size on a pty pair standing in for the local terminal.


_WINSIZE = struct.Struct("HHHH")


def _set_size(fd: int, columns: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, columns, 0, 0))


@dataclass
class Pty:
    master: int
    slave: int


@pytest.fixture
def pty() -> Iterator[Pty]:
    master, slave = os.openpty()
    _set_size(master, 80, 24)
    try:
        yield Pty(master, slave)
    finally:
        os.close(master)
        os.close(slave)


def test_raw_mode_is_raw(pty: Pty) -> None:
    with terminal.raw_mode(pty.slave):
        local_modes = termios.tcgetattr(pty.slave)[3]
    assert not local_modes & termios.ICANON
    assert not local_modes & termios.ECHO
    assert not local_modes & termios.ISIG


def test_raw_mode_restores_on_exit(pty: Pty) -> None:
    before = termios.tcgetattr(pty.slave)
    with terminal.raw_mode(pty.slave):
        pass
    assert termios.tcgetattr(pty.slave) == before


def test_raw_mode_restores_on_exception(pty: Pty) -> None:
    before = termios.tcgetattr(pty.slave)
    with pytest.raises(KeyError), terminal.raw_mode(pty.slave):
        raise KeyError("inside")
    assert termios.tcgetattr(pty.slave) == before


def test_raw_mode_survives_hangup() -> None:
    master, slave = os.openpty()
    try:
        with terminal.raw_mode(slave):
            os.close(master)
        with pytest.raises(termios.error):
            termios.tcgetattr(slave)
    finally:
        os.close(slave)


def test_window_size_of_pty(pty: Pty) -> None:
    _set_size(pty.master, 132, 43)
    assert terminal.window_size(pty.slave) == (132, 43)


def test_window_size_of_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        assert terminal.window_size(read_fd, write_fd) is None
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_window_size_zero_is_none(pty: Pty) -> None:
    _set_size(pty.master, 0, 0)
    assert terminal.window_size(pty.slave) is None


def test_window_size_first_terminal(pty: Pty) -> None:
    read_fd, write_fd = os.pipe()
    try:
        assert terminal.window_size(read_fd, pty.slave) == (80, 24)
    finally:
        os.close(read_fd)
        os.close(write_fd)


# interact() against a scripted session.


class FakeSession:
    """Records what interact() sends and plays output the test queues."""

    def __init__(self) -> None:
        self.stdin = bytearray()
        self.stdin_closed = False
        self.resizes: list[tuple[int, int]] = []
        self.signals: list[int] = []
        self.status = ExitStatus(0)
        self._items: asyncio.Queue[Output | BaseException | None] = asyncio.Queue()
        self._changed = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.stdin += data
        self._changed.set()

    async def resize(self, columns: int, rows: int) -> None:
        self.resizes.append((columns, rows))
        self._changed.set()

    async def signal(self, signal_number: int) -> None:
        self.signals.append(signal_number)
        self._changed.set()

    async def close_stdin(self) -> None:
        self.stdin_closed = True
        self._changed.set()

    def __aiter__(self):  # type: ignore[no-untyped-def]
        return self._iterate()

    async def _iterate(self):  # type: ignore[no-untyped-def]
        while (item := await self._items.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def wait(self) -> ExitStatus:
        return self.status

    def emit(self, data: bytes, stream: str = "stdout") -> None:
        self._items.put_nowait(Output(stream, data))  # type: ignore[arg-type]

    def exit(self, exit_code: int) -> None:
        self.status = ExitStatus(exit_code)
        self._items.put_nowait(None)

    def fail(self, error: BaseException) -> None:
        self._items.put_nowait(error)

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


async def _raw_mode_entered(session: FakeSession) -> None:
    # interact() sends the window size once raw mode and its handlers are on.
    await session.until(lambda: bool(session.resizes))


def _kill_self(signal_number: int) -> None:
    # Without a handler the signal would end or interrupt the test run itself.
    handler = signal.getsignal(signal_number)
    assert handler not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)
    os.kill(os.getpid(), signal_number)


async def _read_until(fd: int, expected: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(10):
        while expected not in received:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _resolve, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
            received += os.read(fd, 4096)
    return received


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _start(
    session: FakeSession,
    tty: bool,
    stdin_fd: int,
    stdout_fd: int,
    stderr_fd: int | None = None,
) -> asyncio.Task[ExitStatus | int]:
    coroutine = terminal.interact(
        session,  # type: ignore[arg-type]
        tty=tty,
        stdin_fd=stdin_fd,
        stdout_fd=stdout_fd,
        stderr_fd=stdout_fd if stderr_fd is None else stderr_fd,
    )
    return asyncio.ensure_future(coroutine)


def _run_with_pty(pty: Pty, tty: bool, script) -> ExitStatus | int:  # type: ignore[no-untyped-def]
    """Run interact() on the pty's slave while ``script`` drives it."""

    async def main() -> ExitStatus | int:
        session = FakeSession()
        interaction = _start(session, tty, pty.slave, pty.slave)
        try:
            await script(session, interaction)
            async with asyncio.timeout(10):
                return await interaction
        finally:
            interaction.cancel()

    return asyncio.run(main())


def test_interact_sends_keys_unbuffered(pty: Pty) -> None:
    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        os.write(pty.master, b"ab\x03")
        await session.until(lambda: session.stdin == b"ab\x03")
        session.exit(0)

    assert _run_with_pty(pty, True, script) == ExitStatus(0)


def test_interact_raw_ctrl_c_sent(pty: Pty) -> None:
    session_seen: list[FakeSession] = []

    async def script(session: FakeSession, _: object) -> None:
        session_seen.append(session)
        await _raw_mode_entered(session)
        os.write(pty.master, b"\x03\x1a")
        await session.until(lambda: len(session.stdin) == 2)
        session.exit(0)

    _run_with_pty(pty, True, script)
    assert session_seen[0].signals == []


def test_interact_writes_output(pty: Pty) -> None:
    async def script(session: FakeSession, _: object) -> None:
        session.emit(b"remote says hi\r\n")
        await _read_until(pty.master, b"remote says hi")
        session.exit(0)

    assert _run_with_pty(pty, True, script) == ExitStatus(0)


def test_interact_returns_remote_status(pty: Pty) -> None:
    async def script(session: FakeSession, _: object) -> None:
        session.exit(7)

    assert _run_with_pty(pty, True, script) == ExitStatus(7)


def test_interact_restores_after_remote_exit(pty: Pty) -> None:
    before = termios.tcgetattr(pty.slave)
    raw_inside: list[bool] = []

    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        raw_inside.append(not termios.tcgetattr(pty.slave)[3] & termios.ICANON)
        session.exit(0)

    _run_with_pty(pty, True, script)
    assert raw_inside == [True]
    assert termios.tcgetattr(pty.slave) == before


def test_interact_restores_after_session_error(pty: Pty) -> None:
    before = termios.tcgetattr(pty.slave)

    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        session.fail(FcvsockError("connection lost"))

    with pytest.raises(FcvsockError, match="connection lost"):
        _run_with_pty(pty, True, script)
    assert termios.tcgetattr(pty.slave) == before


def test_interact_restores_after_cancel(pty: Pty) -> None:
    before = termios.tcgetattr(pty.slave)

    async def script(session: FakeSession, interaction: asyncio.Task[object]) -> None:
        await _raw_mode_entered(session)
        interaction.cancel()

    with pytest.raises(asyncio.CancelledError):
        _run_with_pty(pty, True, script)
    assert termios.tcgetattr(pty.slave) == before


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGHUP])
def test_interact_restores_after_signal(pty: Pty, signal_number: int) -> None:
    before = termios.tcgetattr(pty.slave)

    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        _kill_self(signal_number)

    assert _run_with_pty(pty, True, script) == 128 + signal_number
    assert termios.tcgetattr(pty.slave) == before
    assert signal.getsignal(signal_number) == signal.SIG_DFL


@contextlib.contextmanager
def _signal_handler(
    signal_number: int, handler: Callable[[int, Any], None] | signal.Handlers
) -> Iterator[None]:
    previous = signal.signal(signal_number, handler)
    try:
        yield
    finally:
        signal.signal(signal_number, previous)


def _on_sigterm(signal_number: int, frame: object) -> None:
    raise AssertionError("the test's own SIGTERM handler ran during interact()")


def test_interact_restores_previous_handler(pty: Pty) -> None:
    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        _kill_self(signal.SIGTERM)

    with _signal_handler(signal.SIGTERM, _on_sigterm):
        assert _run_with_pty(pty, True, script) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is _on_sigterm


def test_interact_keeps_ignored_sighup(pty: Pty) -> None:
    during: list[object] = []

    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        during.append(signal.getsignal(signal.SIGHUP))
        session.exit(0)

    with _signal_handler(signal.SIGHUP, signal.SIG_IGN):
        _run_with_pty(pty, True, script)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    assert during == [signal.SIG_IGN]


def test_interact_escape_disconnects(pty: Pty) -> None:
    before = termios.tcgetattr(pty.slave)

    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        os.write(pty.master, b"ls\r~.")
        await _read_until(pty.master, b"closed by ~.")

    assert _run_with_pty(pty, True, script) == terminal.EXIT_DISCONNECTED
    assert termios.tcgetattr(pty.slave) == before


def test_interact_escape_help(pty: Pty) -> None:
    sent: list[bytes] = []

    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        os.write(pty.master, b"~?")
        await _read_until(pty.master, b"~~  send one ~")
        os.write(pty.master, b"ok")
        await session.until(lambda: bytes(session.stdin) == b"ok")
        sent.append(bytes(session.stdin))
        session.exit(0)

    _run_with_pty(pty, True, script)
    assert sent == [b"ok"]


def test_interact_sends_size_at_start(pty: Pty) -> None:
    async def script(session: FakeSession, _: object) -> None:
        await session.until(lambda: session.resizes == [(80, 24)])
        session.exit(0)

    _run_with_pty(pty, True, script)


def test_interact_sends_size_on_sigwinch(pty: Pty) -> None:
    async def script(session: FakeSession, _: object) -> None:
        await _raw_mode_entered(session)
        _set_size(pty.master, 120, 40)
        _kill_self(signal.SIGWINCH)
        await session.until(lambda: session.resizes[-1] == (120, 40))
        session.exit(0)

    _run_with_pty(pty, True, script)


def test_interact_ctrl_c_sends_sigint(pty: Pty) -> None:
    async def script(session: FakeSession, _: object) -> None:
        os.write(pty.master, b"line\n")
        await session.until(lambda: session.stdin == b"line\n")
        _kill_self(signal.SIGINT)
        await session.until(lambda: session.signals == [signal.SIGINT])
        session.exit(0)

    assert _run_with_pty(pty, False, script) == ExitStatus(0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interact_second_ctrl_c_closes(
    pty: Pty, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(terminal, "DOUBLE_INTERRUPT_SECONDS", 3600.0)

    async def script(session: FakeSession, _: object) -> None:
        os.write(pty.master, b"line\n")
        await session.until(lambda: session.stdin == b"line\n")
        _kill_self(signal.SIGINT)
        await session.until(lambda: bool(session.signals))
        _kill_self(signal.SIGINT)

    assert _run_with_pty(pty, False, script) == 128 + signal.SIGINT


def test_interact_late_second_ctrl_c_forwarded(
    pty: Pty, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(terminal, "DOUBLE_INTERRUPT_SECONDS", 0.0)

    async def script(session: FakeSession, _: object) -> None:
        os.write(pty.master, b"line\n")
        await session.until(lambda: session.stdin == b"line\n")
        _kill_self(signal.SIGINT)
        await session.until(lambda: len(session.signals) == 1)
        _kill_self(signal.SIGINT)
        await session.until(lambda: len(session.signals) == 2)
        session.exit(0)

    assert _run_with_pty(pty, False, script) == ExitStatus(0)


def test_interact_ctrl_d_sends_eof_in_line_mode(pty: Pty) -> None:
    async def script(session: FakeSession, _: object) -> None:
        os.write(pty.master, b"\x04")
        await session.until(lambda: session.stdin_closed)
        session.exit(0)

    _run_with_pty(pty, False, script)


def _run_with_fds(
    tty: bool, stdin_fd: int, stdout_fd: int, stderr_fd: int, script
) -> FakeSession:  # type: ignore[no-untyped-def]
    async def main() -> FakeSession:
        session = FakeSession()
        interaction = _start(session, tty, stdin_fd, stdout_fd, stderr_fd)
        try:
            await script(session)
            async with asyncio.timeout(10):
                await interaction
        finally:
            interaction.cancel()
        return session

    return asyncio.run(main())


def test_interact_regular_file_stdin(tmp_path: Path) -> None:
    source = tmp_path / "input"
    source.write_bytes(b"~.not an escape\n")

    async def script(session: FakeSession) -> None:
        await session.until(lambda: session.stdin_closed)
        session.exit(0)

    with open(source, "rb") as stdin, open(os.devnull, "wb") as sink:
        session = _run_with_fds(
            True, stdin.fileno(), sink.fileno(), sink.fileno(), script
        )
    assert session.stdin == b"~.not an escape\n"


def test_interact_devnull_stdin_sends_eof() -> None:
    async def script(session: FakeSession) -> None:
        await session.until(lambda: session.stdin_closed)
        session.exit(0)

    with open(os.devnull, "rb") as stdin, open(os.devnull, "wb") as sink:
        session = _run_with_fds(
            True, stdin.fileno(), sink.fileno(), sink.fileno(), script
        )
    assert session.stdin == b""


def test_interact_pipe_stdin_no_escapes() -> None:
    read_fd, write_fd = os.pipe()

    async def script(session: FakeSession) -> None:
        os.write(write_fd, b"~.\n")
        os.close(write_fd)
        await session.until(lambda: session.stdin_closed)
        session.exit(0)

    try:
        with open(os.devnull, "wb") as sink:
            session = _run_with_fds(True, read_fd, sink.fileno(), sink.fileno(), script)
    finally:
        os.close(read_fd)
    assert session.stdin == b"~.\n"


def test_interact_stderr_to_stderr_fd() -> None:
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()

    async def script(session: FakeSession) -> None:
        session.emit(b"to stdout", "stdout")
        session.emit(b"to stderr", "stderr")
        session.exit(0)

    try:
        with open(os.devnull, "rb") as stdin:
            _run_with_fds(False, stdin.fileno(), out_write, err_write, script)
        assert os.read(out_read, 100) == b"to stdout"
        assert os.read(err_read, 100) == b"to stderr"
    finally:
        for fd in (out_read, out_write, err_read, err_write):
            os.close(fd)


# fcvsock exec in a real terminal: tmux with a private server socket.


tmux_required = pytest.mark.skipif(
    shutil.which("tmux") is None, reason="tmux is not installed"
)
_POLL_INTERVAL = 0.02
_DEADLINE = 15.0


class Tmux:
    """A tmux server of this test module only, reached through its own socket."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", str(self.socket_path), "-f", os.devnull, *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "SHELL": "/bin/sh"},
        )
        if done.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)} failed: {done.stderr}")
        return done.stdout


@dataclass
class Pane:
    tmux: Tmux
    pane_id: str
    state_dir: Path

    def type_line(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.pane_id, "-l", text)
        self.tmux("send-keys", "-t", self.pane_id, "Enter")

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.pane_id, *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.pane_id)

    def wait_for(self, pattern: str) -> str:
        """Poll the pane until a line matches ``pattern``; return the screen."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + _DEADLINE
        while not regex.search(screen := self.screen()):
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matches {pattern!r} in:\n{screen}")
            time.sleep(_POLL_INTERVAL)
        return screen

    def exit_status(self) -> int:
        """Wait for fcvsock to exit in the pane; return its exit status."""
        status_file = self.state_dir / "status"
        deadline = time.monotonic() + _DEADLINE
        while not status_file.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"fcvsock still running in:\n{self.screen()}")
            time.sleep(_POLL_INTERVAL)
        return int(status_file.read_text())

    def settings_before_and_after(self) -> tuple[str, str]:
        before = (self.state_dir / "before").read_text()
        after = (self.state_dir / "after").read_text()
        return before, after


@pytest.fixture(scope="module")
def tmux_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalVM]:
    path = tmp_path_factory.mktemp("tmux-vm") / "vm.sock"
    # Without TERM of its own, the agent's commands see only the TERM that
    # fcvsock passes on.
    agent = ["env", "-u", "TERM", sys.executable, "-m", "fcvsock.agent"]
    with LocalVM(path, agent_command=agent) as local_vm:
        yield local_vm


@pytest.fixture(scope="module")
def tmux(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    server = Tmux(tmp_path_factory.mktemp("tmux") / "server.sock")
    server("new-session", "-d", "-s", "main", "-x", "80", "-y", "24")
    try:
        server("set-option", "-g", "remain-on-exit", "on")
        server("set-option", "-g", "default-shell", "/bin/sh")
        yield server
    finally:
        server("kill-server")


@pytest.fixture
def open_pane(tmux: Tmux, tmux_vm: LocalVM, tmp_path: Path) -> Callable[..., Pane]:
    def open_pane(*exec_args: str, prompt: str | None = "guest$ ") -> Pane:
        args = [str(tmux_vm.uds_path) if arg == "UDS" else arg for arg in exec_args]
        command = shlex.join([sys.executable, "-m", "fcvsock", "exec", *args])
        # The shell survives a Ctrl-C meant for fcvsock, so it still records
        # the exit status and the terminal settings afterwards.
        script = (
            f"trap : INT; cd {shlex.quote(str(tmp_path))}; stty -g > before; "
            f"{command}; code=$?; stty -g > after; "
            "echo $code > status.tmp; mv status.tmp status"
        )
        pane_id = tmux("new-window", "-P", "-F", "#{pane_id}", script).strip()
        pane = Pane(tmux, pane_id, tmp_path)
        if prompt is not None:
            # capture-pane drops trailing spaces, so match the prompt without them.
            pane.wait_for("^" + re.escape(prompt.rstrip()))
        return pane

    return open_pane


_GUEST_SHELL = ("-t", "-e", "PS1=guest$ ", "UDS", "--", "sh")


@tmux_required
def test_tmux_command_output(open_pane: Callable[..., Pane]) -> None:
    pane = open_pane(*_GUEST_SHELL)
    pane.type_line("echo $((6*7))")
    pane.wait_for(r"^42\s*$")
    pane.type_line("exit")
    assert pane.exit_status() == 0


@tmux_required
def test_tmux_passes_term(open_pane: Callable[..., Pane], tmux: Tmux) -> None:
    expected = tmux("show-options", "-gv", "default-terminal").strip()
    pane = open_pane(*_GUEST_SHELL)
    pane.type_line('echo "term=$TERM"')
    pane.wait_for(rf"^term={re.escape(expected)}\s*$")
    pane.type_line("exit")
    assert pane.exit_status() == 0


@tmux_required
def test_tmux_resize(open_pane: Callable[..., Pane], tmux: Tmux) -> None:
    pane = open_pane(*_GUEST_SHELL)
    pane.type_line("stty size")
    pane.wait_for(r"^24 80\s*$")
    tmux("resize-window", "-t", pane.pane_id, "-x", "120", "-y", "40")
    pane.type_line("stty size")
    pane.wait_for(r"^40 120\s*$")
    pane.type_line("exit")
    assert pane.exit_status() == 0


@tmux_required
@pytest.mark.skipif(shutil.which("less") is None, reason="less is not installed")
def test_tmux_less_quits(open_pane: Callable[..., Pane], tmp_path: Path) -> None:
    rows = tmp_path / "rows.txt"
    rows.write_text("".join(f"row {number:03}\n" for number in range(1, 201)))
    pane = open_pane(*_GUEST_SHELL)
    pane.type_line(f"less {rows}")
    screen = pane.wait_for(r"^row 023\s*$")
    assert "guest$ less" not in screen
    assert "row 024" not in screen
    pane.send("q")
    pane.wait_for(r"^guest\$ less ")
    pane.type_line("echo back-$((2+3))")
    pane.wait_for(r"^back-5\s*$")
    pane.type_line("exit")
    assert pane.exit_status() == 0


@tmux_required
def test_tmux_ctrl_c_interrupts(open_pane: Callable[..., Pane]) -> None:
    pane = open_pane(*_GUEST_SHELL)
    pane.type_line("sh -c 'echo ready-$((1+2)); exec sleep 100'")
    pane.wait_for(r"^ready-3\s*$")
    pane.send("C-c")
    pane.type_line("echo rc=$?")
    pane.wait_for(r"^rc=130\s*$")
    pane.type_line("exit")
    assert pane.exit_status() == 0


@tmux_required
def test_tmux_exit_status_and_stty(open_pane: Callable[..., Pane]) -> None:
    pane = open_pane(*_GUEST_SHELL)
    pane.type_line("exit 3")
    assert pane.exit_status() == 3
    before, after = pane.settings_before_and_after()
    assert after == before


@tmux_required
def test_tmux_escape_disconnects(open_pane: Callable[..., Pane]) -> None:
    pane = open_pane(*_GUEST_SHELL)
    pane.type_line("sleep 100")
    pane.send("-l", "~.")
    assert pane.exit_status() == terminal.EXIT_DISCONNECTED
    before, after = pane.settings_before_and_after()
    assert after == before


@tmux_required
def test_tmux_ctrl_c_without_tty(open_pane: Callable[..., Pane]) -> None:
    remote = (
        "trap 'echo caught-INT' INT; echo ready-$((1+2)); while :; do sleep 1; done"
    )
    pane = open_pane("UDS", "--", "sh", "-c", remote, prompt=None)
    pane.wait_for(r"^ready-3\s*$")
    pane.send("C-c")
    # The local terminal echoes Ctrl-C as ^C before the remote output.
    pane.wait_for(r"caught-INT\s*$")
    pane.send("C-c", "C-c")
    assert pane.exit_status() == 128 + signal.SIGINT


@tmux_required
def test_tmux_default_login_shell(
    open_pane: Callable[..., Pane], tmp_path: Path
) -> None:
    (tmp_path / ".profile").write_text("echo profile-$((4+4))\n")
    pane = open_pane(
        "-e", "SHELL=/bin/sh", "-e", f"HOME={tmp_path}", "UDS", prompt=None
    )
    pane.wait_for(r"^profile-8\s*$")
    pane.type_line("tty")
    pane.wait_for(r"^/dev/pts/\d+\s*$")
    pane.type_line("exit 6")
    assert pane.exit_status() == 6


def _fcvsock_pid(uds_path: str) -> int:
    """Return the pid of the one ``fcvsock exec`` process that uses ``uds_path``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"fcvsock" in args and b"exec" in args and uds_path.encode() in args:
            found.append(int(entry.name))
    assert len(found) == 1, f"expected one fcvsock exec process, found {found}"
    return found[0]


@tmux_required
def test_tmux_sigterm_restores_stty(
    open_pane: Callable[..., Pane], tmux_vm: LocalVM
) -> None:
    pane = open_pane(*_GUEST_SHELL)
    os.kill(_fcvsock_pid(str(tmux_vm.uds_path)), signal.SIGTERM)
    assert pane.exit_status() == 128 + signal.SIGTERM
    before, after = pane.settings_before_and_after()
    assert after == before
