"""The exceptions fcvsock raises.

Every exception derives from :class:`FcvsockError`.  Protocol violations are
also ``ValueError`` and deadlines are also ``TimeoutError``, so callers can
catch them with the builtin they already expect.
"""

from __future__ import annotations

__all__ = [
    "ClockSyncError",
    "CommandFailedError",
    "ConnectFailedError",
    "ConnectionLostError",
    "FcvsockError",
    "FrameTooLargeError",
    "HandshakeError",
    "HandshakeTimeoutError",
    "IncompleteFrameError",
    "ProtocolError",
    "SessionError",
    "SessionProtocolError",
    "SessionTimeoutError",
]


class FcvsockError(Exception):
    """Base class of every fcvsock error."""


class ProtocolError(FcvsockError, ValueError):
    """The peer sent bytes that break the frame protocol or the handshake."""


class FrameTooLargeError(ProtocolError):
    """A frame header announced a payload above the size limit."""

    def __init__(self, message: str, length: int, limit: int) -> None:
        super().__init__(message)
        self.length = length
        self.limit = limit


class IncompleteFrameError(ProtocolError):
    """The stream ended inside a frame.

    ``part`` is ``"header"`` or ``"payload"``; ``received`` and ``expected``
    count bytes of that part.
    """

    def __init__(
        self, message: str, part: str, received: int, expected: int
    ) -> None:
        super().__init__(message)
        self.part = part
        self.received = received
        self.expected = expected


class HandshakeError(ProtocolError):
    """The VMM socket replied to ``CONNECT`` with something other than ``OK``."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


class HandshakeTimeoutError(FcvsockError, TimeoutError):
    """The guest port did not accept a connection before the deadline.

    ``attempts`` counts connection attempts; ``last_error`` is the failure of
    the last one (also chained as ``__cause__``), or ``None``.
    """

    def __init__(
        self,
        message: str,
        attempts: int,
        last_error: BaseException | None,
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.last_error = last_error


class ConnectFailedError(FcvsockError, ConnectionError):
    """Connecting to the VMM socket failed in a way that retrying cannot fix.

    Raised for errors such as ``PermissionError`` or a path that is not a
    socket; the ``OSError`` is chained as ``__cause__``.
    """

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class SessionError(FcvsockError):
    """A command session failed; carries the output received before that.

    ``stdout`` and ``stderr`` hold every byte delivered by the agent up to
    the failure, in order.
    """

    def __init__(
        self, message: str, stdout: bytes = b"", stderr: bytes = b""
    ) -> None:
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class ConnectionLostError(SessionError, ConnectionError):
    """The connection ended before the agent sent the exit status."""


class SessionProtocolError(SessionError, ProtocolError):
    """The agent broke the frame protocol mid-session.

    The decoder's error is chained as ``__cause__``; the output received
    before it is kept.
    """


class SessionTimeoutError(SessionError, TimeoutError):
    """The host-side deadline of a session expired before the exit status."""


class CommandFailedError(SessionError):
    """A command run with ``check=True`` exited with a non-zero status."""

    def __init__(
        self,
        message: str,
        exit_code: int,
        signal: int | None,
        stdout: bytes = b"",
        stderr: bytes = b"",
    ) -> None:
        super().__init__(message, stdout, stderr)
        self.exit_code = exit_code
        self.signal = signal


class ClockSyncError(FcvsockError):
    """The agent did not confirm a clock sync; ``exit_code`` is its reply."""

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
