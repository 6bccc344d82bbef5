"""The ``fcvsock fanout`` command line: one command on many VMs at once.

Live output goes out line by line, each line prefixed with its VM's name,
stdout lines on stdout and stderr lines on stderr.  A line longer than
64 KiB is cut into pieces, each prefixed.  A summary with a table of the VMs
that failed goes to stderr at the end, and while the VMs run a progress line
is redrawn on stderr when it is a terminal.  Names are printed through
:func:`fcvsock.fanout.escape_name`, because a socket path may contain
newlines and terminal escape sequences.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import BinaryIO

from . import fanout
from ._request import build_start
from .fanout import ErrorKind, LineSplitter, Target, VMOutput, VMResult, escape_name
from .protocol import AGENT_PORT

__all__ = [
    "EXIT_COMMAND_FAILED",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_VM_FAILED",
    "main",
]

EXIT_OK = 0
EXIT_COMMAND_FAILED = 1
EXIT_VM_FAILED = 2
EXIT_INTERRUPTED = 130
EXIT_FAILURE = 255

_PROG = "fcvsock fanout"
_EPILOG = f"""\
targets:
  Each TARGET is a VM's vsock Unix socket (Firecracker's uds_path) or a
  glob of them, such as '/srv/vms/*/v.sock'; quote globs so that fcvsock
  expands them, in natural order (vm-2 before vm-10).  A VM's name comes
  from its path, as --name-from says: parent (default) is the directory
  containing the socket (/srv/vms/web-1/v.sock is web-1), stem the file
  name without its suffix (web-1.sock is web-1), path the path itself.
  A format such as '{{parent}}-{{stem}}' may use the fields {{path}},
  {{parent}}, {{file}} and {{stem}}.  Names are printed with backslashes,
  newlines, escape sequences and other non-printable characters escaped
  (\\n, \\x1b).

output:
  Lines appear as 'NAME | line', never mixed with another VM's line; a
  line longer than 64 KiB is cut into pieces, each with the prefix, and a
  last line without a newline is printed when its VM finishes.  The
  summary and the table of VMs that did not succeed go to stderr.  --json
  prints one JSON object per VM as it finishes (name, uds_path,
  exit_code, signal, duration, error, error_message, stdout_bytes,
  stderr_bytes) with the names unescaped, and no output lines; combine it
  with --out-dir to keep the output.  --out-dir writes all output unless
  --max-output-bytes is given; file names are the escaped names with '/'
  replaced by '_'.

memory:
  Each running VM holds up to 256 KiB of output read ahead plus up to two
  protocol frames, and up to 128 KiB of unfinished lines when lines are
  printed.  All VMs together queue up to 1 MiB of output.  The fcvsock
  agent sends output frames of at most 64 KiB, so the default 64 VMs at a
  time buffer about 33 MiB.  A frame above 1 MiB ends that VM's session as
  a protocol error, so hostile guests can push that to about 160 MiB.
  These figures are estimates from the limits above.

exit status:
  {EXIT_OK}    the command exited 0 on every VM
  {EXIT_COMMAND_FAILED}    every VM was reached, and the command exited non-zero or was
       killed by a signal on at least one
  {EXIT_VM_FAILED}    at least one VM was unreachable, timed out, broke the protocol
       or lost the connection (takes precedence over {EXIT_COMMAND_FAILED})
  {EXIT_INTERRUPTED}  interrupted by SIGINT; the summary covers the VMs done by then
  {EXIT_FAILURE}  invalid arguments, a glob that matched nothing, two VMs with the
       same name, an --out-dir that cannot be written (each reported on
       one line), or writing the output failed while the VMs ran"""

# Names longer than this are not padded, so one long name does not push
# every line to the right.
_MAX_PAD = 32
_PROGRESS_INTERVAL = 0.25
_CLEAR_LINE = b"\r\x1b[K"
_INTERRUPTED = "interrupted"
_USAGE = f"{_PROG} [options] TARGET... -- CMD [ARG...]"
_MAX_U32 = 0xFFFFFFFF
_SIZE_SUFFIXES = {"K": 1024, "M": 1024**2, "G": 1024**3}


class _UsageError(Exception):
    """Invalid command line; main() reports it on one line, exit EXIT_FAILURE."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("argument "):
            raise _UsageError(message)
        # Messages such as "unrecognized arguments: ..." do not show the
        # expected form, so the usage line follows them.
        raise _UsageError(f"{message}; usage: {_USAGE}")


