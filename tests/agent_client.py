"""A blocking test client for the guest agent, and a way to run the agent.

The client sends and receives raw frames over a plain Unix stream socket.
Every socket operation has a deadline, so a broken agent fails a test
instead of hanging it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from fcvsock._core import FrameDecoder, encode_frame
from fcvsock.protocol import FrameType

REPO_ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 10.0
_EXIT = struct.Struct("<ii")


@dataclass
class RunResult:
    """Everything a session sent, up to and including EXIT."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_payload: bytes = b""
    frames: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return int(_EXIT.unpack(self.exit_payload)[0])

    @property
    def signal(self) -> int:
        return int(_EXIT.unpack(self.exit_payload)[1])


class AgentConnection:
    """One host connection to the agent, already past the VMM handshake."""

    def __init__(self, sock: socket.socket, timeout: float = DEADLINE) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self._decoder = FrameDecoder()
        self._frames: deque[tuple[int, bytes]] = deque()

    @classmethod
    def connect(cls, path: str) -> AgentConnection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A blocking Unix connect waits while the listen backlog is full,
        # where a connect with a timeout fails at once with EAGAIN.
        sock.connect(path)
        return cls(sock)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, frame_type: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_frame(frame_type, payload))

    def send_start(self, cmd: Any, **fields: Any) -> None:
        self.send(FrameType.START, start_payload(cmd, **fields))

    def read_frame(self) -> tuple[int, bytes] | None:
        """Return the next frame, or ``None`` at EOF."""
        while not self._frames:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self._frames.extend(self._decoder.feed(data))
        return self._frames.popleft()

    def read_until_exit(self) -> RunResult:
        frames = []
        while True:
            frame = self.read_frame()
            if frame is None:
                raise AssertionError(f"connection ended without EXIT: {frames!r}")
            frames.append(frame)
            if frame[0] == FrameType.EXIT:
                return RunResult(
                    stdout=_join(frames, FrameType.STDOUT),
                    stderr=_join(frames, FrameType.STDERR),
                    exit_payload=frame[1],
                    frames=frames,
                )

    def read_stdout_until(self, marker: bytes) -> bytes:
        received = b""
        while marker not in received:
            frame = self.read_frame()
            if frame is None or frame[0] == FrameType.EXIT:
                raise AssertionError(f"no {marker!r} in output {received!r}")
            if frame[0] == FrameType.STDOUT:
                received += frame[1]
        return received

    def closed_by_peer(self) -> bool:
        """Return whether the agent closed the connection with nothing more sent."""
        return self.sock.recv(1) == b""


def _join(frames: list[tuple[int, bytes]], frame_type: int) -> bytes:
    return b"".join(payload for kind, payload in frames if kind == frame_type)


def start_payload(cmd: Any, **fields: Any) -> bytes:
    return json.dumps({"cmd": cmd, **fields}).encode()


def run(path: str, cmd: Any, stdin: bytes | None = b"", **fields: Any) -> RunResult:
    """Run one command: START, optional stdin, EOF, then read until EXIT."""
    with AgentConnection.connect(path) as connection:
        connection.send_start(cmd, **fields)
        try:
            if stdin is not None:
                if stdin:
                    connection.send(FrameType.STDIN, stdin)
                connection.send(FrameType.EOF)
        except (BrokenPipeError, ConnectionResetError):
            # A command that fails to start gets EXIT and a close at once.
            pass
        return connection.read_until_exit()


def exit_payload(exit_code: int, signal_number: int) -> bytes:
    return _EXIT.pack(exit_code, signal_number)


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def process_exists(pid: int) -> bool:
    """Return whether ``pid`` exists, zombies included."""
    return os.path.exists(f"/proc/{pid}")


def pids_in_group(pgid: int) -> list[int]:
    """Return the pids whose process group is ``pgid``, zombies included."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat.rpartition(")")[2].split()
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def child_pids(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(word) for word in text.split()]


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


class AgentProcess:
    """``python -m fcvsock.agent`` on a Unix and a handoff socket in ``directory``."""

    def __init__(self, directory: str, *options: str) -> None:
        self.unix_path = os.path.join(directory, "agent.sock")
        self.handoff_path = os.path.join(directory, "handoff.sock")
        self.clock_path = os.path.join(directory, "clock.json")
        self.log_path = os.path.join(directory, "agent.log")
        self._options = options
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        command = [
            sys.executable, "-m", "fcvsock.agent",
            "--unix", self.unix_path,
            "--handoff", self.handoff_path,
            "--clock", f"virtual:{self.clock_path}",
            "--subreaper",
            "--ready-fd", str(write_fd),
            "--log-level", "debug",
            *self._options,
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stderr=log_file,
                pass_fds=(write_fd,),
                env=env,
                cwd=REPO_ROOT,
            )
        os.close(write_fd)
        try:
            self._wait_ready(read_fd)
        finally:
            os.close(read_fd)

    def _wait_ready(self, read_fd: int) -> None:
        readable, _, _ = select.select([read_fd], [], [], DEADLINE)
        line = os.read(read_fd, 64) if readable else b""
        if line != b"ready\n":
            self.stop()
            raise AssertionError(f"agent did not get ready: {line!r}\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
