"""The Agent class, which serves exec sessions on the listeners it is given."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Self

from ..clock import ClockSetter
from .link import _HangupWatcher
from .listeners import _LISTEN_BACKLOG, _HandoffChannel, _listen_unix, _Listener
from .reaper import _Reaper
from .session import _Session

log = logging.getLogger("fcvsock.agent")

DEFAULT_MAX_SESSIONS = 256
DEFAULT_FIRST_FRAME_TIMEOUT = 30.0
DEFAULT_EXIT_GRACE = 0.2

_CHILD_WAIT_ON_CLOSE = 1.0


class Agent:
    """The guest agent: serves exec sessions on the listeners it is given.

    Use it on a running asyncio loop in the main thread, because it reaps
    its children from a SIGCHLD handler::

        agent = Agent(clock_setter=VirtualClock("/run/clock.json"))
        await agent.start()
        await agent.listen_unix("/run/agent.sock")
        ...
        await agent.close()

    ``clock_setter`` is called as ``clock_setter(seconds, nanoseconds)`` for
    each CLOCK_SYNC and may be replaced at any time.  With ``None``, every
    CLOCK_SYNC gets EXIT -1.  ``reap_orphans`` makes the agent wait for any
    child, as it must when it is PID 1 or a child subreaper.  Without it the
    agent waits only for the commands it spawned.  At most ``max_sessions``
    sessions run at once.  A connection that sends no complete first frame
    within ``first_frame_timeout`` seconds is closed.  ``exit_grace`` is how
    long, in seconds, EXIT waits for output still open after the command's
    leader exited.
    """

    def __init__(
        self,
        *,
        default_cwd: str = "/",
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock_setter: ClockSetter | None = None,
        first_frame_timeout: float = DEFAULT_FIRST_FRAME_TIMEOUT,
        exit_grace: float = DEFAULT_EXIT_GRACE,
        reap_orphans: bool = False,
    ) -> None:
        _check_settings(max_sessions, first_frame_timeout, exit_grace)
        self.default_cwd = default_cwd
        self.max_sessions = max_sessions
        self.clock_setter = clock_setter
        self.first_frame_timeout = first_frame_timeout
        self.exit_grace = exit_grace
        self.reap_orphans = reap_orphans
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper_instance: _Reaper | None = None
        self._hangup_watcher: _HangupWatcher | None = None
        self._listeners: list[_Listener] = []
        self._handoff_channels: set[_HandoffChannel] = set()
        self._on_handoff_idle: list[Callable[[], None]] = []
        self._closing = False
        self._sessions: set[_Session] = set()
        self._slots_in_use = 0
        self._next_session_id = 1

    @property
    def active_sessions(self) -> int:
        """Sessions that passed their first frame and are not closed yet."""
        return self._slots_in_use

    @property
    def open_connections(self) -> int:
        """Host connections the agent holds, including ones still waiting."""
        return len(self._sessions)

    async def start(self) -> None:
        """Install the SIGCHLD handler on the running loop."""
        if self._loop is not None:
            return
        loop = asyncio.get_running_loop()
        reaper = _Reaper(loop, self.reap_orphans)
        reaper.install()
        self._closing = False
        self._loop = loop
        self._reaper_instance = reaper
        self._hangup_watcher = _HangupWatcher(loop)

    async def listen_unix(self, path: str) -> None:
        """Serve each connection accepted on a stream socket bound at ``path``.

        A stale socket file at ``path`` is replaced; any other file there
        raises ``FileExistsError``.
        """
        sock = _listen_unix(path, socket.SOCK_STREAM)
        self._add_listener(sock, self.serve_connection, path)

    async def listen_vsock(self, port: int) -> None:
        """Serve connections to vsock ``port`` of this guest, from any CID."""
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((socket.VMADDR_CID_ANY, port))
            sock.listen(_LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._add_listener(sock, self.serve_connection)

    async def listen_handoff(
        self, path: str, *, on_idle: Callable[[], None] | None = None
    ) -> None:
        """Accept handed-off host sockets over seqpacket connections at ``path``.

        Each message on such a connection carries exactly one fd in
        SCM_RIGHTS, a stream socket past the VMM's ``CONNECT`` line, and the
        UTF-8 JSON ``{"host_port": N, "guest_port": P, "reply": "OK N\\n"}``.
        ``guest_port`` and ``reply`` are optional.  The agent writes
        ``reply`` to the socket as its first bytes, before any frame, so the
        VMM can leave the handshake reply to the agent: a host then gets no
        reply when the agent never takes the socket.  The agent serves the
        socket like an accepted connection and, when it closes it, replies
        ``{"closed": N}`` on the same seqpacket connection.  Invalid messages
        are logged and dropped, with every fd they carried closed.

        ``on_idle`` is called each time the last open handoff connection
        closes, so never before the first one was accepted, and not while
        :meth:`close` runs.
        """
        sock = _listen_unix(path, socket.SOCK_SEQPACKET)
        if on_idle is not None:
            self._on_handoff_idle.append(on_idle)
        self._add_listener(sock, self._open_handoff_channel, path)

    def serve_connection(
        self,
        sock: socket.socket,
        on_close: Callable[[], None] | None = None,
        *,
        reply: bytes = b"",
    ) -> None:
        """Serve one host connection; the agent owns ``sock`` from now on.

        ``on_close`` is called once the agent has closed the socket.
        ``reply`` is written to the socket before any frame: the VMM's
        handshake reply, when the VMM hands the socket over before replying.
        """
        loop = self._require_loop()
        session = _Session(
            self, loop, sock, self._next_session_id, on_close, reply=reply
        )
        self._next_session_id += 1
        self._sessions.add(session)
        session.start()

    async def close(self) -> None:
        """Stop listening, kill running commands and close every connection."""
        if self._loop is None:
            return
        self._closing = True
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for channel in list(self._handoff_channels):
            channel.close()
        self._on_handoff_idle.clear()
        for session in list(self._sessions):
            session.abort()
        await self._wait_for_children(_CHILD_WAIT_ON_CLOSE)
        self._reaper().uninstall()
        self._hangups().close()
        self._loop = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("agent: call start() before serving connections")
        return self._loop

    def _reaper(self) -> _Reaper:
        assert self._reaper_instance is not None
        return self._reaper_instance

    def _hangups(self) -> _HangupWatcher:
        assert self._hangup_watcher is not None
        return self._hangup_watcher

    def _add_listener(
        self,
        sock: socket.socket,
        on_accept: Callable[[socket.socket], None],
        path: str | None = None,
    ) -> None:
        loop = self._require_loop()
        self._listeners.append(_Listener(loop, sock, on_accept, path))

    def _open_handoff_channel(self, sock: socket.socket) -> None:
        channel = _HandoffChannel(self, self._require_loop(), sock)
        self._handoff_channels.add(channel)
        log.debug("handoff: channel opened; %d open", len(self._handoff_channels))

    def _handoff_closed(self, channel: _HandoffChannel) -> None:
        if channel not in self._handoff_channels:
            return
        self._handoff_channels.remove(channel)
        still_open = len(self._handoff_channels)
        log.debug("handoff: channel closed; %d still open", still_open)
        if still_open == 0 and not self._closing:
            for on_idle in self._on_handoff_idle:
                on_idle()

    def _acquire_slot(self, session: _Session) -> bool:
        if self._slots_in_use >= self.max_sessions:
            return False
        self._slots_in_use += 1
        session.holds_slot = True
        return True

    def _session_closed(self, session: _Session) -> None:
        self._sessions.discard(session)
        if session.holds_slot:
            session.holds_slot = False
            self._slots_in_use -= 1

    def _set_clock(self, seconds: int, nanoseconds: int) -> None:
        if self.clock_setter is None:
            raise PermissionError("clock sync: this agent has no clock setter")
        self.clock_setter(seconds, nanoseconds)

    async def _wait_for_children(self, timeout: float) -> None:
        loop = self._require_loop()
        deadline = loop.time() + timeout
        while self._reaper().watched and loop.time() < deadline:
            self._reaper().reap()
            await asyncio.sleep(0.01)


def _check_settings(
    max_sessions: int, first_frame_timeout: float, exit_grace: float
) -> None:
    if max_sessions < 0:
        raise ValueError(f"agent: max_sessions must be >= 0, got {max_sessions}")
    if first_frame_timeout <= 0:
        raise ValueError(
            f"agent: first_frame_timeout must be > 0, got {first_frame_timeout}"
        )
    if exit_grace < 0:
        raise ValueError(f"agent: exit_grace must be >= 0, got {exit_grace}")
