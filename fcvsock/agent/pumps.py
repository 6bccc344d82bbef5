"""Pumps that copy a command's output to the host and STDIN payloads to it."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..protocol import MAX_OUTPUT_CHUNK, FrameType

if TYPE_CHECKING:
    from .session import _Session

log = logging.getLogger("fcvsock.agent")

_STDIN_LOW_WATER = 64 * 1024


def _eof_character(master_fd: int) -> bytes:
    try:
        control_characters = termios.tcgetattr(master_fd)[6]
    except termios.error:
        return b"\x04"
    character = control_characters[termios.VEOF]
    return character if isinstance(character, bytes) else bytes([character])


class _OutputPump:
    """Forwards one output fd of the command to the host as frames."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        frame_type: FrameType,
        session: _Session,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._frame_type = frame_type
        self._session = session
        self._reading = False
        self.done = False

    def resume(self) -> None:
        if not self.done and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def close(self) -> None:
        self.pause()
        self.done = True

    def drain(self, limit: int) -> None:
        """Forward the bytes the fd contains now, up to ``limit``, and stop."""
        forwarded = 0
        while not self.done and forwarded < limit:
            chunk = self._read()
            if not chunk:
                break
            self._session.send_output(self._frame_type, chunk)
            forwarded += len(chunk)
        self.close()

    def _on_readable(self) -> None:
        chunk = self._read()
        if chunk:
            self._session.send_output(self._frame_type, chunk)

    def _read(self) -> bytes | None:
        try:
            chunk = os.read(self._fd, MAX_OUTPUT_CHUNK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            # A pty master reads EIO once every slave fd is closed.
            if exc.errno != errno.EIO:
                log.warning("read command output: %s", exc)
            chunk = b""
        if not chunk:
            self.close()
            self._session.on_output_done()
        return chunk


class _InputPump:
    """Writes STDIN payloads to the command, buffering what it has not read yet.

    In tty mode the fd is the pty master, which the session owns, and EOF is
    sent as the terminal's EOF character.  In pipe mode the pump owns the
    write end of the stdin pipe and closes it at EOF.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        tty: bool,
        on_room: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._tty = tty
        self._on_room = on_room
        self._buffer = bytearray()
        self._writing = False
        self._eof_requested = False
        self._closed = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        if self._eof_requested or self._closed:
            log.debug("dropping %d stdin bytes received after EOF", len(data))
            return
        self._buffer += data
        self._write()

    def feed_eof(self) -> None:
        if self._eof_requested or self._closed:
            return
        self._eof_requested = True
        if self._tty:
            self._buffer += _eof_character(self._fd)
        self._write()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buffer.clear()
        self._set_writing(False)
        if not self._tty:
            os.close(self._fd)

    def _write(self) -> None:
        while self._buffer and not self._closed:
            try:
                written = os.write(self._fd, self._buffer)
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            except OSError as exc:
                log.debug("stdin of the command is closed: %s", exc)
                self.close()
                break
            del self._buffer[:written]
        self._set_writing(bool(self._buffer) and not self._closed)
        if self._eof_requested and not self._buffer and not self._tty:
            self.close()
        if self.buffered <= _STDIN_LOW_WATER:
            self._on_room()

    def _set_writing(self, writing: bool) -> None:
        if writing == self._writing:
            return
        if writing:
            self._loop.add_writer(self._fd, self._write)
        else:
            self._loop.remove_writer(self._fd)
        self._writing = writing
