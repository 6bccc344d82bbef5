"""An agent command for LocalVM that dies while it takes its first handoff.

It listens on the ``--handoff`` and ``--unix`` paths it is given and writes
the ready line.  Then it receives one handed-off host socket and exits
without writing to it, as an agent killed at that moment would.  Every other
option is ignored.
"""

from __future__ import annotations

import argparse
import os
import socket


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--handoff", required=True)
    parser.add_argument("--unix", required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args, _ = parser.parse_known_args()
    handoff = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handoff.bind(args.handoff)
    handoff.listen()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.unix)
    listener.listen()
    os.write(args.ready_fd, b"ready\n")
    os.close(args.ready_fd)

    channel, _ = handoff.accept()
    _, fds, _, _ = socket.recv_fds(channel, 4096, 4)
    for fd in fds:
        os.close(fd)


if __name__ == "__main__":
    main()
