"""The ``fcvsock`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import NoReturn

from . import aio, terminal
from .errors import FcvsockError, SessionTimeoutError
from .handshake import DEFAULT_CONNECT_TIMEOUT
from .protocol import AGENT_PORT
from .session import ExitStatus

__all__ = ["main"]

# Exit statuses of fcvsock itself, apart from the remote command's own.
EXIT_TIMEOUT = 124
EXIT_FAILURE = 255

_EPILOG = """\
exit status: the remote command's (128+N when signal N killed it);
124 when --timeout expired; 255 when fcvsock itself failed
(socket missing, guest not ready, protocol error)."""

# Without CMD, exec starts the guest user's shell as a login shell: $SHELL from
# the agent's environment, or /bin/sh when that is unset.
_LOGIN_SHELL = ("/bin/sh", "-c", 'exec "${SHELL:-/bin/sh}" -l')

_DOUBLE_INTERRUPT = f"{terminal.DOUBLE_INTERRUPT_SECONDS:g} s"
_EXEC_EPILOG = f"""\
Without CMD, exec starts $SHELL of the guest agent's environment as a login
shell, or /bin/sh -l when SHELL is unset, and implies -t when stdin is a
terminal.

With -t and a terminal on stdin, this terminal runs in raw mode: every key,
Ctrl-C, Ctrl-Z and Ctrl-D included, goes to the remote terminal, whose size
follows this window.  TERM is passed on unless -e sets it.  The terminal's
settings are restored when fcvsock exits, also after SIGHUP, SIGINT, SIGQUIT,
SIGPIPE or SIGTERM, which end the session with exit status 128+N.

{terminal.ESCAPE_HELP}

With -t and a stdin that is not a terminal, fcvsock warns and still runs CMD
under a remote pseudo-terminal, as ssh -tt does, without raw mode or escapes.

Without -t and with a terminal on stdin, Ctrl-C sends SIGINT to the remote
command; a second Ctrl-C within {_DOUBLE_INTERRUPT} closes the session (exit status 130).

{_EPILOG}"""


class _UsageError(Exception):
    """A command line that fcvsock cannot act on; reported in one line."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit with :data:`EXIT_FAILURE`."""

    def error(self, message: str) -> NoReturn:
        self.exit(
            EXIT_FAILURE,
            f"{self.prog}: {message}; see '{self.prog} --help'\n",
        )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative number of seconds, got {text!r}"
        )
    return value


def _deadline_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(
            "expected a positive number of seconds, got '0'; omit the option "
            "for no deadline"
        )
    return value


def _u32(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(
            f"expected an integer in 0..4294967295, got {text!r}"
        )
    return value


def _add_connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port", type=_u32, default=AGENT_PORT,
        help=f"guest vsock port of the agent (default {AGENT_PORT})",
    )
    parser.add_argument(
        "--connect-timeout", type=_seconds, default=DEFAULT_CONNECT_TIMEOUT,
        metavar="S",
        help="seconds to keep retrying while the VM or agent is not ready "
        f"(default {DEFAULT_CONNECT_TIMEOUT:g})",
    )


def _add_command_options(parser: argparse.ArgumentParser, split: bool) -> None:
    parser.add_argument(
        "--local", action="store_true",
        help="start a throwaway local stand-in VM and run the command there "
        "(instead of UDS)",
    )
    _add_connection_options(parser)
    parser.add_argument(
        "--timeout", type=_deadline_seconds, default=None, metavar="S",
        help="host-side deadline in seconds from the start of the command to "
        "its exit status, after the connect wait of --connect-timeout "
        "(default none)",
    )
    parser.add_argument(
        "--remote-timeout", type=_u32, default=0, metavar="S",
        help="seconds after which the agent kills the command's process group "
        "(default 0: never)",
    )
    parser.add_argument(
        "-e", "--env", action="append", default=[], metavar="K=V",
        help="set an environment variable for the command (repeatable)",
    )
    parser.add_argument("--cwd", default="", metavar="DIR", help="working directory")
    parser.add_argument("--user", default="", help="user name or uid[:gid] to run as")
    parser.add_argument(
        "-t", "--tty", action="store_true",
        help="run under a pseudo-terminal (stdout and stderr merge)",
    )
    parser.add_argument(
        # With '--' on the line the command was cut off already, so options
        # may follow UDS; without it, everything after UDS is the command.
        "words", nargs="*" if split else argparse.REMAINDER,
        metavar="UDS -- CMD ...",
        help="the VM's vsock Unix socket (Firecracker's uds_path), then the "
        "command and its arguments",
    )


