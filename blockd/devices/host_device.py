"""The ``host_device`` driver: a host block or character device (file-posix ``host_device``).

Opening, reading, writing and flushing come from
:class:`~blockd.devices.posix.PosixDriver`; this module adds the block-device
side, through ioctls:

* block **or** character devices only (``'host_device' driver requires 'X' to
  be either a character or block device``, InvalidArgument);
* size from BLKGETSIZE64 (``lseek`` to the end for character devices), logical
  and physical block sizes from BLKSSZGET / BLKPBSZGET;
* a device the kernel marks read-only (BLKROGET, e.g. ``losetup -r``) opened
  for writing fails with ``The device is not writable: Permission denied``
  (ReadOnly, errno EACCES) unless ``auto-read-only`` lets it fall back to
  read-only;
* discard (with ``discard=unmap``) is BLKDISCARD on the whole logical blocks
  inside the range (a device that cannot discard makes it a no-op);
* write-zeroes is BLKZEROOUT on the whole blocks, the unaligned edges written
  as zeroes; a device that refuses BLKZEROOUT (EOPNOTSUPP, EINVAL) is zeroed
  by writing from then on;
* with ``cache.direct`` requests are aligned to the logical block size and
  buffers to ``max(logical block size, 512)``; unaligned callers are bounced.

Raises what PosixDriver raises, plus :class:`OSError` from the ioctls.
"""

from __future__ import annotations

import os
import stat

from blockd.devices._aligned_io import Alignment
from blockd.devices._ioctl import (
    BLKDISCARD,
    BLKGETSIZE64,
    BLKPBSZGET,
    BLKROGET,
    BLKSSZGET,
    BLKZEROOUT,
    ioctl_int,
    ioctl_range,
    ioctl_u64,
)
from blockd.devices.posix import PosixDriver, probe_direct_alignment
from blockd.errors import InvalidArgument

__all__ = ["HostDeviceDriver"]


def _is_device(st: os.stat_result) -> bool:
    return stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)


class HostDeviceDriver(PosixDriver):
    """A node backed by a host block device (or a character device such as /dev/sg*)."""

    format_name = "host_device"

    def _setup(self, fd: int) -> None:
        """Learn the sector sizes (512 for character devices, which have none)."""
        self.is_block = stat.S_ISBLK(os.fstat(fd).st_mode)
        if self.is_block:
            self.logical_block_size = ioctl_int(fd, BLKSSZGET)
            try:
                self.physical_block_size = ioctl_int(fd, BLKPBSZGET)
            except OSError:
                self.physical_block_size = self.logical_block_size
        else:
            self.logical_block_size = self.physical_block_size = 512

    @classmethod
    def _check_type(cls, filename: str, st: os.stat_result) -> None:
        if not _is_device(st):
            raise InvalidArgument(
                f"'{cls.format_name}' driver requires '{filename}' to be either "
                "a character or block device"
            )

    @classmethod
    def _medium_read_only(cls, fd: int, st: os.stat_result) -> bool:
        # open(2) with O_RDWR succeeds on a read-only block device; writes then
        # fail with EPERM.  Ask the kernel instead.
        return stat.S_ISBLK(st.st_mode) and ioctl_int(fd, BLKROGET) != 0

    @classmethod
    def _alignment(cls, fd: int, st: os.stat_result, direct: bool) -> Alignment:
        if not direct:
            return Alignment()
        if not stat.S_ISBLK(st.st_mode):
            return probe_direct_alignment(fd)
        logical = ioctl_int(fd, BLKSSZGET)
        return Alignment(request=logical, memory=max(logical, 512))

    @classmethod
    def probe_device(cls, filename: str) -> int:
        """100 for a block or character device; 50 under /dev/cdrom (host_cdrom fits better)."""
        if filename.startswith("/dev/cdrom"):
            return 50
        try:
            return 100 if _is_device(os.stat(filename)) else 0
        except OSError:
            return 0

    def getlength(self) -> int:
        if self.is_block:
            return ioctl_u64(self.fd, BLKGETSIZE64)
        return os.lseek(self.fd, 0, os.SEEK_END)

    def _logical_block_size(self) -> int:
        return self.logical_block_size

    def _physical_block_size(self) -> int:
        return self.physical_block_size

    def _inner_blocks(self, offset: int, length: int) -> tuple[int, int]:
        """The whole logical blocks inside ``[offset, offset + length)`` as (start, end)."""
        block = self.logical_block_size
        start = -(-offset // block) * block
        end = (offset + length) // block * block
        return start, max(start, end)

    def _discard(self, offset: int, length: int) -> None:
        start, end = self._inner_blocks(offset, length)
        if end > start:
            ioctl_range(self.fd, BLKDISCARD, start, end - start)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> bool:
        if not self._zero_supported:
            return False
        start, end = self._inner_blocks(offset, length)
        if end == start:
            return False
        # BLKZEROOUT lets the device unmap if it can; it also drops the page cache
        # of the range, so buffered readers see the zeroes.
        ioctl_range(self.fd, BLKZEROOUT, start, end - start)
        if start > offset:
            self._write_zero_buffers(offset, start - offset)
        if offset + length > end:
            self._write_zero_buffers(end, offset + length - end)
        return True
