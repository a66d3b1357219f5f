#!/usr/bin/env python3
"""How the page cache holds a file or block device: how many folios of each size.

Why it matters to the benchmark: a 4 KiB buffered write into a block device walks
the buffer heads of the whole folio it lands in, so on a device whose cache was
warmed by large reads (readahead builds folios of up to 2 MiB) each write costs the
kernel tens of microseconds, whichever server issues it; on a cache of 4 KiB folios
a few.  ``nbd_bench.py`` logs this histogram for its loop backing after the pre-warm.

How: the file is mapped with ``MADV_RANDOM`` (touching a page then starts no
readahead), only the pages ``mincore`` finds cached are touched, their frame
numbers are read from ``/proc/self/pagemap`` and each frame's ``KPF_COMPOUND_TAIL``
flag from ``/proc/kpageflags``: a folio is a head page and the tail pages after it.
A page evicted between ``mincore`` and the touch is read back in, alone.
``/proc/kpageflags`` needs root and frame numbers ``CAP_SYS_ADMIN``; without them
:func:`folio_sizes` raises PermissionError.  A block device nobody holds open has
no cache to count (the kernel drops it at the last close).  Run as::

    sudo .venv/bin/python bench/folio_sizes.py /dev/loop0
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import mmap
import os
import struct
import sys
from collections.abc import Mapping

__all__ = ["cached_bytes", "describe", "folio_sizes"]

_PAGE = mmap.PAGESIZE
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1
_KPF_COMPOUND_TAIL = 1 << 16
_PROT_READ = 1
_MAP_SHARED = 1
_MADV_RANDOM = 1
_MADV_DONTNEED = 4
_CHUNK = 1 << 16  # pages looked at at once

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def folio_sizes(path: str) -> collections.Counter[int]:
    """Folio size in bytes -> how many folios of that size hold ``path``'s cached pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        pages = -(-size // _PAGE)  # a partial last page is cached as a whole one
        if not pages:
            return collections.Counter()
        addr = _libc.mmap(None, pages * _PAGE, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            if _libc.madvise(addr, pages * _PAGE, _MADV_RANDOM) != 0:
                raise OSError(ctypes.get_errno(), "madvise")
            return _count(addr, pages)
        finally:
            _libc.munmap(addr, pages * _PAGE)
    finally:
        os.close(fd)


def _count(addr: int, pages: int) -> collections.Counter[int]:
    sizes: collections.Counter[int] = collections.Counter()
    run = 0  # pages of the folio being counted (it may go on into the next chunk)
    pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        kpageflags = os.open("/proc/kpageflags", os.O_RDONLY)
        try:
            for first in range(0, pages, _CHUNK):
                count = min(_CHUNK, pages - first)
                for tail in _tails(addr + first * _PAGE, count, pagemap, kpageflags):
                    if run and not tail:
                        sizes[run * _PAGE] += 1
                        run = 0
                    if tail is not None:
                        run += 1
        finally:
            os.close(kpageflags)
    finally:
        os.close(pagemap)
    if run:
        sizes[run * _PAGE] += 1
    return sizes


def _tails(addr: int, count: int, pagemap: int, kpageflags: int) -> list[bool | None]:
    """For each page of a chunk: None if not cached, else whether it is a folio's tail.

    The chunk's cached pages are mapped while their frames are looked up, then
    unmapped again (``MADV_DONTNEED`` on a file mapping drops the page tables, not
    the cache), so a large device needs no more than a chunk's page tables at once.
    """
    cached = (ctypes.c_ubyte * count)()
    if _libc.mincore(addr, count * _PAGE, cached) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    try:
        for i in range(count):
            if cached[i] & 1:
                _ = ctypes.c_ubyte.from_address(addr + i * _PAGE).value  # a read maps it
        raw = os.pread(pagemap, count * 8, addr // _PAGE * 8)
        if len(raw) != count * 8:
            raise OSError(f"short read of /proc/self/pagemap: {len(raw)} of {count * 8}")
        entries = struct.unpack(f"{count}Q", raw)
        if any(e & _PRESENT and not e & _PFN_MASK for e in entries):
            raise PermissionError("frame numbers are hidden: needs CAP_SYS_ADMIN")
        # While the pages are still mapped: their frames cannot change hands meanwhile.
        return [bool(_flags(kpageflags, e & _PFN_MASK) & _KPF_COMPOUND_TAIL)
                if e & _PRESENT else None for e in entries]
    finally:
        _libc.madvise(addr, count * _PAGE, _MADV_DONTNEED)


def _flags(kpageflags: int, pfn: int) -> int:
    raw = os.pread(kpageflags, 8, pfn * 8)
    if len(raw) != 8:
        raise OSError(f"no flags for frame {pfn} in /proc/kpageflags")
    return int.from_bytes(raw, "little")


def cached_bytes(sizes: Mapping[int, int]) -> int:
    """What the folios of a :func:`folio_sizes` count hold together."""
    return sum(size * count for size, count in sizes.items())


def describe(sizes: Mapping[int, int]) -> str:
    """One line: '4 KiB: 1092, 2048 KiB: 201 (1024 MiB cached)'."""
    if not sizes:
        return "nothing cached"
    cached = cached_bytes(sizes)
    parts = ", ".join(f"{size // 1024} KiB: {count}" for size, count in sorted(sizes.items()))
    return f"{parts} ({cached / (1 << 20):.0f} MiB cached)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("paths", nargs="+", help="files or block devices")
    ns = parser.parse_args(argv)
    for path in ns.paths:
        print(f"{path}: {describe(folio_sizes(path))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