def _build_parser(split: bool = False) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fcvsock",
        description="Run commands in Firecracker / Cloud Hypervisor microVMs "
        "through the guest agent on vsock port 52.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="run a command and stream its output", epilog=_EPILOG,
        description="Run CMD in the guest, stream its stdout and stderr here, "
        "forward stdin when it is not a terminal, and exit with its status.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_command_options(run, split)

    exec_ = commands.add_parser(
        "exec", help="start an interactive command", epilog=_EXEC_EPILOG,
        description="Start CMD (default: a login shell) in the guest and "
        "connect this terminal to it, forwarding stdin as it is typed.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_command_options(exec_, split)

    sync = commands.add_parser(
        "sync-clock", help="set guest wall clocks to this host's time",
        description="Set each guest's wall clock to this host's time, as needed "
        "after restoring a snapshot.",
    )
    sync.add_argument("uds_paths", nargs="+", metavar="UDS")
    _add_connection_options(sync)

    commands.add_parser(
        "local-vm", help="serve a local stand-in VM at a socket path", add_help=False
    )
    commands.add_parser(
        "agent", help="run the guest agent (inside a VM)", add_help=False
    )
    commands.add_parser(
        "fanout", help="run one command on many VMs at once", add_help=False
    )
    return parser


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"invalid --env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _split_target(args: argparse.Namespace, cmd: list[str] | None) -> None:
    """Set ``args.uds_path`` and ``args.cmd`` from the positional words."""
    words = list(args.words)
    if cmd is None:
        cmd = words[0 if args.local else 1:]
        words = words[:0 if args.local else 1]
    if args.local:
        if words:
            raise _UsageError(f"give either --local or UDS, not both: {words[0]!r}")
        args.uds_path = None
    elif len(words) != 1:
        raise _UsageError("expected one UDS path before '--', or --local")
    else:
        args.uds_path = words[0]
    if not cmd and args.command != "exec":
        raise _UsageError("missing command: give it after '--'")
    args.cmd = cmd


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[str]:
    """Yield the socket path, starting a throwaway stand-in VM for --local."""
    if not args.local:
        yield args.uds_path
        return
    from .localvm import LocalVM

    with (
        tempfile.TemporaryDirectory(prefix="fcvsock-") as state_dir,
        LocalVM(os.path.join(state_dir, "vm.sock")) as vm,
    ):
        yield os.fspath(vm.uds_path)


def _exit_code(status: ExitStatus) -> int:
    """Map the remote exit status onto this process's 0..255."""
    if status.signal is not None and 1 <= status.signal <= 64:
        return 128 + status.signal
    if 0 <= status.exit_code <= 255:
        return status.exit_code
    # Truncating to 8 bits would turn 256 into success; report a failure that
    # cannot be mistaken for fcvsock's own 124 or 255.
    print(
        f"fcvsock: remote exit code {status.exit_code} is outside 0..255; "
        "exiting with 1",
        file=sys.stderr,
    )
    return 1


async def _run_session(args: argparse.Namespace, uds_path: str) -> int:
    # stdin is forwarded only when it is not a terminal, so that
    # `fcvsock run vm.sock -- cmd` typed at a prompt does not wait for input;
    # Ctrl-C at that prompt then sends SIGINT to the command instead.
    stdin_is_terminal = os.isatty(0)
    forward = not stdin_is_terminal and _is_open(0)
    tty_size = terminal.window_size(1) if args.tty else None
    async with aio.exec(
        uds_path, args.cmd, env=_parse_env(args.env), cwd=args.cwd,
        user=args.user, tty=args.tty, tty_size=tty_size,
        timeout_seconds=args.remote_timeout, timeout=args.timeout,
        connect_timeout=args.connect_timeout, port=args.port,
    ) as session:
        if forward:
            ending = await terminal.interact(session, tty=args.tty)
        else:
            with open(os.devnull, "rb") as no_input:  # noqa: ASYNC230 - never blocks
                ending = await terminal.interact(
                    session, tty=args.tty, stdin_fd=no_input.fileno(),
                    forward_interrupt=stdin_is_terminal,
                )
    return ending if isinstance(ending, int) else _exit_code(ending)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def _exec_session(args: argparse.Namespace, uds_path: str) -> int:
    stdin_is_terminal = os.isatty(0)
    cmd = args.cmd or list(_LOGIN_SHELL)
    tty = args.tty or (not args.cmd and stdin_is_terminal)
    if args.tty and not stdin_is_terminal:
        print(
            "fcvsock: pseudo-terminal requested but stdin is not a terminal; "
            "starting the remote one anyway, without raw mode",
            file=sys.stderr,
        )
    env = _parse_env(args.env)
    if tty and "TERM" in os.environ:
        env.setdefault("TERM", os.environ["TERM"])
    tty_size = terminal.window_size(0, 1)
    async with aio.exec(
        uds_path, cmd, env=env, cwd=args.cwd, user=args.user,
        tty=tty, tty_size=tty_size if tty else None,
        timeout_seconds=args.remote_timeout, timeout=args.timeout,
        connect_timeout=args.connect_timeout, port=args.port,
    ) as session:
        ending = await terminal.interact(session, tty=tty)
    return ending if isinstance(ending, int) else _exit_code(ending)


def _command_main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        with _target(args) as uds_path:
            if args.command == "exec":
                return asyncio.run(_exec_session(args, uds_path))
            return asyncio.run(_run_session(args, uds_path))
    except SessionTimeoutError as exc:
        _report(args, exc, started)
        return EXIT_TIMEOUT
    except (FcvsockError, OSError) as exc:
        _report(args, exc, started)
        return EXIT_FAILURE


def _report(args: argparse.Namespace, exc: BaseException, started: float) -> None:
    elapsed = time.monotonic() - started
    where = "local VM" if getattr(args, "local", False) else args.uds_path
    message = str(exc)
    if where not in message:
        message = f"{where}: {message}"
    print(f"fcvsock: {message} (after {elapsed:.1f} s)", file=sys.stderr)


def _sync_clock_main(args: argparse.Namespace) -> int:
    async def sync_one(uds_path: str) -> tuple[str, BaseException | None]:
        try:
            await aio.sync_clock(
                uds_path, port=args.port, connect_timeout=args.connect_timeout
            )
        except (FcvsockError, OSError) as exc:
            return uds_path, exc
        return uds_path, None

    async def sync_all() -> list[tuple[str, BaseException | None]]:
        return await asyncio.gather(*(sync_one(path) for path in args.uds_paths))

    started = time.monotonic()
    failures = 0
    for uds_path, error in asyncio.run(sync_all()):
        if error is None:
            print(f"{uds_path}: clock synced")
        else:
            failures += 1
            args.uds_path = uds_path
            _report(args, error, started)
    return EXIT_FAILURE if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fcvsock`` command line; return the exit status."""
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except _UsageError as exc:
        print(f"fcvsock: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        # The connection is closed by now, so the agent kills the command.
        print("fcvsock: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "local-vm":
        from .localvm import main as local_vm_main

        return local_vm_main(argv[1:])
    if argv and argv[0] == "agent":
        from .agent import main as agent_main

        return agent_main(argv[1:])
    if argv and argv[0] == "fanout":
        from .fanout import main as fanout_main

        return fanout_main(argv[1:])
    cmd = None
    if "--" in argv:
        split = argv.index("--")
        argv, cmd = argv[:split], argv[split + 1:]
    args = _build_parser(cmd is not None).parse_args(argv)
    if args.command in ("run", "exec"):
        _split_target(args, cmd)
        return _command_main(args)
    if cmd is not None:
        raise _UsageError(f"{args.command}: unexpected '--'")
    return _sync_clock_main(args)


def entry_point() -> None:
    """Console-script entry: exit with :func:`main`'s status.

    SIGPIPE stays ignored, as CPython sets it: the agent and the stand-in VM
    run in this process too and must survive a peer that went away.  Output
    to a closed pipe (``fcvsock run ... | head``) ends with status 141 from
    the BrokenPipeError instead.  SIGTERM and SIGHUP unwind like Ctrl-C, so
    a ``--local`` VM and its temporary files are removed.
    """
    for ending in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(ending) == signal.SIG_DFL:
            signal.signal(ending, _exit_on_signal)
    sys.exit(main())


def _exit_on_signal(signal_number: int, frame: object) -> None:
    raise SystemExit(128 + signal_number)