def _positive_int(text: str) -> int:
    value = _parse_int(text)
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected an integer >= 1"
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected seconds >= 0, such as 30 or 0.5"
        )
    return value


def _u32(text: str) -> int:
    value = _parse_int(text)
    if value is None or not 0 <= value <= _MAX_U32:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected an integer in 0..{_MAX_U32}"
        )
    return value


def _byte_count(text: str) -> int:
    multiplier = _SIZE_SUFFIXES.get(text[-1:].upper(), 1)
    digits = text[:-1] if multiplier > 1 else text
    value = _parse_int(digits)
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: expected a number of bytes >= 0, "
            "optionally with the suffix K, M or G (KiB, MiB, GiB)"
        )
    return value * multiplier


def _parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _name_style(text: str) -> str:
    try:
        fanout._name_template(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}") from None
    return text


def _build_parser() -> _Parser:
    parser = _Parser(
        prog=_PROG,
        usage=_USAGE,
        description="Run CMD on many microVMs at once through the guest agent, "
        "stream each VM's output line by line, and summarise the outcome.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "targets", nargs="+", metavar="TARGET",
        help="vsock Unix socket path or glob of them",
    )
    parser.add_argument(
        "-p", "--parallel", type=_positive_int, default=fanout.DEFAULT_PARALLEL,
        metavar="N",
        help=f"VMs to run at a time (default {fanout.DEFAULT_PARALLEL}); host "
        "memory grows with it, see below",
    )
    parser.add_argument(
        "--timeout", type=_seconds, default=None, metavar="S",
        help="seconds each VM's command may run, from start to exit status, "
        "before it counts as timed out (default: no limit)",
    )
    parser.add_argument(
        "--connect-timeout", type=_seconds, default=fanout.DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help="seconds to keep retrying while a VM or its agent is not ready, "
        "before it counts as unreachable "
        f"(default {fanout.DEFAULT_CONNECT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--remote-timeout", type=_u32, default=0, metavar="S",
        help="seconds after which each agent kills its command's process group "
        "(default 0: never)",
    )
    parser.add_argument(
        "--port", type=_u32, default=AGENT_PORT,
        help=f"guest vsock port of the agent (default {AGENT_PORT})",
    )
    parser.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V",
        help="set an environment variable for the command (repeatable)",
    )
    parser.add_argument(
        "--cwd", default="", metavar="DIR",
        help="working directory of the command in the guest (default: the agent's)",
    )
    parser.add_argument("--user", default="", help="user name or uid[:gid] to run as")
    parser.add_argument(
        "--name-from", type=_name_style, default="parent", metavar="STYLE",
        help="how to name a VM from its socket path: parent, stem, path or a "
        "format (default parent; see below)",
    )
    parser.add_argument(
        "--no-prefix", action="store_true",
        help="print output lines without the 'NAME | ' prefix",
    )
    parser.add_argument(
        "--out-dir", metavar="DIR",
        help="write each VM's output to DIR/NAME.stdout and DIR/NAME.stderr "
        "instead of printing it; all of it unless --max-output-bytes is given",
    )
    parser.add_argument(
        "--max-output-bytes", type=_byte_count, default=None, metavar="N",
        help="print or write at most N bytes of each VM's stdout and of its "
        "stderr and drop the rest; K, M and G mean KiB, MiB and GiB "
        "(default: no limit)",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object per VM on stdout instead of output lines",
    )
    return parser


def _parse_args(argv: list[str]) -> argparse.Namespace:
    if "--" not in argv:
        if any(word in ("-h", "--help") for word in argv):
            _build_parser().parse_args(["--help"])
        raise _UsageError(
            f"missing '--' between the targets and the command; usage: {_USAGE}"
        )
    split = argv.index("--")
    args = _build_parser().parse_args(argv[:split])
    args.cmd = argv[split + 1:]
    if not args.cmd:
        raise _UsageError(f"missing command after '--'; usage: {_USAGE}")
    args.env = _parse_env(args.env)
    return args


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"invalid --env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


# -- writing ------------------------------------------------------------------


