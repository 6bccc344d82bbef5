"""Frames to and from a session's host socket, and hang-ups while it is unread."""

from __future__ import annotations

import asyncio
import functools
import select
import socket
from collections.abc import Callable
from typing import Protocol

from .._core import FrameDecoder, FrameWriter
from ..errors import ProtocolError

_HOST_READ_BUDGET = 256 * 1024
_HOST_READS_PER_EVENT = 4
_DECODER_BUFFER_SIZE = 64 * 1024


class _HangupWatcher:
    """Reports hang-ups on sockets that are not being read.

    A session stops reading its host socket while the command does not read
    stdin, but must still notice a host that disconnects meanwhile.  The
    sockets wait in an epoll set for EPOLLRDHUP only, so buffered frames do
    not wake the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._on_ready)

    def watch(self, fd: int, on_hangup: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLRDHUP)
        self._callbacks[fd] = on_hangup

    def unwatch(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    def _on_ready(self) -> None:
        for fd, _ in self._epoll.poll(0):
            on_hangup = self._callbacks.pop(fd, None)
            if on_hangup is not None:
                self._epoll.unregister(fd)
                on_hangup()


class _LinkHandler(Protocol):
    def on_frames(self, frames: list[tuple[int, bytes]]) -> None: ...

    def on_host_lost(self, reason: str) -> None: ...

    def on_host_writable(self, pending: int) -> None: ...


class _HostLink:
    """Frames in from the host socket and out to it, with flow control."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        hangups: _HangupWatcher,
        handler: _LinkHandler,
    ) -> None:
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._hangups = hangups
        self._handler = handler
        self._decoder = FrameDecoder(buffer_size=_DECODER_BUFFER_SIZE)
        self._writer = FrameWriter()
        self._reading = False
        self._writing = False
        self._closed = False
        self._failed = False

    @property
    def pending(self) -> int:
        return int(self._writer.pending)

    def resume_reading(self) -> None:
        if self._closed or self._reading:
            return
        self._hangups.unwatch(self._fd)
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True
        # Bytes or a decoder error may already be waiting without a new event.
        self._loop.call_soon(self._on_readable)

    def pause_reading(self) -> None:
        if not self._reading:
            return
        self._loop.remove_reader(self._fd)
        self._reading = False
        self._hangups.watch(self._fd, functools.partial(self._lose, "host hung up"))

    def send(self, frame_type: int, payload: bytes = b"") -> None:
        if self._closed or self._failed:
            return
        self._writer.write(frame_type, payload)
        self._flush()

    def send_raw(self, data: bytes) -> None:
        """Queue bytes that are not a frame after those already queued."""
        if self._closed or self._failed:
            return
        self._writer.write_raw(data)
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hangups.unwatch(self._fd)
        if self._reading:
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._sock.close()

    def _on_readable(self) -> None:
        for _ in range(_HOST_READS_PER_EVENT):
            if self._closed or not self._reading:
                return
            try:
                frames = self._decoder.read_fd(self._fd, _HOST_READ_BUDGET)
            except (ProtocolError, OSError) as exc:
                self._lose(f"read from host failed: {exc}")
                return
            if frames:
                self._handler.on_frames(frames)
            if self._decoder.at_eof:
                self._lose("host closed the connection")
                return
            if not frames:
                return
        self._loop.call_soon(self._on_readable)

    def _on_writable(self) -> None:
        self._flush()
        if not self._closed and not self._failed:
            self._handler.on_host_writable(self._writer.pending)

    def _flush(self) -> None:
        try:
            pending = self._writer.flush(self._fd)
        except OSError as exc:
            self._failed = True
            self._set_writing(False)
            self._loop.call_soon(self._lose, f"write to host failed: {exc}")
            return
        self._set_writing(pending > 0)

    def _set_writing(self, writing: bool) -> None:
        if writing == self._writing or self._closed:
            return
        if writing:
            self._loop.add_writer(self._fd, self._on_writable)
        else:
            self._loop.remove_writer(self._fd)
        self._writing = writing

    def _lose(self, reason: str) -> None:
        if not self._closed:
            self._handler.on_host_lost(reason)
