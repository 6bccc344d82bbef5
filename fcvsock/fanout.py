"""Run one command on many VMs at once and collect each VM's outcome.

Every VM gets its own session from :func:`fcvsock.aio.stream`, with at most
``parallel`` sessions open at a time.  :func:`stream` yields live output as
:class:`VMOutput` events, in order within each VM and stream, and each VM's
:class:`VMResult` right after its last output.  :func:`run` collects the
results and calls optional callbacks; :func:`run_blocking` wraps it for code
without an event loop.  A VM that cannot be reached, times out or breaks the
protocol gets a result with an ``error`` kind; it never stops the others.

Memory stays bounded however much the guests print.  Each session reads
about :data:`SESSION_BUFFER` bytes ahead, at most :data:`MAX_QUEUED` bytes
of output wait for the consumer, and each result keeps the first
``max_output`` bytes of each stream.  A consumer that stops reading makes the
sessions stop reading too, so the guests block on their full vsock buffers.
One read may overshoot the read-ahead by up to two frames, so the estimated
peak is ``parallel * (SESSION_BUFFER + 2 * frame size) + MAX_QUEUED`` plus
the kept output.  The fcvsock agent sends output frames of at most
:data:`fcvsock.protocol.MAX_OUTPUT_CHUNK` (64 KiB), which makes about 25 MiB
at the default ``parallel`` of 64.  Sessions reject frames above
:data:`SESSION_MAX_FRAME` (1 MiB) as a protocol error, so hostile guests can
push the same fan-out to about 150 MiB, not the 2 GiB that the protocol's
16 MiB frames would allow.

VM names come from socket paths, which may contain newlines and terminal
escape sequences.  Pass a name through :func:`escape_name` before printing it.

Example::

    from fcvsock import fanout

    results = fanout.run_blocking(["/srv/vms/*/v.sock"], ["uname", "-r"], timeout=30)
    for result in results:
        print(fanout.escape_name(result.name), result.describe())

With asyncio, iterate over the events as they arrive::

    async with contextlib.aclosing(fanout.stream(paths, ["uptime"])) as events:
        async for event in events:
            if isinstance(event, fanout.VMOutput):
                print(fanout.escape_name(event.target.name), event.data)
            else:
                print(fanout.escape_name(event.name), event.describe())

Leaving the ``async with`` block early, or cancelling the task, cancels every
session and closes every socket; the agents then kill the commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import glob
import inspect
import logging
import os
import re
import signal
import string
from collections import deque
from collections.abc import (
    AsyncGenerator,
    Callable,
    Hashable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from . import aio
from ._request import build_start
from .errors import (
    ConnectFailedError,
    HandshakeTimeoutError,
    ProtocolError,
    SessionError,
    SessionTimeoutError,
)
from .handshake import check_guest_port
from .protocol import AGENT_PORT
from .session import ExitStatus

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_PARALLEL",
    "ErrorKind",
    "LineSplitter",
    "Target",
    "VMOutput",
    "VMResult",
    "escape_name",
    "expand_targets",
    "main",
    "run",
    "run_blocking",
    "stream",
    "vm_name",
]

log = logging.getLogger("fcvsock.fanout")

DEFAULT_PARALLEL = 64
# Shorter than a single session's default, because a stopped VM refuses at
# once but is retried until this deadline and occupies a parallel slot meanwhile.
DEFAULT_CONNECT_TIMEOUT = 10.0
# Bytes of each stream a VMResult keeps, per VM.
DEFAULT_MAX_OUTPUT = 256 * 1024
# Output each session reads ahead of the consumer: the max_buffered of
# fcvsock.aio.stream, which fcvsock.session enforces.
SESSION_BUFFER = 256 * 1024
# Largest frame a fan-out session accepts.  The fcvsock agent sends at most
# 64 KiB; the margin leaves room for other agents, and a larger frame ends
# that VM's session as a protocol error instead of costing 16 MiB.
SESSION_MAX_FRAME = 1024 * 1024
# Output bytes queued between all sessions and the consumer.
MAX_QUEUED = 1024 * 1024
DEFAULT_MAX_LINE = 64 * 1024

StreamName = Literal["stdout", "stderr"]
PathLike = str | os.PathLike[str]
NameFrom = str | Callable[[str], str]

_NAME_STYLES = {"parent": "{parent}", "stem": "{stem}", "path": "{path}"}


@dataclass(frozen=True)
class Target:
    """One VM: a name, its vsock Unix socket, and optionally its own command.

    ``cmd``, when given, replaces the command passed to :func:`run` or
    :func:`stream` for this VM; it is stored as a tuple.  ``port`` is the
    agent's guest port.
    """

    name: str
    uds_path: str
    cmd: Sequence[str] | None = None
    port: int = AGENT_PORT

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(
                f"target: name must be a non-empty string, got {self.name!r}"
            )
        object.__setattr__(self, "uds_path", os.fspath(self.uds_path))
        if self.cmd is not None:
            if isinstance(self.cmd, (str, bytes)):
                raise TypeError(
                    f"target {self.name!r}: cmd must be a sequence of arguments, "
                    f"got {self.cmd!r}; use ['sh', '-c', ...] for a shell line"
                )
            object.__setattr__(self, "cmd", tuple(self.cmd))


class ErrorKind(enum.StrEnum):
    """The reason a VM has no exit status."""

    #: The socket refused, was missing or the agent did not accept before the
    #: connect deadline, or connecting failed for good (e.g. permission).
    UNREACHABLE = "unreachable"
    #: The command deadline passed before the exit status arrived.
    TIMED_OUT = "timed_out"
    #: The VMM or the agent sent bytes that break the handshake or the frames.
    PROTOCOL_ERROR = "protocol_error"
    #: The connection ended after the handshake but before the exit status.
    CONNECTION_LOST = "connection_lost"


class VMOutput(NamedTuple):
    """A chunk of live output from one VM: ``(target, stream, data)``."""

    target: Target
    stream: StreamName
    data: bytes


@dataclass(frozen=True)
class VMResult:
    """The outcome of the command on one VM.

    Exactly one of ``exit_status`` and ``error`` is set.  ``error_message``
    is the text of the exception behind ``error`` ("" without one).
    ``duration`` counts seconds from the first connection attempt to the
    result.  ``stdout`` and ``stderr`` keep the first ``max_output`` bytes
    of each stream; ``stdout_bytes`` and ``stderr_bytes`` count all of it.
    """

    target: Target
    exit_status: ExitStatus | None
    error: ErrorKind | None
    error_message: str
    duration: float
    stdout: bytes
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int

    @property
    def name(self) -> str:
        """The VM's name."""
        return self.target.name

    @property
    def uds_path(self) -> str:
        """The VM's vsock Unix socket path."""
        return self.target.uds_path

    @property
    def ok(self) -> bool:
        """True when the command ran and exited with code 0."""
        return self.exit_status is not None and self.exit_status.ok

    @property
    def exit_code(self) -> int | None:
        """The command's exit code, or None when it has no exit status."""
        return None if self.exit_status is None else self.exit_status.exit_code

    @property
    def signal(self) -> int | None:
        """The signal that killed the command, if the agent reported one."""
        return None if self.exit_status is None else self.exit_status.signal

    @property
    def truncated(self) -> bool:
        """True when ``stdout`` or ``stderr`` lacks bytes the VM sent."""
        return (
            len(self.stdout) < self.stdout_bytes
            or len(self.stderr) < self.stderr_bytes
        )

    def describe(self) -> str:
        """Return the outcome in a few words: "ok", "exit code 3", "timed out"."""
        if self.error is not None:
            return self.error.value.replace("_", " ")
        assert self.exit_status is not None
        number = self.exit_status.signal
        if number:
            return f"killed by signal {number}{_signal_name(number)}"
        if self.exit_status.exit_code == 0:
            return "ok"
        return f"exit code {self.exit_status.exit_code}"

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a JSON-ready dict, without the output itself."""
        return {
            "name": self.name,
            "uds_path": self.uds_path,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "duration": round(self.duration, 3),
            "error": None if self.error is None else self.error.value,
            "error_message": self.error_message or None,
            "stdout_bytes": self.stdout_bytes,
            "stderr_bytes": self.stderr_bytes,
        }


Event = VMOutput | VMResult


def _signal_name(number: int) -> str:
    try:
        return f" ({signal.Signals(number).name})"
    except ValueError:
        return ""


# -- targets ------------------------------------------------------------------


def escape_name(name: str) -> str:
    """Return ``name`` fit to print on one terminal line.

    Backslashes are doubled, and newline, carriage return and tab become
    ``\\n``, ``\\r`` and ``\\t``.  Every other non-printable character
    (control characters, escape sequences, bidirectional overrides) becomes
    ``\\xNN`` for each byte of its UTF-8 encoding, and so does a byte of
    the socket path that is not UTF-8.  So two names made of different path
    bytes never print the same.
    """
    if name.isprintable() and "\\" not in name:
        return name
    return "".join(_escape_character(character) for character in name)


_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_character(character: str) -> str:
    escaped = _SHORT_ESCAPES.get(character)
    if escaped is not None:
        return escaped
    if character.isprintable():
        return character
    try:
        # os.fsdecode maps each byte that is not UTF-8 to one lone surrogate,
        # and this turns it back into that byte.
        encoded = character.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        encoded = character.encode("utf-8", "surrogatepass")
    return "".join(f"\\x{byte:02x}" for byte in encoded)


_NAME_FIELDS = {
    "path": "/srv/vms/web-1/v.sock", "parent": "web-1", "file": "v.sock", "stem": "v",
}


def _name_template(name_from: str) -> str:
    """Return the format string for ``name_from``.

    Raise ``ValueError`` with the reason, without naming the parameter, so
    the Python API and the command line can each name their own.
    """
    template = _NAME_STYLES.get(name_from, name_from)
    if "{" not in template:
        raise ValueError(
            "expected parent, stem, path or a format with the fields {path}, "
            "{parent}, {file} and {stem}"
        )
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        reason = _lower_first(exc)
        raise ValueError(
            f"{reason}; write '{{{{' or '}}}}' for a literal brace"
        ) from None
    for _, field, _, _ in parsed:
        if field is not None and field not in _NAME_FIELDS:
            raise ValueError(
                f"unknown field {{{field}}}; use {{path}}, {{parent}}, {{file}} "
                "or {stem}"
            )
    try:
        template.format(**_NAME_FIELDS)
    except ValueError as exc:
        raise ValueError(_lower_first(exc)) from None
    return template


def _lower_first(error: Exception) -> str:
    text = str(error)
    return text[:1].lower() + text[1:]


def _format_name(path: str, template: str) -> str:
    file = os.path.basename(path)
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    stem = os.path.splitext(file)[0]
    return template.format(path=path, parent=parent, file=file, stem=stem)


def _name_function(name_from: NameFrom, operation: str) -> Callable[[str], str]:
    if callable(name_from):
        return name_from
    try:
        template = _name_template(name_from)
    except ValueError as exc:
        raise ValueError(
            f"{operation}: invalid name_from {name_from!r}: {exc}"
        ) from None
    return lambda path: _format_name(path, template)


def vm_name(uds_path: PathLike, name_from: NameFrom = "parent") -> str:
    """Return the name of the VM whose socket is at ``uds_path``.

    ``name_from`` is one of:

    - ``"parent"``: the directory containing the socket, so
      ``/srv/vms/web-1/v.sock`` is ``web-1``;
    - ``"stem"``: the file name without its last suffix, so
      ``/srv/vms/web-1.sock`` is ``web-1``;
    - ``"path"``: the path as given;
    - a format string with the fields ``{path}``, ``{parent}``, ``{file}``
      and ``{stem}``, such as ``"{parent}-{stem}"``;
    - a callable that takes the path and returns the name.

    An empty name falls back to the path.  The name is returned as it is,
    so use :func:`escape_name` to print it.
    """
    path = os.fspath(uds_path)
    return _name_function(name_from, "vm name")(path) or path


def expand_targets(
    specs: PathLike | Target | Iterable[PathLike | Target],
    name_from: NameFrom = "parent",
) -> list[Target]:
    """Turn socket paths, globs and :class:`Target` objects into targets.

    A path with glob characters (``*?[``) is expanded here, in natural
    order (``vm-2`` before ``vm-10``); a glob that matches nothing raises
    ``ValueError``.  A path without them is kept even if it does not exist
    yet, since connecting retries until the VM is up.  A path met twice is
    used once.  Names come from :func:`vm_name`; two targets with the same
    name raise ``ValueError``.
    """
    targets = _collect_targets(specs, name_from)
    _check_unique_names(targets, "name_from")
    return targets


def _collect_targets(
    specs: PathLike | Target | Iterable[PathLike | Target], name_from: NameFrom
) -> list[Target]:
    name_of = _name_function(name_from, "expand targets")
    if isinstance(specs, (str, os.PathLike, Target)):
        specs = [specs]
    targets: list[Target] = []
    seen_paths: set[str] = set()
    for spec in specs:
        if isinstance(spec, Target):
            targets.append(spec)
            continue
        for path in _expand_path(os.fspath(spec)):
            if path not in seen_paths:
                seen_paths.add(path)
                targets.append(Target(name_of(path) or path, path))
    return targets


def _expand_path(spec: str) -> list[str]:
    if not glob.has_magic(spec):
        return [spec]
    paths = glob.glob(spec)
    if not paths:
        if os.path.exists(spec):
            return [spec]
        raise ValueError(
            f"expand targets: glob {spec!r} matched no path; check the pattern "
            "and that the VMs are running"
        )
    return sorted(paths, key=_natural_key)


def _natural_key(text: str) -> list[tuple[int, int | str]]:
    return [
        (0, int(part)) if part.isdigit() else (1, part)
        for part in re.split(r"(\d+)", text)
    ]


def _check_unique_names(targets: Sequence[Target], option: str) -> None:
    """Raise ``ValueError`` if two targets share a name; suggest ``option``."""
    first: dict[str, Target] = {}
    for target in targets:
        other = first.setdefault(target.name, target)
        if other is not target:
            raise ValueError(
                f"expand targets: name {target.name!r} is used by both "
                f"{other.uds_path!r} and {target.uds_path!r}; choose another "
                f"{option}"
            )


# -- line splitting -----------------------------------------------------------


class LineSplitter:
    """Cuts output chunks into whole lines, one buffer per key.

    Use one key per VM and stream, such as ``(name, "stdout")``, so a line
    is never joined with another VM's bytes.  :meth:`feed` returns the
    complete lines, each ending in ``b"\\n"``; :meth:`flush` returns the
    partial last line once the VM has finished.  A line longer than
    ``max_line`` bytes is returned in pieces of ``max_line`` bytes, without
    a newline after each piece, so memory stays bounded.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line <= 0:
            raise ValueError(
                f"line splitter: max_line must be positive, got {max_line}"
            )
        self.max_line = max_line
        self._partial: dict[Hashable, bytes] = {}

    def feed(self, key: Hashable, data: bytes) -> list[bytes]:
        """Add ``data`` to the buffer of ``key`` and return the whole lines."""
        buffered = self._partial.pop(key, b"") + data
        # Only LF ends a line: a CR inside a progress bar is part of it.
        end = buffered.rfind(b"\n") + 1
        lines = [line + b"\n" for line in buffered[:end].split(b"\n")[:-1]]
        rest = buffered[end:]
        while len(rest) >= self.max_line:
            lines.append(rest[: self.max_line])
            rest = rest[self.max_line:]
        if rest:
            self._partial[key] = rest
        return lines

    def flush(self, key: Hashable) -> bytes:
        """Return and forget the partial last line of ``key`` (b"" if none)."""
        return self._partial.pop(key, b"")

    @property
    def pending(self) -> int:
        """Number of keys with a partial line buffered."""
        return len(self._partial)


# -- running ------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """The command and limits shared by every session of one fan-out."""

    cmd: tuple[str, ...] | None
    input: bytes | None
    env: Mapping[str, str] | None
    cwd: str
    user: str
    timeout_seconds: int
    timeout: float | None
    connect_timeout: float
    max_output: int | None

    def command_for(self, target: Target) -> Sequence[str]:
        cmd = target.cmd if target.cmd is not None else self.cmd
        if cmd is None:
            raise ValueError(
                f"fanout: no command for target {target.name!r}: pass cmd or set "
                "Target.cmd"
            )
        return cmd


@dataclass
class _WorkerFailure:
    """An unexpected exception in a worker, passed on to the consumer."""

    error: Exception


class _EventQueue:
    """Events from all sessions to the consumer, bounded in output bytes.

    Output waits while :data:`MAX_QUEUED` bytes are queued, and its session
    does not read meanwhile.  Results and failures are queued without
    waiting, so a full queue never delays the news that a VM finished.
    """

    def __init__(self, max_bytes: int) -> None:
        self._events: deque[Event | _WorkerFailure] = deque()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    async def put_output(self, output: VMOutput) -> None:
        while self._bytes >= self._max_bytes:
            self._writable.clear()
            await self._writable.wait()
        self._bytes += len(output.data)
        self._append(output)

    def put(self, event: VMResult | _WorkerFailure) -> None:
        self._append(event)

    async def get(self) -> Event | _WorkerFailure:
        while not self._events:
            self._readable.clear()
            await self._readable.wait()
        event = self._events.popleft()
        if isinstance(event, VMOutput):
            self._bytes -= len(event.data)
            if self._bytes < self._max_bytes:
                self._writable.set()
        return event

    def _append(self, event: Event | _WorkerFailure) -> None:
        self._events.append(event)
        self._readable.set()


class _KeptOutput:
    """The first ``limit`` bytes of each stream of one VM, and the totals."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.parts: dict[StreamName, list[bytes]] = {"stdout": [], "stderr": []}
        self.kept_bytes: dict[StreamName, int] = {"stdout": 0, "stderr": 0}
        self.total_bytes: dict[StreamName, int] = {"stdout": 0, "stderr": 0}

    def add(self, stream: StreamName, data: bytes) -> None:
        self.total_bytes[stream] += len(data)
        room = len(data)
        if self.limit is not None:
            room = self.limit - self.kept_bytes[stream]
        if room > 0:
            part = data[:room]
            self.parts[stream].append(part)
            self.kept_bytes[stream] += len(part)

    def joined(self, stream: StreamName) -> bytes:
        return b"".join(self.parts[stream])


def _classify(error: BaseException) -> ErrorKind:
    if isinstance(error, SessionTimeoutError):
        return ErrorKind.TIMED_OUT
    if isinstance(error, (HandshakeTimeoutError, ConnectFailedError)):
        return ErrorKind.UNREACHABLE
    if isinstance(error, ProtocolError):
        return ErrorKind.PROTOCOL_ERROR
    # ConnectionLostError, or an OSError that no layer below translated.
    return ErrorKind.CONNECTION_LOST


async def _run_target(
    target: Target, settings: _Settings, queue: _EventQueue
) -> VMResult:
    loop = asyncio.get_running_loop()
    started = loop.time()
    kept = _KeptOutput(settings.max_output)
    status: ExitStatus | None = None
    error: ErrorKind | None = None
    message = ""
    items = aio.stream(
        target.uds_path, settings.command_for(target), input=settings.input,
        env=settings.env, cwd=settings.cwd, user=settings.user,
        timeout_seconds=settings.timeout_seconds, timeout=settings.timeout,
        connect_timeout=settings.connect_timeout, port=target.port,
        max_buffered=SESSION_BUFFER, max_frame=SESSION_MAX_FRAME,
    )
    try:
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, ExitStatus):
                    status = item
                    continue
                kept.add(item.stream, item.data)
                await queue.put_output(VMOutput(target, item.stream, item.data))
    except (
        HandshakeTimeoutError, ConnectFailedError, ProtocolError, SessionError,
        OSError,
    ) as exc:
        error = _classify(exc)
        message = str(exc)
        log.debug("fanout: %r (%r): %s: %s", target.name, target.uds_path, error, exc)
        if isinstance(exc, SessionError):
            await _deliver_unread(target, exc, kept, queue)
    return VMResult(
        target, status, error, message, loop.time() - started,
        kept.joined("stdout"), kept.joined("stderr"),
        kept.total_bytes["stdout"], kept.total_bytes["stderr"],
    )


async def _deliver_unread(
    target: Target, error: SessionError, kept: _KeptOutput, queue: _EventQueue
) -> None:
    """Pass on output that arrived together with the failure."""
    unread: tuple[tuple[StreamName, bytes], ...] = (
        ("stdout", error.stdout), ("stderr", error.stderr),
    )
    for stream_name, data in unread:
        if data:
            kept.add(stream_name, data)
            await queue.put_output(VMOutput(target, stream_name, data))


async def _work(
    pending: deque[Target], settings: _Settings, queue: _EventQueue
) -> None:
    try:
        while pending:
            target = pending.popleft()
            queue.put(await _run_target(target, settings, queue))
    except Exception as exc:  # noqa: BLE001 - the consumer re-raises it
        queue.put(_WorkerFailure(exc))


def _make_settings(
    targets: Sequence[Target],
    cmd: Sequence[str] | None,
    *,
    parallel: int,
    timeout: float | None,
    connect_timeout: float,
    input: bytes | bytearray | memoryview | None,
    env: Mapping[str, str] | None,
    cwd: PathLike,
    user: str,
    timeout_seconds: int,
    max_output: int | None,
) -> _Settings:
    """Check every argument before any VM is contacted."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"fanout: parallel must be an integer >= 1, got {parallel!r}")
    if timeout is not None and timeout < 0:
        raise ValueError(f"fanout: timeout must be >= 0 or None, got {timeout}")
    if connect_timeout < 0:
        raise ValueError(f"fanout: connect_timeout must be >= 0, got {connect_timeout}")
    if max_output is not None and max_output < 0:
        raise ValueError(f"fanout: max_output must be >= 0 or None, got {max_output}")
    if isinstance(cmd, (str, bytes)):
        raise TypeError(
            f"fanout: cmd must be a sequence of arguments, got {cmd!r}; "
            "use ['sh', '-c', ...] for a shell line"
        )
    settings = _Settings(
        cmd=None if cmd is None else tuple(cmd),
        input=None if input is None else bytes(input),
        env=None if env is None else dict(env),
        cwd=os.fspath(cwd), user=user, timeout_seconds=timeout_seconds,
        timeout=timeout, connect_timeout=connect_timeout, max_output=max_output,
    )
    checked: set[tuple[str, ...]] = set()
    for target in targets:
        check_guest_port(target.port)
        command = tuple(settings.command_for(target))
        if command not in checked:
            build_start(
                command, env=settings.env, cwd=settings.cwd, user=user, tty=False,
                tty_size=None, timeout_seconds=timeout_seconds,
            )
            checked.add(command)
    return settings


def stream(
    targets: PathLike | Target | Iterable[PathLike | Target],
    cmd: Sequence[str] | None = None,
    *,
    parallel: int = DEFAULT_PARALLEL,
    timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    input: bytes | bytearray | memoryview | None = None,
    env: Mapping[str, str] | None = None,
    cwd: PathLike = "",
    user: str = "",
    timeout_seconds: int = 0,
    max_output: int | None = DEFAULT_MAX_OUTPUT,
    name_from: NameFrom = "parent",
) -> AsyncGenerator[VMOutput | VMResult, None]:
    """Run ``cmd`` on every target and yield output and results as they come.

    ``targets`` are socket paths, globs of them and :class:`Target` objects
    (see :func:`expand_targets` and :func:`vm_name` for ``name_from``).
    At most ``parallel`` VMs run at a time.  ``connect_timeout`` bounds the
    handshake with each VM, retries included.  ``timeout`` is each VM's
    command deadline in seconds, from START to the exit status (None: no
    deadline).  ``timeout_seconds`` asks each agent to kill its command
    after that many seconds.  ``input`` is sent to every command's stdin,
    followed by EOF.  Results keep the first ``max_output`` bytes of each
    stream (0: only the byte counts, None: all of it).

    Each VM's :class:`VMOutput` events come in order, and its
    :class:`VMResult` follows them.  Wrap the iterator in
    :func:`contextlib.aclosing`: closing it cancels the sessions still
    running and closes their sockets.  Invalid arguments raise
    ``ValueError`` or ``TypeError`` at the call, before any VM is contacted.
    """
    resolved = expand_targets(targets, name_from)
    settings = _make_settings(
        resolved, cmd, parallel=parallel, timeout=timeout,
        connect_timeout=connect_timeout, input=input, env=env, cwd=cwd,
        user=user, timeout_seconds=timeout_seconds, max_output=max_output,
    )
    return _stream_events(resolved, settings, parallel)


async def _stream_events(
    resolved: list[Target], settings: _Settings, parallel: int
) -> AsyncGenerator[VMOutput | VMResult, None]:
    pending = deque(resolved)
    queue = _EventQueue(MAX_QUEUED)
    workers = [
        asyncio.create_task(_work(pending, settings, queue))
        for _ in range(min(parallel, len(resolved)))
    ]
    remaining = len(resolved)
    try:
        while remaining:
            event = await queue.get()
            if isinstance(event, _WorkerFailure):
                raise event.error
            if isinstance(event, VMResult):
                remaining -= 1
            yield event
    finally:
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


OutputCallback = Callable[[VMOutput], object]
ResultCallback = Callable[[VMResult], object]


async def run(
    targets: PathLike | Target | Iterable[PathLike | Target],
    cmd: Sequence[str] | None = None,
    *,
    on_output: OutputCallback | None = None,
    on_result: ResultCallback | None = None,
    parallel: int = DEFAULT_PARALLEL,
    timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    input: bytes | bytearray | memoryview | None = None,
    env: Mapping[str, str] | None = None,
    cwd: PathLike = "",
    user: str = "",
    timeout_seconds: int = 0,
    max_output: int | None = DEFAULT_MAX_OUTPUT,
    name_from: NameFrom = "parent",
) -> list[VMResult]:
    """Run ``cmd`` on every target; return the results in target order.

    ``on_output`` is called with each :class:`VMOutput` and ``on_result``
    with each :class:`VMResult` as they arrive.  When a callback returns an
    awaitable, it is awaited before the next event is delivered, so a slow
    callback slows the sessions down once :data:`MAX_QUEUED` bytes wait.
    An exception from a callback cancels every session and propagates.  The
    other arguments are those of :func:`stream`.
    """
    resolved = expand_targets(targets, name_from)
    results: dict[str, VMResult] = {}
    events = stream(
        resolved, cmd, parallel=parallel, timeout=timeout,
        connect_timeout=connect_timeout, input=input, env=env, cwd=cwd,
        user=user, timeout_seconds=timeout_seconds, max_output=max_output,
    )
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, VMOutput):
                if on_output is not None:
                    await _call(on_output, event)
                continue
            results[event.name] = event
            if on_result is not None:
                await _call(on_result, event)
    return [results[target.name] for target in resolved]


