#!/usr/bin/env python3
"""How the page cache holds a file or block device: how many folios of each size.

Why it matters to the benchmark: a 4 KiB buffered write into a block device walks
the buffer heads of the whole folio it lands in, so on a device whose cache was
warmed by large reads (readahead builds folios of up to 2 MiB) each write costs the
kernel tens of microseconds, whichever server issues it; on a cache of 4 KiB folios
a few.  ``nbd_bench.py`` logs this histogram for its loop backing after the pre-warm.

How: the cached pages are mapped (``mmap`` + ``mincore``, no I/O: uncached pages
are left alone), their frame numbers read from ``/proc/self/pagemap``, and each
frame's ``KPF_COMPOUND_TAIL`` flag from ``/proc/kpageflags``: a folio is a head
page and the tail pages after it.  Both files need root for frame numbers; without
them :func:`folio_sizes` raises PermissionError.  Run as::

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

__all__ = ["describe", "folio_sizes"]

_PAGE = mmap.PAGESIZE
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1
_KPF_COMPOUND_TAIL = 1 << 16
_PROT_READ = 1
_MAP_SHARED = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def folio_sizes(path: str) -> collections.Counter[int]:
    """Folio size in bytes -> how many folios of that size hold ``path``'s cached pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        pages = size // _PAGE
        if not pages:
            return collections.Counter()
        addr = _libc.mmap(None, pages * _PAGE, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            return _count(addr, pages)
        finally:
            _libc.munmap(addr, pages * _PAGE)
    finally:
        os.close(fd)


def _count(addr: int, pages: int) -> collections.Counter[int]:
    cached = (ctypes.c_ubyte * pages)()
    if _libc.mincore(addr, pages * _PAGE, cached) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    for i in range(pages):
        if cached[i] & 1:
            _ = ctypes.c_ubyte.from_address(addr + i * _PAGE).value  # a read maps the page
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        pagemap.seek(addr // _PAGE * 8)
        entries = struct.unpack(f"{pages}Q", pagemap.read(pages * 8))
    if any(e & _PRESENT and not e & _PFN_MASK for e in entries):
        raise PermissionError("frame numbers are hidden: run as root")
    sizes: collections.Counter[int] = collections.Counter()
    run = 0  # pages of the folio being counted
    with open("/proc/kpageflags", "rb", buffering=0) as kpageflags:
        for entry in entries:
            tail = False
            if entry & _PRESENT:
                kpageflags.seek((entry & _PFN_MASK) * 8)
                tail = bool(struct.unpack("Q", kpageflags.read(8))[0] & _KPF_COMPOUND_TAIL)
            if run and not tail:
                sizes[run * _PAGE] += 1
                run = 0
            if entry & _PRESENT:
                run += 1
    if run:
        sizes[run * _PAGE] += 1
    return sizes


def describe(sizes: collections.Counter[int]) -> str:
    """One line: '4 KiB: 1092, 2048 KiB: 201 (1024 MiB cached)'."""
    if not sizes:
        return "nothing cached"
    cached = sum(size * count for size, count in sizes.items())
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
