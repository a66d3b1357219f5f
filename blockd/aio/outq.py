"""How much a peer has yet to read of what was written to it: whether it reads at all.

A transport's own buffer moves only when the kernel's socket buffer has room again, and
that buffer is large (megabytes for NBD clients), so a peer reading slowly can leave the
transport's count unchanged for many seconds.  Adding the kernel's unsent count
(``SIOCOUTQ``) gives a figure that falls as soon as the peer reads anything.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import termios

__all__ = ["unsent_bytes"]


def unsent_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes written to ``transport`` that its peer has not yet taken."""
    buffered = transport.get_write_buffer_size()  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    if sock is None:
        return int(buffered)
    out = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, out, True)
    except (OSError, ValueError):  # closed, or not a socket the kernel counts for
        return int(buffered)
    return int(buffered) + out[0]
