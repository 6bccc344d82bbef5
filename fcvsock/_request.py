"""Argument handling shared by the blocking and the asyncio API."""

from __future__ import annotations

import math
import operator
import os
import time
from collections.abc import Mapping, Sequence

from .protocol import StartRequest, encode_signal

__all__ = [
    "InputFeeder",
    "build_start",
    "check_session_timeout",
    "deadline_after",
    "signal_payload",
]

# STDIN frames are cut at this size: large enough to amortise the header,
# small enough that the agent never buffers much of a stalled stdin.
STDIN_CHUNK = 256 * 1024


def build_start(
    cmd: Sequence[str] | str,
    *,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str],
    user: str,
    tty: bool,
    tty_size: tuple[int, int] | None,
    timeout_seconds: int,
) -> bytes:
    """Return the START payload; raise ``ValueError`` on a bad argument."""
    if isinstance(cmd, (str, bytes)):
        raise TypeError(
            f"start: cmd must be a sequence of arguments, got {cmd!r}; "
            "use ['sh', '-c', ...] for a shell line"
        )
    columns, rows = tty_size if tty_size is not None else (0, 0)
    request = StartRequest(
        cmd=list(cmd),
        env=dict(env or {}),
        working_dir=os.fspath(cwd),
        user=user,
        tty=tty,
        tty_width=columns,
        tty_height=rows,
        timeout_seconds=timeout_seconds,
    )
    return request.encode()


def check_session_timeout(
    timeout: float | None, name: str = "timeout"
) -> float | None:
    """Return ``timeout`` if it is None or a number of seconds >= 0, else raise."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"session: {name} must be a number, got {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"session: {name} must be >= 0 seconds, got {timeout}")
    return timeout


def deadline_after(timeout: float | None, now: float | None = None) -> float | None:
    """Return the monotonic time ``timeout`` seconds from now, or None."""
    checked = check_session_timeout(timeout)
    if checked is None:
        return None
    return (time.monotonic() if now is None else now) + checked


def signal_payload(signal_number: int) -> bytes:
    """Return the SIGNAL payload; raise before anything is sent if invalid."""
    if isinstance(signal_number, bool):
        raise TypeError(f"signal: number must be an int, got {signal_number!r}")
    try:
        number = operator.index(signal_number)
    except TypeError:
        raise TypeError(
            f"signal: number must be an int, got {signal_number!r}"
        ) from None
    return encode_signal(number)


class InputFeeder:
    """Cuts caller-supplied stdin into STDIN frames, then sends EOF once."""

    def __init__(self, data: bytes | bytearray | memoryview | None) -> None:
        try:
            view = memoryview(b"" if data is None else data)
        except TypeError:
            kind = type(data).__name__
            raise TypeError(
                f"input: expected a bytes-like object or None, got {kind}"
            ) from None
        self._view = view.cast("B")
        self._offset = 0
        self.eof_sent = False

    def next_frame(self) -> bytes | None:
        """Return the next STDIN payload, or None when all was taken."""
        if self._offset >= len(self._view):
            return None
        end = self._offset + STDIN_CHUNK
        payload = bytes(self._view[self._offset:end])
        self._offset = min(end, len(self._view))
        return payload
