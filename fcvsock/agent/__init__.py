"""The reference guest agent of the exec protocol on guest port 52.

Each connection carries one session: a START that runs one command, or one
CLOCK_SYNC.  The agent runs on one asyncio event loop in one thread and drives
every fd itself through ``add_reader``/``add_writer``:

- Host socket to command: frames come from the frame decoder.  While the
  command's stdin buffer is above its high-water mark the socket is not read,
  so a command that does not read stdin makes the host's writes block.  A
  socket that is not being read is watched for hang-up in a separate epoll
  set, so a host that disconnects then is still noticed.
- Command to host: output fds are read in chunks of at most
  ``MAX_OUTPUT_CHUNK`` bytes and queued as frames.  While the frame writer
  holds more than its high-water mark the output fds are not read, so a host
  that does not read blocks the command instead of growing the agent.
- Children: one SIGCHLD handler reaps them and passes each wait status to the
  session that spawned the process.

Wire details, exit codes and the handoff of pre-connected sockets are in the
docstrings of :class:`Agent` and :func:`main`.
"""

from .cli import _clock_setter as _clock_setter
from .cli import main
from .reaper import set_child_subreaper
from .server import (
    DEFAULT_EXIT_GRACE,
    DEFAULT_FIRST_FRAME_TIMEOUT,
    DEFAULT_MAX_SESSIONS,
    Agent,
)
from .session import EXIT_CLOCK_SYNC_FAILED as EXIT_CLOCK_SYNC_FAILED
from .spawn import EXIT_CANNOT_START as EXIT_CANNOT_START
from .spawn import EXIT_INVALID_START as EXIT_INVALID_START
from .spawn import EXIT_NOT_PERMITTED as EXIT_NOT_PERMITTED
from .spawn import Credentials, resolve_user

__all__ = [
    "DEFAULT_EXIT_GRACE",
    "DEFAULT_FIRST_FRAME_TIMEOUT",
    "DEFAULT_MAX_SESSIONS",
    "Agent",
    "Credentials",
    "main",
    "resolve_user",
    "set_child_subreaper",
]
