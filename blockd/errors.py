"""The exception hierarchy shared by every layer.

Everything blockd raises on purpose derives from :class:`BlockdError`, which
carries an ``errno`` (so the NBD layer can pick a wire error code) and a message
written for the person at the other end.  Where QEMU has a command, the message
is QEMU's text, so the QMP layer can pass it through unchanged.

::

    BlockdError (errno EIO)
     +-- InvalidArgument   (EINVAL)  bad option values, bad names
     +-- NotFound          (ENOENT)  unknown node, export, ...
     |    +-- DeviceNotFound         unknown device (QMP class DeviceNotFound)
     +-- InUse             (EBUSY)   node attached, duplicate name
     +-- Locked            (EBUSY)   medium locked
     +-- NoMedium          (ENOMEDIUM)
     +-- ReadOnly          (EROFS)
     +-- Unsupported       (ENOTSUP)
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "BlockdError",
    "DeviceNotFound",
    "InUse",
    "InvalidArgument",
    "Locked",
    "NoMedium",
    "NotFound",
    "ReadOnly",
    "Unsupported",
]


class BlockdError(Exception):
    """Root of blockd's errors: a human message plus the errno that best describes it."""

    default_errno = _errno.EIO

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errno = self.default_errno if errno is None else errno


class InvalidArgument(BlockdError):
    default_errno = _errno.EINVAL


class NotFound(BlockdError):
    default_errno = _errno.ENOENT


class DeviceNotFound(NotFound):
    """A device (QMP id or legacy device name) that does not exist."""


class InUse(BlockdError):
    default_errno = _errno.EBUSY


class Locked(BlockdError):
    default_errno = _errno.EBUSY


class NoMedium(BlockdError):
    default_errno = _errno.ENOMEDIUM


class ReadOnly(BlockdError):
    default_errno = _errno.EROFS


class Unsupported(BlockdError):
    default_errno = _errno.ENOTSUP
