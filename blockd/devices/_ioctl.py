"""ioctl request numbers and small typed wrappers around :func:`fcntl.ioctl`.

The numbers are computed the way Linux's ``asm-generic/ioctl.h`` lays them out
(direction, size, type and number packed into 32 bits), never pasted as hex;
``tests/unit/test_ioctl_numbers.py`` pins each one against the kernel headers.

The CD-ROM (``linux/cdrom.h``) and SCSI generic (``scsi/sg.h``) headers spell
their requests as bare numbers (``0x5309``, ``0x2285``) from before the
``_IO`` macros existed.  A bare number with no direction and no size is exactly
``_IO(type, nr)`` with the type in the high byte, so they are written that way
here.

Every wrapper raises :class:`OSError` carrying the errno the kernel returned.
"""

from __future__ import annotations

import fcntl
import struct

__all__ = [
    "BLKDISCARD",
    "BLKDISCARDZEROES",
    "BLKFLSBUF",
    "BLKGETSIZE64",
    "BLKIOMIN",
    "BLKIOOPT",
    "BLKPBSZGET",
    "BLKROGET",
    "BLKROTATIONAL",
    "BLKSECTGET",
    "BLKSSZGET",
    "BLKZEROOUT",
    "CDROMCLOSETRAY",
    "CDROMEJECT",
    "CDROM_CLEAR_OPTIONS",
    "CDROM_DRIVE_STATUS",
    "CDROM_LOCKDOOR",
    "CDROM_MEDIA_CHANGED",
    "CDROM_SET_OPTIONS",
    "SG_GET_SCSI_ID",
    "SG_GET_VERSION_NUM",
    "SG_IO",
    "ioctl_int",
    "ioctl_range",
    "ioctl_u64",
    "ioctl_value",
]

# Field widths and positions of asm-generic/ioctl.h (x86, arm, riscv, ...).
_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

_SIZEOF_SIZE_T = struct.calcsize("N")


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """Pack an ioctl request number; raise ValueError if a field does not fit."""
    for value, bits, name in (
        (direction, _IOC_DIRBITS, "direction"),
        (type_, _IOC_TYPEBITS, "type"),
        (nr, _IOC_NRBITS, "nr"),
        (size, _IOC_SIZEBITS, "size"),
    ):
        if not 0 <= value < (1 << bits):
            raise ValueError(f"ioctl {name} {value} does not fit in {bits} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    """A request that moves no data through its argument."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    """A request where the kernel writes ``size`` bytes to user space."""
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    """A request where the kernel reads ``size`` bytes from user space."""
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:
    """A request that moves ``size`` bytes both ways."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


# linux/fs.h, block device requests (type 0x12).  Several of them really pass a
# pointer although the header declares them with _IO; the numbers must match
# the header, not the argument.
BLKROGET = _IO(0x12, 94)  # int *: 1 if the device is read-only
BLKFLSBUF = _IO(0x12, 97)  # flush and invalidate the buffer cache
BLKSSZGET = _IO(0x12, 104)  # int *: logical block size
BLKSECTGET = _IO(0x12, 103)  # int *: max transfer (sectors on block nodes, bytes on /dev/sg)
BLKGETSIZE64 = _IOR(0x12, 114, _SIZEOF_SIZE_T)  # u64 *: size in bytes
BLKDISCARD = _IO(0x12, 119)  # u64[2] {start, length}
BLKIOMIN = _IO(0x12, 120)  # unsigned int *: minimum I/O size
BLKIOOPT = _IO(0x12, 121)  # unsigned int *: optimal I/O size
BLKPBSZGET = _IO(0x12, 123)  # unsigned int *: physical block size
BLKDISCARDZEROES = _IO(0x12, 124)  # unsigned int *: always 0 on current kernels
BLKROTATIONAL = _IO(0x12, 126)  # unsigned short *: 1 for spinning media
BLKZEROOUT = _IO(0x12, 127)  # u64[2] {start, length}

# linux/cdrom.h (bare numbers in the header, type 'S' = 0x53).
CDROMEJECT = _IO(0x53, 0x09)
CDROMCLOSETRAY = _IO(0x53, 0x19)
CDROM_SET_OPTIONS = _IO(0x53, 0x20)
CDROM_CLEAR_OPTIONS = _IO(0x53, 0x21)
CDROM_MEDIA_CHANGED = _IO(0x53, 0x25)
CDROM_DRIVE_STATUS = _IO(0x53, 0x26)
CDROM_LOCKDOOR = _IO(0x53, 0x29)

# scsi/sg.h (bare numbers in the header, type 0x22).
SG_GET_SCSI_ID = _IO(0x22, 0x76)
SG_GET_VERSION_NUM = _IO(0x22, 0x82)
SG_IO = _IO(0x22, 0x85)


def ioctl_u64(fd: int, request: int) -> int:
    """Run a request whose argument points to a u64 the kernel fills in; return it."""
    buf = bytearray(8)
    fcntl.ioctl(fd, request, buf, True)
    value: int = struct.unpack("=Q", buf)[0]
    return value


def ioctl_int(fd: int, request: int) -> int:
    """Run a request whose argument points to an int the kernel fills in; return it."""
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf, True)
    value: int = struct.unpack("=i", buf)[0]
    return value


def ioctl_range(fd: int, request: int, start: int, length: int) -> None:
    """Run a request taking a ``u64[2] {start, length}`` byte range (BLKDISCARD, BLKZEROOUT)."""
    if start < 0 or length < 0:
        raise ValueError(f"negative range start={start} length={length}")
    fcntl.ioctl(fd, request, struct.pack("=QQ", start, length))


def ioctl_value(fd: int, request: int, arg: int = 0) -> int:
    """Run a request whose argument is a plain integer; return the ioctl's return value.

    Some drivers report through the return value (CDROM_DRIVE_STATUS) and some
    report failure as a positive value rather than an errno; callers check it.
    """
    return fcntl.ioctl(fd, request, arg)
