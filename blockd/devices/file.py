"""The ``file`` driver: a regular file as a block device (QEMU's file-posix ``file``).

Opening, reading, writing and flushing come from
:class:`~blockd.devices.posix.PosixDriver`; this module adds what is special
about regular files:

* only regular files are taken (``'file' driver requires 'X' to be a regular
  file``, InvalidArgument);
* the size is the file size (``fstat``), the allocated size ``st_blocks * 512``;
* discard (with ``discard=unmap``) punches a hole, keeping the size;
* write-zeroes punches a hole when unmapping is allowed, else uses
  ``FALLOC_FL_ZERO_RANGE``, and falls back to writing zeroes where the
  filesystem has neither (tmpfs has no ZERO_RANGE);
* with ``cache.direct`` the O_DIRECT alignment is probed with reads, as QEMU
  does (see :func:`~blockd.devices.posix.probe_direct_alignment`); a
  filesystem without O_DIRECT fails the open with ``Could not open 'X':
  filesystem does not support O_DIRECT``.

Raises what PosixDriver raises (see there).
"""

from __future__ import annotations

import errno
import os
import stat

from blockd.devices.base import EXTENT_HOLE, EXTENT_ZERO
from blockd.devices.posix import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    UNSUPPORTED_ERRNOS,
    PosixDriver,
    fallocate,
)
from blockd.errors import InvalidArgument

__all__ = ["FileDriver"]


class FileDriver(PosixDriver):
    """A node backed by a regular file."""

    format_name = "file"
    _regular_file = True

    @classmethod
    def _check_type(cls, filename: str, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(
                f"'{cls.format_name}' driver requires '{filename}' to be a regular file"
            )

    @classmethod
    def probe_device(cls, filename: str) -> int:
        """1 for an existing regular file (the fallback every path may use), else 0."""
        try:
            return 1 if stat.S_ISREG(os.stat(filename).st_mode) else 0
        except OSError:
            return 0

    def getlength(self) -> int:
        return os.fstat(self.fd).st_size

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Data and holes from SEEK_DATA/SEEK_HOLE (holes read as zeroes)."""
        end = min(offset + length, self.getlength())
        extents: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise
                data = end
            if data > pos:
                hole_end = min(data, end)
                extents.append((hole_end - pos, EXTENT_HOLE | EXTENT_ZERO))
                pos = hole_end
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            extents.append((hole - pos, 0))
            pos = hole
        return extents

    def _discard(self, offset: int, length: int) -> None:
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> bool:
        if unmap and offset + length <= self.getlength():
            # A punched hole in a regular file reads back as zeroes.
            try:
                self._discard(offset, length)
                return True
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise
                self._discard_supported = False
        if not self._zero_supported:
            return False
        # Without KEEP_SIZE, zeroing past the end grows the file like a write would.
        fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
        return True