class _Console:
    """Writes bytes to stdout and stderr, and the progress line on stderr.

    The progress line is erased before anything else is written, so output
    lines never share a terminal line with it; :meth:`draw_progress` puts
    it back.
    """

    def __init__(self, stdout: BinaryIO, stderr: BinaryIO, show_progress: bool) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.show_progress = show_progress
        self._progress_shown = False

    def write(self, stream: BinaryIO, data: bytes) -> None:
        self.erase_progress()
        stream.write(data)

    def flush(self) -> None:
        self.stdout.flush()
        self.stderr.flush()

    def draw_progress(self, text: str) -> None:
        if not self.show_progress:
            return
        self.stdout.flush()
        self.stderr.write(_CLEAR_LINE + text.encode())
        self.stderr.flush()
        self._progress_shown = True

    def erase_progress(self) -> None:
        if self._progress_shown:
            self.stderr.write(_CLEAR_LINE)
            self.stderr.flush()
            self._progress_shown = False


class _LinePrinter:
    """Prints whole output lines, prefixed with the VM's name unless disabled."""

    def __init__(
        self, console: _Console, targets: Sequence[Target], prefix: bool
    ) -> None:
        self._console = console
        escaped_names = {target.name: escape_name(target.name) for target in targets}
        width = min(max(len(name) for name in escaped_names.values()), _MAX_PAD)
        self._prefixes = {
            name: f"{escaped:<{width}} | ".encode() if prefix else b""
            for name, escaped in escaped_names.items()
        }
        self._splitter = LineSplitter()

    def output(self, event: VMOutput) -> None:
        name = event.target.name
        lines = self._splitter.feed((name, event.stream), event.data)
        if lines:
            self._print(name, event.stream, lines)

    def finish(self, name: str) -> None:
        """Print the partial last lines of ``name``, each with a newline."""
        for stream_name in ("stdout", "stderr"):
            rest = self._splitter.flush((name, stream_name))
            if rest:
                self._print(name, stream_name, [rest])

    def finish_all(self, names: Sequence[str]) -> None:
        for name in names:
            self.finish(name)

    def _print(self, name: str, stream_name: str, lines: list[bytes]) -> None:
        prefix = self._prefixes[name]
        console = self._console
        stream = console.stdout if stream_name == "stdout" else console.stderr
        text = b"".join(
            prefix + (line if line.endswith(b"\n") else line + b"\n") for line in lines
        )
        console.write(stream, text)


class _OutputFiles:
    """Writes each VM's output to DIR/NAME.stdout and DIR/NAME.stderr."""

    def __init__(self, out_dir: str, targets: Sequence[Target]) -> None:
        self._paths: dict[tuple[str, str], str] = {}
        owners: dict[str, str] = {}
        for target in targets:
            stem = _file_stem(target.name)
            other = owners.setdefault(stem, target.name)
            if other != target.name:
                raise _UsageError(
                    f"--out-dir: VMs {other!r} and {target.name!r} would both "
                    f"write {stem + '.stdout'!r}; choose another --name-from"
                )
            for stream_name in ("stdout", "stderr"):
                self._paths[target.name, stream_name] = os.path.join(
                    out_dir, f"{stem}.{stream_name}"
                )
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise _UsageError(
                f"--out-dir {out_dir!r}: creating the directory failed: "
                f"{exc.strerror}; choose a directory you can write"
            ) from None
        # Empty files for every VM up front: a VM that printed nothing
        # still has both, and files from an earlier run are truncated.
        for path in self._paths.values():
            try:
                os.close(os.open(path, _CREATE_FLAGS | os.O_TRUNC, 0o644))
            except OSError as exc:
                raise _UsageError(
                    f"--out-dir {out_dir!r}: creating {os.path.basename(path)!r} "
                    f"failed: {exc.strerror}; choose a directory you can write"
                ) from None

    def output(self, event: VMOutput) -> None:
        # Opened per chunk, so hundreds of VMs do not hold hundreds of fds.
        path = self._paths[event.target.name, event.stream]
        with open(os.open(path, _CREATE_FLAGS | os.O_APPEND, 0o644), "ab") as file:
            file.write(event.data)


# O_NOFOLLOW: a symlink planted in a shared output directory must not
# redirect output into another file.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _file_stem(name: str) -> str:
    """Return a file name for ``name`` that stays inside the output directory."""
    stem = escape_name(name).strip("/").replace("/", "_")
    if stem in ("", ".", ".."):
        stem = "_" + stem
    return stem


