"""Run commands in Firecracker and Cloud Hypervisor microVMs over vsock.

The blocking API lives here; :mod:`fcvsock.aio` has the same calls for
asyncio.  ``core_impl`` names the frame core in use: ``"cython"`` or
``"python"`` (the latter when ``FCVSOCK_NO_EXTENSIONS=1`` is set or the
compiled core did not import).
"""

from __future__ import annotations

from ._core import core_impl
from .client import ExecSession, connect, exec, run, stream, sync_clock
from .errors import (
    ClockSyncError,
    CommandFailedError,
    ConnectFailedError,
    ConnectionLostError,
    FcvsockError,
    FrameTooLargeError,
    HandshakeError,
    HandshakeTimeoutError,
    IncompleteFrameError,
    ProtocolError,
    SessionError,
    SessionProtocolError,
    SessionTimeoutError,
)
from .handshake import Handshake
from .protocol import AGENT_PORT, MAX_PAYLOAD, FrameType
from .session import ExitStatus, Output, RunResult, StreamItem

__version__ = "0.1.0"

__all__ = [
    "AGENT_PORT",
    "MAX_PAYLOAD",
    "ClockSyncError",
    "CommandFailedError",
    "ConnectFailedError",
    "ConnectionLostError",
    "ExecSession",
    "ExitStatus",
    "FcvsockError",
    "FrameTooLargeError",
    "FrameType",
    "Handshake",
    "HandshakeError",
    "HandshakeTimeoutError",
    "IncompleteFrameError",
    "Output",
    "ProtocolError",
    "RunResult",
    "SessionError",
    "SessionProtocolError",
    "SessionTimeoutError",
    "StreamItem",
    "connect",
    "core_impl",
    "exec",
    "run",
    "stream",
    "sync_clock",
]
