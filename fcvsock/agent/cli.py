"""The ``fcvsock agent`` command line."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
from collections.abc import Sequence

from ..clock import ClockSetter, SystemClock, VirtualClock
from .reaper import set_child_subreaper
from .server import (
    DEFAULT_EXIT_GRACE,
    DEFAULT_FIRST_FRAME_TIMEOUT,
    DEFAULT_MAX_SESSIONS,
    Agent,
)

log = logging.getLogger("fcvsock.agent")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcvsock agent",
        description="Serve the exec protocol (guest port 52) inside a guest.",
    )
    listeners = parser.add_argument_group("listeners (at least one)")
    listeners.add_argument(
        "--vsock-port",
        type=int,
        metavar="PORT",
        help="listen on this AF_VSOCK port, from any CID (inside a real guest)",
    )
    listeners.add_argument(
        "--unix",
        metavar="PATH",
        help="listen on a Unix stream socket; each connection is one session "
        "already past the VMM handshake",
    )
    listeners.add_argument(
        "--handoff",
        metavar="PATH",
        help="accept host connections handed over as SCM_RIGHTS fds on a Unix "
        "seqpacket socket",
    )
    _add_session_options(parser)
    _add_process_options(parser)
    return parser


def _add_session_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-sessions",
        type=_non_negative_int,
        default=DEFAULT_MAX_SESSIONS,
        metavar="N",
        help="sessions served at once; extra ones get EXIT 126, or -1 for "
        "CLOCK_SYNC (default: %(default)s)",
    )
    parser.add_argument(
        "--default-cwd",
        default="/",
        metavar="DIR",
        help="working directory when START gives none (default: %(default)s)",
    )
    parser.add_argument(
        "--clock",
        type=_clock_option,
        metavar="system|virtual:FILE|none",
        help="what CLOCK_SYNC sets: CLOCK_REALTIME, a JSON file, or nothing "
        "(EXIT -1); default: system with --vsock-port, otherwise none, so a "
        "local agent never sets the host clock",
    )
    parser.add_argument(
        "--first-frame-timeout",
        type=_positive_float,
        default=DEFAULT_FIRST_FRAME_TIMEOUT,
        metavar="SECONDS",
        help="close connections that send no first frame within this time "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--exit-grace",
        type=_non_negative_float,
        default=DEFAULT_EXIT_GRACE,
        metavar="SECONDS",
        help="how long EXIT waits for output that background children keep "
        "open after the command exited (default: %(default)s)",
    )


def _add_process_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--subreaper",
        action="store_true",
        help="become a child subreaper and reap orphaned descendants "
        "(always on as PID 1)",
    )
    parser.add_argument(
        "--exit-with-handoff",
        action="store_true",
        help="stop when the last open connection to the --handoff socket "
        "closes, so never before the first one; a VMM stand-in passes this so "
        "that the agent does not outlive it",
    )
    parser.add_argument(
        "--ready-fd",
        type=_non_negative_int,
        metavar="FD",
        help="write 'ready\\n' to this fd and close it once every listener is up",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error", "critical"],
        help="logging level (default: %(default)s)",
    )


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _clock_option(text: str) -> str:
    if text in ("system", "none") or (
        text.startswith("virtual:") and len(text) > len("virtual:")
    ):
        return text
    raise argparse.ArgumentTypeError(
        f"expected system, none or virtual:FILE, got {text!r}"
    )


def _clock_setter(option: str | None, vsock: bool) -> ClockSetter | None:
    if option is None:
        option = "system" if vsock else "none"
    if option == "system":
        return SystemClock()
    if option == "none":
        return None
    return VirtualClock(option.removeprefix("virtual:"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent until SIGTERM or SIGINT; return the process exit code.

    Options (``--help`` lists them): ``--vsock-port PORT``, ``--unix PATH``,
    ``--handoff PATH`` (at least one), ``--max-sessions N``,
    ``--default-cwd DIR``, ``--clock system|virtual:FILE|none``,
    ``--first-frame-timeout SECONDS``, ``--exit-grace SECONDS``,
    ``--subreaper``, ``--exit-with-handoff``, ``--ready-fd FD`` and
    ``--log-level LEVEL``.  With ``--exit-with-handoff`` the agent stops
    as on SIGTERM once every handoff connection has closed.  Stopping kills
    the running commands and removes the listeners' socket files.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.vsock_port is None and args.unix is None and args.handoff is None:
        parser.error("give at least one of --vsock-port, --unix, --handoff")
    if args.exit_with_handoff and args.handoff is None:
        parser.error("--exit-with-handoff requires --handoff PATH")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    reap_orphans = args.subreaper or os.getpid() == 1
    if args.subreaper and os.getpid() != 1:
        try:
            set_child_subreaper()
        except OSError as exc:
            log.error("agent: %s", exc)
            return 1
    return asyncio.run(_serve(args, reap_orphans))


async def _serve(args: argparse.Namespace, reap_orphans: bool) -> int:
    agent = Agent(
        default_cwd=args.default_cwd,
        max_sessions=args.max_sessions,
        clock_setter=_clock_setter(args.clock, args.vsock_port is not None),
        first_frame_timeout=args.first_frame_timeout,
        exit_grace=args.exit_grace,
        reap_orphans=reap_orphans,
    )
    # A stop request may come as soon as the ready line is out.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    await agent.start()
    try:
        await _open_listeners(agent, args, stop)
        _signal_ready(args.ready_fd)
    except OSError as exc:
        log.error("agent: cannot start serving: %s", exc)
        await agent.close()
        return 1
    await stop.wait()
    log.info("agent: stopping")
    await agent.close()
    return 0


async def _open_listeners(
    agent: Agent, args: argparse.Namespace, stop: asyncio.Event
) -> None:
    if args.unix is not None:
        await agent.listen_unix(args.unix)
    if args.handoff is not None:
        on_idle = (
            functools.partial(_stop_after_handoff, stop)
            if args.exit_with_handoff
            else None
        )
        await agent.listen_handoff(args.handoff, on_idle=on_idle)
    if args.vsock_port is not None:
        await agent.listen_vsock(args.vsock_port)
    log.info("agent: listening")


def _stop_after_handoff(stop: asyncio.Event) -> None:
    log.info("agent: every handoff connection has closed; stopping")
    stop.set()


def _signal_ready(ready_fd: int | None) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, b"ready\n")
    finally:
        os.close(ready_fd)
