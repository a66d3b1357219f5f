"""NBD's error vocabulary: the exception for a peer that broke the protocol, and the one table
that turns an errno from the device layer into an NBD error value.

The specification allows only eight error values on the wire ("the allowed values for the
error field have been restricted to set of possibilities"), numbered like their Linux errno.
:func:`errno_to_nbd` maps every other errno onto them:

=========================================  ==============================================
errno                                      NBD error
=========================================  ==============================================
EPERM, EACCES, EROFS                       NBD_EPERM (writes to a read-only export: "it
                                           SHOULD return NBD_EPERM if it receives a write
                                           or trim request on a read-only export")
EIO                                        NBD_EIO
ENOMEM                                     NBD_ENOMEM
EINVAL                                     NBD_EINVAL
ENOSPC, EDQUOT, EFBIG                      NBD_ENOSPC ("SHOULD map the EDQUOT and EFBIG
                                           errors to NBD_ENOSPC")
EOVERFLOW                                  NBD_EOVERFLOW
ENOTSUP (= EOPNOTSUPP on Linux)            NBD_ENOTSUP
ESHUTDOWN                                  NBD_ESHUTDOWN
anything else, ENOMEDIUM included          NBD_EIO
=========================================  ==============================================

Unknown errnos become ``NBD_EIO``, not ``NBD_EINVAL``: they come from a device that failed a
request the protocol layer already found valid, so "invalid argument" would blame the client
for what is a device failure. ``ENOMEDIUM`` (no disc, tray open) is such a case: the same
request succeeds once a medium is inserted, and the spec tells clients to read an unexpected
value as ``NBD_EINVAL``, so passing 123 through would mislead them. Likewise ``ENOMEDIUM``'s
relatives (``ENXIO``, ``ENODEV``, ``ETIMEDOUT``, ``EBUSY``) are ``NBD_EIO``.

Callers should note the spec's other advice, which is theirs to follow: "The server SHOULD
NOT return NBD_ENOTSUP except ... in response to NBD_CMD_WRITE_ZEROES when
NBD_CMD_FLAG_FAST_ZERO is supported" and "SHOULD NOT return NBD_ENOMEM if at all possible".
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Mapping
from typing import Final

from blockd.nbd.constants import ErrorCode

__all__ = ["NbdProtocolError", "errno_to_nbd"]


class NbdProtocolError(Exception):
    """The peer broke a mandatory rule of the protocol; the connection must be dropped.

    The specification allows a hard disconnect here ("If either the client or the server
    detects a violation of a mandatory condition ('MUST' etc.) by the other party, it MAY
    initiate a hard disconnect"), and for a bad magic there is no way to resynchronise.
    """


_ERRNO_TO_NBD: Final[Mapping[int, ErrorCode]] = {
    _errno.EPERM: ErrorCode.EPERM,
    _errno.EACCES: ErrorCode.EPERM,
    _errno.EROFS: ErrorCode.EPERM,
    _errno.EIO: ErrorCode.EIO,
    _errno.ENOMEM: ErrorCode.ENOMEM,
    _errno.EINVAL: ErrorCode.EINVAL,
    _errno.ENOSPC: ErrorCode.ENOSPC,
    _errno.EDQUOT: ErrorCode.ENOSPC,
    _errno.EFBIG: ErrorCode.ENOSPC,
    _errno.EOVERFLOW: ErrorCode.EOVERFLOW,
    _errno.ENOTSUP: ErrorCode.ENOTSUP,
    _errno.EOPNOTSUPP: ErrorCode.ENOTSUP,
    _errno.ESHUTDOWN: ErrorCode.ESHUTDOWN,
}


def errno_to_nbd(err: int) -> ErrorCode:
    """The NBD error value for an errno (see the module's table); never 0.

    A non-positive ``err`` (``OSError.errno`` can be missing) is still an error, so it maps
    to ``NBD_EIO`` too: an error reply must carry a nonzero value.
    """
    return _ERRNO_TO_NBD.get(err, ErrorCode.EIO)