async def _call(callback: Callable[[Any], object], event: Event) -> None:
    outcome = callback(event)
    if inspect.isawaitable(outcome):
        await outcome


def run_blocking(
    targets: PathLike | Target | Iterable[PathLike | Target],
    cmd: Sequence[str] | None = None,
    *,
    on_output: OutputCallback | None = None,
    on_result: ResultCallback | None = None,
    parallel: int = DEFAULT_PARALLEL,
    timeout: float | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    input: bytes | bytearray | memoryview | None = None,
    env: Mapping[str, str] | None = None,
    cwd: PathLike = "",
    user: str = "",
    timeout_seconds: int = 0,
    max_output: int | None = DEFAULT_MAX_OUTPUT,
    name_from: NameFrom = "parent",
) -> list[VMResult]:
    """Run :func:`run` in a new event loop; for code without asyncio.

    Callbacks run in this thread, between socket events.  Raise
    ``RuntimeError`` when called from a running event loop.
    """
    return asyncio.run(
        run(
            targets, cmd, on_output=on_output, on_result=on_result,
            parallel=parallel, timeout=timeout, connect_timeout=connect_timeout,
            input=input, env=env, cwd=cwd, user=user,
            timeout_seconds=timeout_seconds, max_output=max_output,
            name_from=name_from,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fcvsock fanout`` with ``argv``; return the exit status."""
    from . import fanout_cli

    return fanout_cli.main(argv)
