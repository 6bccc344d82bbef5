"""Frame types and payload codecs of the exec protocol on guest port 52.

A frame is ``[u8 type][u32 little-endian payload length][payload]`` with a
payload of at most :data:`MAX_PAYLOAD` bytes.  This module encodes and
decodes payloads only; splitting a byte stream into frames is the job of the
frame core (:mod:`fcvsock._core`).
"""

# START validation raises ValueError for wrong types too, because the agent
# reports every ValueError from StartRequest.decode as exit code 125.
# ruff: noqa: TRY004

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError

__all__ = [
    "AGENT_PORT",
    "HEADER_SIZE",
    "MAX_OUTPUT_CHUNK",
    "MAX_PAYLOAD",
    "FrameType",
    "StartRequest",
    "decode_clock_sync",
    "decode_exit",
    "decode_resize",
    "decode_signal",
    "encode_clock_sync",
    "encode_exit",
    "encode_resize",
    "encode_signal",
]

AGENT_PORT = 52
HEADER_SIZE = 5
MAX_PAYLOAD = 16 * 1024 * 1024
# The reference agent never sends output frames above this size.
MAX_OUTPUT_CHUNK = 64 * 1024

_RESIZE = struct.Struct("<HH")
_CLOCK_SYNC = struct.Struct("<qI")
_I32 = struct.Struct("<i")
_EXIT_WITH_SIGNAL = struct.Struct("<ii")


class FrameType(enum.IntEnum):
    START = 0x01
    STDIN = 0x02
    RESIZE = 0x03
    EOF = 0x04
    CLOCK_SYNC = 0x05
    SIGNAL = 0x07
    STDOUT = 0x10
    STDERR = 0x11
    EXIT = 0x12