class _OutputLimit:
    """The --max-output-bytes limit, applied to each VM's stdout and stderr."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self._passed: Counter[tuple[str, str]] = Counter()
        # Names of the VMs whose output was cut.
        self.cut: set[str] = set()

    def apply(self, event: VMOutput) -> VMOutput:
        """Return ``event`` with its data cut to the bytes still allowed."""
        if self.max_bytes is None:
            return event
        key = (event.target.name, event.stream)
        room = max(self.max_bytes - self._passed[key], 0)
        if len(event.data) <= room:
            self._passed[key] += len(event.data)
            return event
        self.cut.add(event.target.name)
        self._passed[key] += room
        return event._replace(data=event.data[:room])


# -- running ------------------------------------------------------------------


class _FanoutRun:
    """Sends events to the outputs and tracks progress and results."""

    def __init__(
        self, args: argparse.Namespace, targets: Sequence[Target], console: _Console
    ) -> None:
        self.args = args
        self.targets = targets
        self.console = console
        self.results: list[VMResult] = []
        self.started = time.monotonic()
        # Why the run ended before every VM finished, if it did.
        self.stopped: str | None = None
        self.limit = _OutputLimit(args.max_output_bytes)
        self._printer: _LinePrinter | None = None
        self._files: _OutputFiles | None = None
        if args.out_dir is not None:
            self._files = _OutputFiles(args.out_dir, targets)
        elif not args.json:
            self._printer = _LinePrinter(console, targets, prefix=not args.no_prefix)

    async def execute(self) -> None:
        events = fanout.stream(
            self.targets, self.args.cmd, parallel=self.args.parallel,
            timeout=self.args.timeout, connect_timeout=self.args.connect_timeout,
            env=self.args.env, cwd=self.args.cwd, user=self.args.user,
            timeout_seconds=self.args.remote_timeout, max_output=0,
        )
        ticker = None
        if self.console.show_progress:
            ticker = asyncio.create_task(self._tick())
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    self.handle(event)
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker

    def handle(self, event: VMOutput | VMResult) -> None:
        if isinstance(event, VMOutput):
            event = self.limit.apply(event)
            if not event.data:
                return
            if self._printer is not None:
                self._printer.output(event)
            if self._files is not None:
                self._files.output(event)
        else:
            self.results.append(event)
            if self._printer is not None:
                self._printer.finish(event.name)
            if self.args.json:
                line = json.dumps(event.to_dict()) + "\n"
                self.console.write(self.console.stdout, line.encode())
            self.console.draw_progress(self.progress_text())
        self.console.flush()

    def finish(self) -> None:
        """Print what is left of unfinished VMs' lines and erase the progress line."""
        if self._printer is not None:
            self._printer.finish_all([target.name for target in self.targets])
        self.console.erase_progress()
        self.console.flush()

    def progress_text(self) -> str:
        failed = sum(1 for result in self.results if not result.ok)
        elapsed = time.monotonic() - self.started
        return (
            f"fanout: {len(self.results)}/{len(self.targets)} done, "
            f"{failed} failed, {elapsed:.0f} s"
        )

    async def _tick(self) -> None:
        while True:
            self.console.draw_progress(self.progress_text())
            await asyncio.sleep(_PROGRESS_INTERVAL)


# -- summary ------------------------------------------------------------------


_KIND_LABELS = {
    ErrorKind.TIMED_OUT: "timed out",
    ErrorKind.UNREACHABLE: "unreachable",
    ErrorKind.PROTOCOL_ERROR: "protocol error",
    ErrorKind.CONNECTION_LOST: "connection lost",
}


def _counts_line(
    results: Sequence[VMResult], total: int, elapsed: float, stopped: str | None
) -> str:
    counts = Counter(
        "ok" if result.ok
        else "failed" if result.error is None
        else _KIND_LABELS[result.error]
        for result in results
    )
    # The four common outcomes are always listed, the rare ones when they occurred.
    always = ["ok", "failed", "timed out", "unreachable"]
    rare = ["protocol error", "connection lost"]
    parts = [f"{counts[label]} {label}" for label in always]
    parts += [f"{counts[label]} {label}" for label in rare if counts[label]]
    vms = "VM" if total == 1 else "VMs"
    head = f"fanout: {total} {vms}"
    if stopped is not None:
        head = f"fanout: {stopped}, {len(results)} of {total} {vms} done"
    return f"{head}: {', '.join(parts)} in {elapsed:.1f} s"


