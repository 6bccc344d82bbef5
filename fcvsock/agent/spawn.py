"""Users that commands run as, and spawning commands on pipes or a pty."""

from __future__ import annotations

import fcntl
import logging
import os
import pwd
import re
import struct
import subprocess
import termios
from dataclasses import dataclass, field

from ..protocol import StartRequest

log = logging.getLogger("fcvsock.agent")

EXIT_INVALID_START = 125
EXIT_NOT_PERMITTED = 126
EXIT_CANNOT_START = 127

_MAX_ID = 2**32 - 2
_WINSIZE = struct.Struct("HHHH")
_NUMERIC_USER = re.compile(r"([0-9]+)(?::([0-9]+))?")


# Users and processes.


@dataclass
class Credentials:
    """The identity a command runs as, and the environment that goes with it."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    env: dict[str, str] = field(default_factory=dict)


def resolve_user(
    spec: str, euid: int | None = None, egid: int | None = None
) -> Credentials | None:
    """Return the credentials to run a command as ``spec``.

    ``spec`` is "" (the agent's own user), a user name or ``uid[:gid]``.
    Returns ``None`` when no switch is needed.  Raises ``LookupError`` for an
    unknown user.  Raises ``PermissionError`` when ``euid`` (default: the
    effective uid) is not root and ``spec`` names another user.
    """
    if not spec:
        return None
    credentials = _lookup_user(spec)
    euid = os.geteuid() if euid is None else euid
    egid = os.getegid() if egid is None else egid
    if euid == 0:
        return credentials
    if (credentials.uid, credentials.gid) == (euid, egid):
        return None
    raise PermissionError(
        f"start: cannot run as user {spec!r}: only root can switch users, "
        f"and the agent runs as uid {euid}"
    )


def _lookup_user(spec: str) -> Credentials:
    match = _NUMERIC_USER.fullmatch(spec)
    if match is None:
        try:
            entry = pwd.getpwnam(spec)
        except (KeyError, ValueError):
            # ValueError: a name that cannot be encoded, such as a lone surrogate.
            raise LookupError(f"start: unknown user {spec!r}") from None
        return _credentials_of(entry, entry.pw_gid)
    uid = int(match[1])
    gid = None if match[2] is None else int(match[2])
    if uid > _MAX_ID or (gid is not None and gid > _MAX_ID):
        raise LookupError(f"start: user ids must be at most {_MAX_ID}, got {spec!r}")
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        # An id without a passwd entry runs with no supplementary groups.
        return Credentials(uid, uid if gid is None else gid)
    return _credentials_of(entry, entry.pw_gid if gid is None else gid)


def _credentials_of(entry: pwd.struct_passwd, gid: int) -> Credentials:
    groups = tuple(os.getgrouplist(entry.pw_name, gid))
    env = {"HOME": entry.pw_dir, "USER": entry.pw_name, "LOGNAME": entry.pw_name}
    return Credentials(entry.pw_uid, gid, groups, env)


def _kill_group(pgid: int, signal_number: int) -> None:
    try:
        os.killpg(pgid, signal_number)
    except ProcessLookupError:
        pass
    except OSError as exc:
        log.warning(
            "kill process group %d with signal %d: %s", pgid, signal_number, exc
        )


def _set_window_size(fd: int, columns: int, rows: int) -> None:
    # TIOCSWINSZ on the master resizes the terminal pair. When the size changes,
    # the kernel sends SIGWINCH to its foreground process group (ioctl_tty(2)).
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(rows, columns, 0, 0))


# Spawning a command.


class _StartRejected(Exception):
    """A START that cannot run: the exit code and message the host receives."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


@dataclass
class _Child:
    """A spawned command and the agent's ends of its stdio."""

    popen: subprocess.Popen[bytes]
    stdin_fd: int
    stdout_fd: int
    stderr_fd: int | None

    @property
    def pid(self) -> int:
        return self.popen.pid


def _spawn(request: StartRequest, cwd: str, credentials: Credentials | None) -> _Child:
    if not request.cmd[0]:
        raise _StartRejected(EXIT_CANNOT_START, "start: command '' not found")
    env = _child_env(request, credentials)
    if request.tty:
        return _spawn_with_pty(request, cwd, env, credentials)
    return _spawn_with_pipes(request, cwd, env, credentials)


def _child_env(
    request: StartRequest, credentials: Credentials | None
) -> dict[str, str]:
    for key in request.env:
        if not key or "=" in key:
            raise _StartRejected(
                EXIT_INVALID_START,
                f"start: env keys must be non-empty and contain no '=', got {key!r}",
            )
    env = dict(os.environ)
    if credentials is not None:
        env.update(credentials.env)
    env.update(request.env)
    return env


def _spawn_with_pipes(
    request: StartRequest,
    cwd: str,
    env: dict[str, str],
    credentials: Credentials | None,
) -> _Child:
    pipes = _open_pipes(request.cmd[0])
    (stdin_read, stdin_write), (stdout_read, stdout_write) = pipes[0], pipes[1]
    stderr_read, stderr_write = pipes[2]
    try:
        popen = _popen(
            request, cwd, env, credentials, (stdin_read, stdout_write, stderr_write)
        )
    except BaseException:
        for fd in (stdin_write, stdout_read, stderr_read):
            os.close(fd)
        raise
    finally:
        for fd in (stdin_read, stdout_write, stderr_write):
            os.close(fd)
    for fd in (stdin_write, stdout_read, stderr_read):
        os.set_blocking(fd, False)
    return _Child(popen, stdin_write, stdout_read, stderr_read)


def _open_pipes(program: str) -> list[tuple[int, int]]:
    pipes: list[tuple[int, int]] = []
    try:
        for _ in range(3):
            pipes.append(os.pipe2(os.O_CLOEXEC))
    except OSError as exc:
        for read_fd, write_fd in pipes:
            os.close(read_fd)
            os.close(write_fd)
        raise _StartRejected(
            EXIT_CANNOT_START, f"start: cannot create pipes for {program!r}: {exc}"
        ) from None
    return pipes


def _spawn_with_pty(
    request: StartRequest,
    cwd: str,
    env: dict[str, str],
    credentials: Credentials | None,
) -> _Child:
    try:
        master_fd, slave_fd = os.openpty()
    except OSError as exc:
        raise _StartRejected(
            EXIT_NOT_PERMITTED, f"start: cannot allocate a pseudo-terminal: {exc}"
        ) from None
    try:
        _prepare_terminal(request, master_fd, slave_fd, credentials)
        popen = _popen(
            request, cwd, env, credentials, (slave_fd, slave_fd, slave_fd), True
        )
    except BaseException:
        os.close(master_fd)
        raise
    finally:
        # The master reads EIO only once every copy of the slave is closed.
        os.close(slave_fd)
    os.set_blocking(master_fd, False)
    return _Child(popen, master_fd, master_fd, None)


def _prepare_terminal(
    request: StartRequest,
    master_fd: int,
    slave_fd: int,
    credentials: Credentials | None,
) -> None:
    try:
        if request.tty_width > 0 and request.tty_height > 0:
            _set_window_size(master_fd, request.tty_width, request.tty_height)
        if credentials is not None:
            os.fchown(slave_fd, credentials.uid, -1)
    except OSError as exc:
        raise _StartRejected(
            EXIT_NOT_PERMITTED, f"start: cannot set up the pseudo-terminal: {exc}"
        ) from None


def _acquire_controlling_terminal() -> None:
    # Runs in the child after setsid(), with the pty slave already on fd 0.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _popen(
    request: StartRequest,
    cwd: str,
    env: dict[str, str],
    credentials: Credentials | None,
    stdio: tuple[int, int, int],
    controlling_terminal: bool = False,
) -> subprocess.Popen[bytes]:
    program = request.cmd[0]
    try:
        return subprocess.Popen(
            request.cmd,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            cwd=cwd,
            env=env,
            start_new_session=True,
            # The agent runs one thread, so no lock can be held across fork().
            preexec_fn=(  # noqa: PLW1509
                _acquire_controlling_terminal if controlling_terminal else None
            ),
            user=None if credentials is None else credentials.uid,
            group=None if credentials is None else credentials.gid,
            extra_groups=None if credentials is None else list(credentials.groups),
        )
    except OSError as exc:
        raise _spawn_failure(program, cwd, exc) from None
    except subprocess.SubprocessError as exc:
        raise _StartRejected(
            EXIT_NOT_PERMITTED,
            f"start: cannot make the pseudo-terminal the controlling terminal of "
            f"{program!r}: {exc}",
        ) from None
    except ValueError as exc:
        raise _StartRejected(EXIT_INVALID_START, f"start: {exc}") from None


def _spawn_failure(program: str, cwd: str, exc: OSError) -> _StartRejected:
    reason = exc.strerror or str(exc)
    code = EXIT_NOT_PERMITTED if isinstance(exc, PermissionError) else EXIT_CANNOT_START
    if exc.filename == cwd and program != cwd:
        return _StartRejected(
            code, f"start: cannot change to working directory {cwd!r}: {reason}"
        )
    if isinstance(exc, FileNotFoundError):
        return _StartRejected(code, f"start: command {program!r} not found: {reason}")
    if isinstance(exc, PermissionError):
        return _StartRejected(code, f"start: permission denied running {program!r}")
    return _StartRejected(code, f"start: cannot run {program!r}: {reason}")