@dataclass
class StartRequest:
    """The START payload: what to run and how."""

    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""
    tty: bool = False
    tty_width: int = 0
    tty_height: int = 0
    timeout_seconds: int = 0

    def encode(self) -> bytes:
        """Serialise to the JSON object the agent expects."""
        self.validate()
        return json.dumps(
            {
                "cmd": self.cmd,
                "env": self.env,
                "working_dir": self.working_dir,
                "user": self.user,
                "tty": self.tty,
                "tty_width": self.tty_width,
                "tty_height": self.tty_height,
                "timeout_seconds": self.timeout_seconds,
            },
            separators=(",", ":"),
        ).encode()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field of the wrong type."""
        if not isinstance(self.cmd, list) or not self.cmd:
            raise ValueError(f"start: cmd must be a non-empty list, got {self.cmd!r}")
        for arg in self.cmd:
            _require_str("cmd item", arg)
        if not isinstance(self.env, dict):
            raise ValueError(f"start: env must be a dict, got {self.env!r}")
        for key, value in self.env.items():
            _require_str("env key", key)
            _require_str("env value", value)
        _require_str("working_dir", self.working_dir)
        _require_str("user", self.user)
        if not isinstance(self.tty, bool):
            raise ValueError(f"start: tty must be a bool, got {self.tty!r}")
        _require_int("tty_width", self.tty_width, 0xFFFF)
        _require_int("tty_height", self.tty_height, 0xFFFF)
        _require_int("timeout_seconds", self.timeout_seconds, 2**32 - 1)

    @classmethod
    def decode(cls, payload: bytes) -> StartRequest:
        """Parse a START payload; raise ``ValueError`` saying what is wrong.

        Missing fields take their defaults and unknown keys are ignored.
        """
        try:
            document: Any = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"start: payload is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            kind = type(document).__name__
            raise ValueError(f"start: expected a JSON object, got {kind}")
        known = {
            key: document[key]
            for key in (
                "cmd", "env", "working_dir", "user", "tty",
                "tty_width", "tty_height", "timeout_seconds",
            )
            if key in document
        }
        if "cmd" not in known:
            raise ValueError("start: missing required field cmd")
        if known.get("env") is None:
            known["env"] = {}
        request = cls(**known)
        request.validate()
        return request


def _require_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"start: {name} must be a string, got {value!r}")
    if "\0" in value:
        raise ValueError(f"start: {name} must not contain NUL, got {value!r}")


def _require_int(name: str, value: object, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"start: {name} must be an integer, got {value!r}")
    if not 0 <= value <= maximum:
        raise ValueError(f"start: {name} must be in 0..{maximum}, got {value}")


def encode_resize(columns: int, rows: int) -> bytes:
    """Encode a RESIZE payload; both values must fit in 16 bits."""
    if not (0 <= columns <= 0xFFFF and 0 <= rows <= 0xFFFF):
        raise ValueError(
            f"resize: columns and rows must be in 0..65535, got {columns}x{rows}"
        )
    return _RESIZE.pack(columns, rows)


def decode_resize(payload: bytes) -> tuple[int, int]:
    """Return ``(columns, rows)`` from a RESIZE payload."""
    if len(payload) < _RESIZE.size:
        raise ProtocolError(
            f"resize: expected {_RESIZE.size} payload bytes, got {len(payload)}"
        )
    columns, rows = _RESIZE.unpack_from(payload)
    return columns, rows


def encode_clock_sync(seconds: int, nanoseconds: int) -> bytes:
    """Encode a CLOCK_SYNC payload: i64 unix seconds, u32 nanoseconds."""
    if not 0 <= nanoseconds < 1_000_000_000:
        raise ValueError(
            f"clock sync: nanoseconds must be in 0..999999999, got {nanoseconds}"
        )
    return _CLOCK_SYNC.pack(seconds, nanoseconds)


def decode_clock_sync(payload: bytes) -> tuple[int, int]:
    """Return ``(seconds, nanoseconds)``; raise ``ProtocolError`` if invalid."""
    if len(payload) < _CLOCK_SYNC.size:
        raise ProtocolError(
            f"clock sync: expected {_CLOCK_SYNC.size} payload bytes, "
            f"got {len(payload)}"
        )
    seconds, nanoseconds = _CLOCK_SYNC.unpack_from(payload)
    if nanoseconds >= 1_000_000_000:
        raise ProtocolError(
            f"clock sync: nanoseconds must be below 10^9, got {nanoseconds}"
        )
    return seconds, nanoseconds


def encode_signal(signal_number: int) -> bytes:
    """Encode a SIGNAL payload; the number must be in 1..64."""
    if isinstance(signal_number, bool) or not 1 <= int(signal_number) <= 64:
        raise ValueError(f"signal: number must be in 1..64, got {signal_number!r}")
    return _I32.pack(int(signal_number))


def decode_signal(payload: bytes) -> int:
    """Return the signal number of a SIGNAL payload."""
    if len(payload) < _I32.size:
        raise ProtocolError(f"signal: expected 4 payload bytes, got {len(payload)}")
    (signal_number,) = _I32.unpack_from(payload)
    if not 1 <= signal_number <= 64:
        raise ProtocolError(f"signal: number must be in 1..64, got {signal_number}")
    return int(signal_number)


def encode_exit(exit_code: int, signal_number: int | None = None) -> bytes:
    """Encode an EXIT payload, in the 8-byte form when a signal is given."""
    if signal_number is None:
        return _I32.pack(exit_code)
    return _EXIT_WITH_SIGNAL.pack(exit_code, signal_number)


def decode_exit(payload: bytes) -> tuple[int, int | None]:
    """Return ``(exit_code, signal)`` from a 4- or 8-byte EXIT payload.

    ``signal`` is ``None`` for the 4-byte form and for a signal field
    outside 1..64, such as 0.
    A payload under 4 bytes is a ``ProtocolError``, never exit code 0.
    """
    if len(payload) < _I32.size:
        raise ProtocolError(
            f"exit: expected at least 4 payload bytes, got {len(payload)}"
        )
    if len(payload) >= _EXIT_WITH_SIGNAL.size:
        exit_code, signal_number = _EXIT_WITH_SIGNAL.unpack_from(payload)
        # Linux signals are 1..64; anything else cannot have killed a process.
        return exit_code, (signal_number if 1 <= signal_number <= 64 else None)
    (exit_code,) = _I32.unpack_from(payload)
    return exit_code, None
