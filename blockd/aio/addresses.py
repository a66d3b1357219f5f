"""Whether a listening address is reachable only from this machine.

Decided on what a host name resolves to, never on how it is spelt:
``127.0.0.1.nip.io`` looks like loopback and is not.  QMP and NBD listeners on
any other address need TLS, or the operator's explicit ``insecure-network``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

__all__ = ["resolves_to_loopback"]


async def resolves_to_loopback(host: str | None, port: int | None = None, *,
                               loop: asyncio.AbstractEventLoop | None = None) -> bool:
    """Whether every address ``host`` resolves to is a loopback address.

    An empty host (every interface) and a name that does not resolve are not loopback.
    ``loop``: whose ``getaddrinfo`` resolves (the running loop by default).
    """
    if not host:
        return False
    loop = loop or asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback for info in infos)