def _failure_table(results: Sequence[VMResult], order: Sequence[Target]) -> list[str]:
    position = {target.name: index for index, target in enumerate(order)}
    failed = sorted(
        (result for result in results if not result.ok),
        key=lambda result: position[result.name],
    )
    if not failed:
        return []
    rows = [("NAME", "RESULT", "DURATION", "DETAIL")]
    for result in failed:
        rows.append((
            escape_name(result.name), result.describe(), f"{result.duration:.2f} s",
            _printable(_short_detail(result.error_message)),
        ))
    name_width = max(len(row[0]) for row in rows)
    result_width = max(len(row[1]) for row in rows)
    duration_width = max(len(row[2]) for row in rows)
    return [
        f"{name:<{name_width}}  {outcome:<{result_width}}  "
        f"{duration:>{duration_width}}  {detail}".rstrip()
        for name, outcome, duration, detail in rows
    ]


def _printable(text: str) -> str:
    """Return ``text`` with non-printable characters escaped, so it stays one line.

    Messages quote the values they name with repr, but argparse and OSError
    messages may contain an argument or a path as it is.
    """
    if text.isprintable():
        return text
    return "".join(
        character if character.isprintable() else fanout._escape_character(character)
        for character in text
    )


def _short_detail(message: str) -> str:
    # Messages nest "operation: reason" from the layers below; the innermost
    # reason ("[Errno 111] Connection refused") is what differs between VMs.
    # The whole message is in the --json output.
    return message.rpartition(": ")[2]


def _exit_status(run: _FanoutRun) -> int:
    if run.stopped == _INTERRUPTED:
        return EXIT_INTERRUPTED
    if run.stopped is not None:
        return EXIT_FAILURE
    results = run.results
    if any(result.error is not None for result in results):
        return EXIT_VM_FAILED
    if any(not result.ok for result in results):
        return EXIT_COMMAND_FAILED
    return EXIT_OK


def _write_summary(run: _FanoutRun) -> None:
    elapsed = time.monotonic() - run.started
    lines = [_counts_line(run.results, len(run.targets), elapsed, run.stopped)]
    if run.limit.cut:
        vms = "VM" if len(run.limit.cut) == 1 else "VMs"
        lines.append(
            f"fanout: output of {len(run.limit.cut)} {vms} cut at "
            f"--max-output-bytes {run.limit.max_bytes} per stream"
        )
    lines += _failure_table(run.results, run.targets)
    text = "".join(line + "\n" for line in lines)
    run.console.write(run.console.stderr, text.encode())
    run.console.flush()


# -- main ---------------------------------------------------------------------


def _check_arguments(args: argparse.Namespace) -> list[Target]:
    try:
        targets = fanout._collect_targets(args.targets, args.name_from)
        fanout._check_unique_names(targets, "--name-from")
        targets = [
            Target(target.name, target.uds_path, port=args.port) for target in targets
        ]
        build_start(
            args.cmd, env=args.env, cwd=args.cwd, user=args.user, tty=False,
            tty_size=None, timeout_seconds=args.remote_timeout,
        )
    except (ValueError, TypeError) as exc:
        raise _UsageError(str(exc)) from None
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fcvsock fanout`` with ``argv``; return the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    console = _Console(sys.stdout.buffer, sys.stderr.buffer, sys.stderr.isatty())
    try:
        args = _parse_args(words)
        targets = _check_arguments(args)
        run = _FanoutRun(args, targets, console)
    except _UsageError as exc:
        print(f"{_PROG}: {_printable(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except SystemExit as exc:
        # --help
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    try:
        asyncio.run(run.execute())
    except KeyboardInterrupt:
        run.stopped = _INTERRUPTED
    except OSError as exc:
        # Sessions turn their own errors into results, so this came from
        # writing the output; the sessions were cancelled.
        run.stopped = "stopped"
        print(f"{_PROG}: writing the output failed: {exc}", file=sys.stderr)
    finally:
        run.finish()
    _write_summary(run)
    return _exit_status(run)
