"""systemd's readiness protocol (``sd_notify``), without libsystemd.

A service with ``Type=notify`` tells systemd it is ready by sending ``READY=1`` as one
datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET``.  The name is a filesystem
path (starting with ``/``) or, when it starts with ``@``, an abstract-namespace address.
Other states the daemon may send: ``STOPPING=1``, ``RELOADING=1``, ``STATUS=free text``,
``MAINPID=n``, ``WATCHDOG=1``; several may go in one message, separated by newlines.

Without ``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) :func:`notify`
does nothing.  It never raises: a daemon must not die because its supervisor went away,
so a failed send is reported as ``False`` and the caller may log it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["notify", "notify_socket_address"]


def notify_socket_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """The address to send to, from ``$NOTIFY_SOCKET``; ``None`` if unset or unusable.

    A path is returned as ``str``; an abstract name (``@name``) as ``bytes`` starting with
    a NUL, which is how Linux spells the abstract namespace.
    """
    env = os.environ if environ is None else environ
    name = env.get("NOTIFY_SOCKET", "")
    if name.startswith("/"):
        return name
    if name.startswith("@") and len(name) > 1:
        return b"\0" + os.fsencode(name[1:])
    return None


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd.

    :param environ: where to look up ``NOTIFY_SOCKET``; ``os.environ`` by default.
    :return: ``True`` if the datagram was sent; ``False`` if there is no notify socket
        or sending failed.
    """
    address = notify_socket_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True
