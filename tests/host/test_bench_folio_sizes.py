"""bench/folio_sizes.py counts the page cache's folios of a real file (root: kpageflags)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import benchscripts
import pytest
from conftest import LoopFactory, drop_cache

fs = benchscripts.load("folio_sizes")

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


@pytest.fixture
def dropped(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB file on the disk's file system with none of it in the page cache."""
    if os.geteuid() != 0:
        pytest.skip("needs root: frame numbers in /proc/self/pagemap")
    path = Path("/var/tmp") / f"blockd-folios-{os.getpid()}-{tmp_path.name}.img"
    path.write_bytes(os.urandom(64 * MiB))
    drop_cache(path)
    yield path
    path.unlink()


def test_pages_read_one_at_a_time_are_single_page_folios(dropped: Path) -> None:
    # FADV_RANDOM turns readahead off, so each read caches exactly its own page.
    assert fs.folio_sizes(str(dropped)) == {}
    fd = os.open(dropped, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        for offset in range(8 * MiB, 12 * MiB, PAGE):
            os.pread(fd, 1, offset)
    finally:
        os.close(fd)
    assert fs.folio_sizes(str(dropped)) == {PAGE: 4 * MiB // PAGE}


def test_every_cached_byte_is_counted_once(dropped: Path) -> None:
    fd = os.open(dropped, os.O_RDONLY)
    try:
        os.pread(fd, 16 * MiB, 16 * MiB)  # readahead may cache more, and in bigger folios
        cached = fs.folio_sizes(str(dropped))
    finally:
        os.close(fd)
    total = sum(size * count for size, count in cached.items())
    assert 16 * MiB <= total <= 64 * MiB, cached
    assert all(size % PAGE == 0 and (size // PAGE) & (size // PAGE - 1) == 0
               for size in cached), cached  # folios are powers of two pages
    print(f"after a 16 MiB read: {fs.describe(cached)}")


def test_describe_says_sizes_counts_and_total() -> None:
    assert fs.describe({4096: 3, 2 * MiB: 1}) == "4 KiB: 3, 2048 KiB: 1 (2 MiB cached)"
    assert fs.describe({}) == "nothing cached"


def test_the_loop4k_backing_is_warmed_in_single_page_folios(loop_device: LoopFactory) -> None:
    """The benchmark's two loop backings: read-warmed in bulk, or page by page."""
    nb = benchscripts.load("nbd_bench")
    dev = str(loop_device(size=32 * MiB))
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle"], check=False)  # udev's probe reads first
    holder = os.open(dev, os.O_RDONLY)  # the cache lives while the device is open
    try:
        nb.prewarm_for("loop4k")(dev)
        assert fs.folio_sizes(dev) == {PAGE: 32 * MiB // PAGE}
        os.posix_fadvise(holder, 0, 0, os.POSIX_FADV_DONTNEED)
        nb.prewarm_for("loop")(dev)
        bulk = fs.folio_sizes(dev)
        assert sum(size * count for size, count in bulk.items()) == 32 * MiB, bulk
        print(f"read-warmed in bulk: {fs.describe(bulk)}")
    finally:
        os.close(holder)
