"""QEMU's image locks: open-file-description locks on the bytes QEMU's file driver uses.

QEMU (and qemu-storage-daemon, qemu-img, qemu-io) say which permissions a user of an
image holds and which it does not share with locks on single bytes of the image
file (``block/file-posix.c``): byte ``100 + n`` is read-locked while permission ``n``
is held, byte ``200 + n`` while permission ``n`` is *not* shared.  Taking a
permission conflicts with anyone not sharing it; not sharing one conflicts with
anyone holding it.  Taking the same locks lets blockd share an image with QEMU
exactly as two QEMU processes do: a guest (which does not share "write") and a
writable blockd export refuse each other, two daemons that share everything do
not.  The permissions are QEMU 7.2's; their names appear in the error texts.

OFD locks (``F_OFD_SETLK``) belong to the open file description, so a second
descriptor, even in this process, conflicts like another program, and closing
the descriptor drops them.  A file system without OFD locks makes
:func:`supported` false; ``locking=auto`` then goes without (and says so).
"""

from __future__ import annotations

import errno
import fcntl
import struct

from blockd.devices.base import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
)
from blockd.errors import Locked

__all__ = [
    "ALL",
    "CONSISTENT_READ",
    "PERM_NAMES",
    "RESIZE",
    "WRITE",
    "WRITE_UNCHANGED",
    "apply",
    "check",
    "supported",
]

CONSISTENT_READ, WRITE = PERM_CONSISTENT_READ, PERM_WRITE
WRITE_UNCHANGED, RESIZE, ALL = PERM_WRITE_UNCHANGED, PERM_RESIZE, PERM_ALL
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
PERM_BASE = 100
SHARED_BASE = 200

# struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t),
# l_pid (pid_t, 0 for OFD locks), padding.
_FLOCK = struct.Struct("hhxxxxqqixxxx")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _flock(fd: int, command: int, kind: int, offset: int) -> int:
    """One fcntl lock call on a single byte; the ``l_type`` it returns."""
    out = fcntl.fcntl(fd, command, _FLOCK.pack(kind, 0, offset, 1, 0))
    return int(_FLOCK.unpack(out)[0])


def supported(fd: int) -> bool:
    """Whether ``fd``'s file system takes OFD locks."""
    try:
        _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, PERM_BASE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.ENOLCK, errno.EOPNOTSUPP):
            return False
        raise
    return True


def _taken(fd: int, offset: int) -> bool:
    """Whether another open file description holds a lock on byte ``offset``."""
    return _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK


def check(fd: int, perm: int, shared: int) -> None:
    """Raise Locked (QEMU's text) if another user conflicts with holding ``perm`` while
    sharing only ``shared``."""
    for n, name in enumerate(PERM_NAMES):
        bit = 1 << n
        if perm & bit and _taken(fd, SHARED_BASE + n):
            raise Locked(f'Failed to get "{name}" lock')
        if not shared & bit and _taken(fd, PERM_BASE + n):
            raise Locked(f'Failed to get shared "{name}" lock')


def apply(fd: int, perm: int, shared: int) -> None:
    """Hold the bytes for ``perm`` and for what is not ``shared``; release the others."""
    for n in range(len(PERM_NAMES)):
        bit = 1 << n
        for offset, lock in ((PERM_BASE + n, perm & bit), (SHARED_BASE + n, not shared & bit)):
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK if lock else fcntl.F_UNLCK, offset)
