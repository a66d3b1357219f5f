"""Shared fixtures for host tests: real loop devices over sparse images.

``loop_device(size=..., sector_size=..., read_only=...)`` creates a sparse image
in ``tmp_path``, attaches it with ``losetup`` and returns a :class:`LoopDevice`
(``str()``/``os.fspath()`` give the /dev/loopN path).  Every device a test
attached is detached when the test ends, whatever happened.  Tests skip only
when not root or when ``losetup`` is missing, saying which.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True, slots=True)
class LoopDevice:
    """An attached loop device and the image file behind it."""

    path: str
    image: Path

    def __fspath__(self) -> str:
        return self.path

    def __str__(self) -> str:
        return self.path

    @property
    def sysfs(self) -> Path:
        """/sys/block/loopN, for reading the kernel's own view of the device."""
        return Path("/sys/block") / os.path.basename(self.path)


LoopFactory = Callable[..., LoopDevice]


def drop_cache(path: Path) -> None:
    """Write back ``path`` and drop its pages from the page cache: its next reads go to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _detach(path: str) -> None:
    for attempt in range(50):
        result = subprocess.run(["losetup", "-d", path], capture_output=True, text=True)
        if result.returncode == 0:
            return
        if attempt == 49:
            raise RuntimeError(f"cannot detach {path}: {result.stderr.strip()}")
        time.sleep(0.1)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[LoopFactory]:
    """Factory for loop devices, all detached at teardown."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    attached: list[str] = []

    def attach(
        size: int = 64 << 20,
        *,
        sector_size: int = 512,
        read_only: bool = False,
        name: str | None = None,
    ) -> LoopDevice:
        image = tmp_path / (name or f"loop{len(attached)}.img")
        with open(image, "wb") as f:
            f.truncate(size)
        cmd = ["losetup", "-f", "--show", "--sector-size", str(sector_size)]
        if read_only:
            cmd.append("-r")
        cmd.append(str(image))
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode:
            raise RuntimeError(f"losetup failed: {result.stderr.strip()}")
        path = result.stdout.strip()
        attached.append(path)
        return LoopDevice(path=path, image=image)

    try:
        yield attach
    finally:
        for path in reversed(attached):
            _detach(path)


@dataclass
class FailingFile:
    """A file whose reads and writes fail with a real EIO from the kernel while ``failing``.

    nbdkit's memory plugin behind its error filter, mounted as a file with
    nbdfuse: the kernel's FUSE layer returns EIO to the reader when nbdkit
    injects the error, which it does while the trigger file exists.
    """

    path: Path
    trigger: Path

    def fail(self, on: bool = True) -> None:
        if on:
            self.trigger.touch()
        else:
            self.trigger.unlink(missing_ok=True)


@pytest.fixture
def failing_file(tmp_path: Path) -> Iterator[FailingFile]:
    """A 16 MiB FUSE file that returns EIO on demand (needs root, nbdkit and nbdfuse)."""
    if os.geteuid() != 0:
        pytest.skip("FUSE mounts need root")
    for tool in ("nbdkit", "nbdfuse"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian packages nbdkit, libnbd-bin)")
    mountpoint = tmp_path / "fuse"
    mountpoint.mkdir()
    trigger = tmp_path / "inject-eio"
    proc = subprocess.Popen(
        ["nbdfuse", str(mountpoint / "disk"), "--command", "nbdkit", "-s", "--filter=error",
         "memory", "size=16M", "error-rate=100%", f"error-file={trigger}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = mountpoint / "disk"
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("nbdfuse did not mount")
        time.sleep(0.05)
    try:
        yield FailingFile(path, trigger)
    finally:
        # Lazily: a process that still has the file open keeps the mount alive, not us.
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mount (writes beyond its space fail with a real ENOSPC)."""
    if os.geteuid() != 0:
        pytest.skip("mounting tmpfs needs root")
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
