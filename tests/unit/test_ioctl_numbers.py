"""The computed ioctl numbers equal the kernel headers' values; the helpers report errno."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blockd.devices import _ioctl
from blockd.devices._ioctl import _IO, _IOC, _IOR, _IOW, _IOWR

# Values from linux/fs.h, linux/cdrom.h and scsi/sg.h (x86-64 / asm-generic layout).
EXPECTED = {
    "BLKROGET": 0x125E,
    "BLKFLSBUF": 0x1261,
    "BLKSSZGET": 0x1268,
    "BLKGETSIZE64": 0x80081272,
    "BLKDISCARD": 0x1277,
    "BLKIOMIN": 0x1278,
    "BLKIOOPT": 0x1279,
    "BLKPBSZGET": 0x127B,
    "BLKDISCARDZEROES": 0x127C,
    "BLKROTATIONAL": 0x127E,
    "BLKZEROOUT": 0x127F,
    "CDROMEJECT": 0x5309,
    "CDROMCLOSETRAY": 0x5319,
    "CDROM_SET_OPTIONS": 0x5320,
    "CDROM_CLEAR_OPTIONS": 0x5321,
    "CDROM_MEDIA_CHANGED": 0x5325,
    "CDROM_DRIVE_STATUS": 0x5326,
    "CDROM_LOCKDOOR": 0x5329,
    "SG_GET_SCSI_ID": 0x2276,
    "SG_GET_VERSION_NUM": 0x2282,
    "SG_IO": 0x2285,
    "BLKSECTGET": 0x1267,
}


@pytest.mark.parametrize(("name", "value"), sorted(EXPECTED.items()))
def test_request_number_matches_kernel_header(name: str, value: int) -> None:
    assert getattr(_ioctl, name) == value, f"{name} = {getattr(_ioctl, name):#x}"


def test_every_request_number_is_pinned() -> None:
    exported = {n for n in _ioctl.__all__ if n.isupper()}
    assert exported == set(EXPECTED)


def test_ioc_layout_of_well_known_requests() -> None:
    # Independent examples from other headers: FS_IOC_GETFLAGS = _IOR('f', 1, long),
    # FIFREEZE = _IOWR('X', 119, int), FS_IOC_SETVERSION = _IOW('v', 2, long).
    assert _IOR(ord("f"), 1, 8) == 0x80086601
    assert _IOWR(ord("X"), 119, 4) == 0xC0045877
    assert _IOW(ord("v"), 2, 8) == 0x40087602
    assert _IO(0x12, 95) == 0x125F  # BLKRRPART
    assert _IOC(3, 0xFF, 0xFF, (1 << 14) - 1) == 0xFFFFFFFF


@pytest.mark.parametrize(
    "args",
    [(4, 0x12, 1, 0), (0, 0x100, 1, 0), (0, 0x12, 0x100, 0), (2, 0x12, 1, 1 << 14), (0, -1, 0, 0)],
)
def test_ioc_rejects_fields_that_do_not_fit(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        _IOC(*args)


def test_helpers_raise_oserror_with_errno(tmp_path: Path) -> None:
    path = tmp_path / "plain"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        # A regular file has no block-device ioctls: the kernel says ENOTTY.
        for call in (
            lambda: _ioctl.ioctl_u64(fd, _ioctl.BLKGETSIZE64),
            lambda: _ioctl.ioctl_int(fd, _ioctl.BLKSSZGET),
            lambda: _ioctl.ioctl_range(fd, _ioctl.BLKDISCARD, 0, 4096),
            lambda: _ioctl.ioctl_value(fd, _ioctl.CDROM_DRIVE_STATUS, 0),
        ):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


def test_ioctl_range_rejects_negative_values() -> None:
    with pytest.raises(ValueError):
        _ioctl.ioctl_range(0, _ioctl.BLKDISCARD, -1, 10)
