"""UNIX socket paths: take one over only when no live program listens on it.

A socket file left behind by a daemon that died is replaced; one a running
daemon listens on is refused, so a second daemon started with the same
options cannot take the first one's clients away (and delete its socket on
exit, leaving it running and unreachable).  Connecting is how to tell: a live
listener accepts (the probe connection is closed at once), a stale file
refuses with ECONNREFUSED.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

__all__ = ["SocketInUse", "claim_socket_path"]


class SocketInUse(OSError):
    """A live program listens on the socket path."""


def claim_socket_path(path: str) -> None:
    """Remove a stale socket at ``path``; raise SocketInUse when a program listens on it.

    Anything else at ``path`` (a regular file, a directory) is left alone: the
    bind that follows fails with EADDRINUSE, as it should.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens: left behind by a daemon that is gone
        return
    finally:
        probe.close()
    raise SocketInUse(errno.EADDRINUSE, f"{path} is in use by a running program")
