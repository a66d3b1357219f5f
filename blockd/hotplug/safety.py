"""Devices hotplug must never take, whatever the rules say.

The disk holding the root filesystem, every disk with a mounted filesystem or an
active swap area, and every disk that device-mapper or md builds on (LVM, LUKS,
RAID: its partitions have *holders*) are protected, with all their partitions,
and so is the SCSI generic node of such a disk.  :func:`protected` computes the
set from ``/proc/self/mountinfo``, ``/proc/swaps`` and sysfs, as ``major:minor``
strings; the roots are parameters so tests build a tree of their own.  It reads
procfs and sysfs only (no disk I/O) and is cheap enough to run before every
attach, so a filesystem mounted a second ago is already protected.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["protected", "scsi_generic_disks"]


def _mounted(proc: Path) -> set[str]:
    """``major:minor`` of every mounted filesystem's source (field 3 of mountinfo)."""
    found: set[str] = set()
    try:
        text = (proc / "self" / "mountinfo").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 2 and ":" in fields[2]:
            found.add(fields[2])
    return found


def _swaps(proc: Path) -> set[str]:
    found: set[str] = set()
    try:
        lines = (proc / "swaps").read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if fields and fields[1:2] == ["partition"]:
            try:
                rdev = os.stat(fields[0]).st_rdev
            except OSError:
                continue
            found.add(f"{os.major(rdev)}:{os.minor(rdev)}")
    return found


def _devnum(node: Path) -> str | None:
    try:
        return (node / "dev").read_text().strip()
    except OSError:
        return None


def _disk_of(node: Path) -> Path:
    """The whole disk a block device belongs to (itself unless it is a partition)."""
    return node.parent if (node / "partition").exists() else node


def _family(disk: Path) -> list[Path]:
    """A disk and its partitions (subdirectories with a ``partition`` file)."""
    members = [disk]
    with contextlib.suppress(OSError):
        members += [child for child in disk.iterdir() if (child / "partition").exists()]
    return members


def protected(proc: str | os.PathLike[str] = "/proc",
              sys: str | os.PathLike[str] = "/sys") -> set[str]:
    """``major:minor`` of every block device hotplug must leave alone."""
    proc, sys_root = Path(proc), Path(sys)
    by_num = sys_root / "dev" / "block"
    pending = [by_num / num for num in _mounted(proc) | _swaps(proc)]
    class_block = sys_root / "class" / "block"
    try:
        for link in class_block.iterdir():  # anything device-mapper or md builds on
            holders = link / "holders"
            if holders.is_dir() and any(holders.iterdir()):
                pending.append(link)
    except OSError:
        pass
    seen: set[Path] = set()
    result: set[str] = set()
    while pending:
        link = pending.pop()
        try:
            node = link.resolve(strict=True)
        except OSError:
            continue
        if node in seen:
            continue
        seen.add(node)
        for member in _family(_disk_of(node)):
            num = _devnum(member)
            if num is not None:
                result.add(num)
            seen.add(member)
        slaves = node / "slaves"  # a dm or md device: protect what it is built on
        with contextlib.suppress(OSError):
            pending += list(slaves.iterdir()) if slaves.is_dir() else []
    return result


def scsi_generic_disks(kernel: str, sys: str | os.PathLike[str] = "/sys") -> set[str]:
    """``major:minor`` of the block devices behind a SCSI generic node (``sg0``)."""
    found: set[str] = set()
    block = Path(sys) / "class" / "scsi_generic" / kernel / "device" / "block"
    try:
        for disk in block.iterdir():
            num = _devnum(disk)
            if num is not None:
                found.add(num)
    except OSError:
        pass
    return found
