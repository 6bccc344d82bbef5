"""Clock setters that the guest agent calls to handle a CLOCK_SYNC frame.

A clock setter is any callable ``(seconds, nanoseconds) -> None`` that sets the
wall clock to that Unix time or raises.  :class:`SystemClock` sets the
machine's ``CLOCK_REALTIME``; :class:`VirtualClock` stores the time in a file,
for a local stand-in VM whose host clock must stay untouched.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ClockSetter", "SystemClock", "VirtualClock"]

ClockSetter = Callable[[int, int], None]

_NS_PER_SECOND = 1_000_000_000
_MAX_REALTIME_NS = 2**63


class SystemClock:
    """Set ``CLOCK_REALTIME`` of this machine; needs ``CAP_SYS_TIME``.

    Raises ``PermissionError`` without that privilege.
    """

    def __call__(self, seconds: int, nanoseconds: int) -> None:
        realtime_ns = seconds * _NS_PER_SECOND + nanoseconds
        time.clock_settime_ns(time.CLOCK_REALTIME, realtime_ns)


class VirtualClock:
    """A guest wall clock kept in a JSON file instead of the kernel.

    Setting it writes ``{"realtime_ns": ..., "monotonic_ns": ...}``: the time
    set and the ``CLOCK_MONOTONIC`` reading at that moment.  The file is
    replaced atomically, so a reader never sees a partial write.
    ``CLOCK_MONOTONIC`` is shared by every process of the machine, so any
    process can compute the current guest time with :meth:`now_ns`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __call__(self, seconds: int, nanoseconds: int) -> None:
        self.set_ns(seconds * _NS_PER_SECOND + nanoseconds)

    def set_ns(self, realtime_ns: int) -> None:
        """Set the guest wall clock to ``realtime_ns`` nanoseconds since the epoch.

        Raises ``OSError`` (EINVAL) for a time before the epoch or past what
        a signed 64-bit nanosecond count holds, as Linux's clock_settime(2)
        does for CLOCK_REALTIME.
        """
        if not 0 <= realtime_ns < _MAX_REALTIME_NS:
            raise OSError(
                errno.EINVAL,
                f"set virtual clock: time must be in 0..{_MAX_REALTIME_NS - 1} ns, "
                f"got {realtime_ns}",
            )
        record = {"realtime_ns": realtime_ns, "monotonic_ns": time.monotonic_ns()}
        self._replace(json.dumps(record).encode())

    def now_ns(self) -> int:
        """Return the guest wall clock in nanoseconds since the epoch.

        That is the time last set plus the ``CLOCK_MONOTONIC`` time elapsed
        since then, or the host's ``time.time_ns()`` when nothing was set yet.
        Raises ``ValueError`` when the file exists but is not a clock record.
        """
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return time.time_ns()
        realtime_ns, monotonic_ns = _parse_record(self.path, raw)
        return realtime_ns + time.monotonic_ns() - monotonic_ns

    def _replace(self, content: bytes) -> None:
        descriptor, temporary = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(content)
            os.replace(temporary, self.path)
        except BaseException:
            os.unlink(temporary)
            raise


def _parse_record(path: Path, raw: bytes) -> tuple[int, int]:
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"read virtual clock {path}: invalid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(  # noqa: TRY004
            f"read virtual clock {path}: expected a JSON object, got {record!r}"
        )
    values = []
    for key in ("realtime_ns", "monotonic_ns"):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(  # noqa: TRY004
                f"read virtual clock {path}: {key} must be an integer, got {value!r}"
            )
        values.append(value)
    return values[0], values[1]
