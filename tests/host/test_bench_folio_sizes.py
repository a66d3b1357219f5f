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


def most(cached: int, *, of: int) -> bool:
    """All of ``of`` bytes cached, but for a few pages the kernel may have evicted again.

    The standard VM runs DAMON's pageout scheme, and udev's change event after
    losetup can drop a device's cache; either takes a few pages at any time.  Never
    more than ``of``: a folio counted twice shows.
    """
    return 0.9 * of <= cached <= of


@pytest.fixture
def dropped(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB file on the disk's file system with none of it in the page cache."""
    if os.geteuid() != 0:
        pytest.skip("needs root: frame numbers in /proc/self/pagemap")
    path = Path("/var/tmp") / f"blockd-folios-{os.getpid()}-{tmp_path.name}.img"
    try:
        path.write_bytes(os.urandom(64 * MiB))
        drop_cache(path)
        yield path
    finally:
        path.unlink(missing_ok=True)


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
    cached = fs.folio_sizes(str(dropped))
    assert set(cached) == {PAGE} and most(cached[PAGE] * PAGE, of=4 * MiB), cached


def test_every_cached_byte_is_counted_once(dropped: Path) -> None:
    # Read whole, in bulk: readahead may build bigger folios, never beyond the end.
    dropped.read_bytes()
    cached = fs.folio_sizes(str(dropped))
    assert most(fs.cached_bytes(cached), of=64 * MiB), cached
    assert all(size % PAGE == 0 and (size // PAGE) & (size // PAGE - 1) == 0
               for size in cached), cached  # folios are powers of two pages
    print(f"after reading it whole: {fs.describe(cached)}")


def test_a_partial_last_page_counts_as_a_page(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: /proc/kpageflags")
    path = Path("/var/tmp") / f"blockd-folios-{os.getpid()}-{tmp_path.name}-tail.img"
    try:
        path.write_bytes(b"x" * (3 * PAGE + 100))  # written, so all of it is cached
        cached = fs.folio_sizes(str(path))
        assert fs.cached_bytes(cached) == 4 * PAGE, cached
    finally:
        path.unlink(missing_ok=True)


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
        paged = fs.folio_sizes(dev)
        assert set(paged) == {PAGE} and most(paged[PAGE] * PAGE, of=32 * MiB), paged
        os.posix_fadvise(holder, 0, 0, os.POSIX_FADV_DONTNEED)
        nb.prewarm_for("loop")(dev)
        bulk = fs.folio_sizes(dev)
        assert most(fs.cached_bytes(bulk), of=32 * MiB), bulk
        print(f"read-warmed in bulk: {fs.describe(bulk)}")
    finally:
        os.close(holder)


def test_huge_pages_are_counted_as_one_folio_each(tmp_path: Path) -> None:
    """tmpfs with huge=always caches a written file in 2 MiB folios: a head and 511 tails."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mount, /proc/kpageflags")
    if not Path("/sys/kernel/mm/transparent_hugepage").exists():
        pytest.skip("this kernel has no transparent huge pages")
    mountpoint = tmp_path / "huge"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16M,huge=always", "none",
                    str(mountpoint)], check=True)
    try:
        (mountpoint / "f").write_bytes(os.urandom(8 * MiB))
        assert fs.folio_sizes(str(mountpoint / "f")) == {2 * MiB: 4}
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)
