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
