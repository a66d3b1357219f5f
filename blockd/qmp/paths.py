"""Which files QMP clients may have blockd open (``blockdev-add``, ``blockdev-change-medium``).

blockd runs as root, so a QMP client that may name any path may read any file
(``/etc/shadow`` exported over NBD).  The operator's own command line and
configuration file are trusted and never checked.  For QMP:

* with ``allowed-paths`` in the configuration, only those: directories (a path
  inside one is allowed), shell globs (``/dev/sd*``) or exact paths;
* without it, while every QMP listener is private to the daemon's user (a UNIX
  socket with mode 0600 and no ``socket-group``, no TCP), any path, as
  qemu-storage-daemon allows (scripts written for it keep working);
* without it, once a listener is shared (a socket group or mode that lets
  others in, or TCP), only block devices, SCSI generic nodes and
  ``/var/lib/blockd``; the daemon says so at start.

Symbolic links are resolved first and the resolved path is what is checked
(``/dev/disk/by-id/...`` works: it is a block device) and what is opened, so a
link swapped after the check cannot redirect the open.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from blockd.errors import BlockdError

__all__ = ["DEFAULT_SHARED_DIRS", "PathPolicy", "PathRefused"]

DEFAULT_SHARED_DIRS = ("/var/lib/blockd",)
SCSI_GENERIC_MAJOR = 21
_GLOB = frozenset("*?[")


class PathRefused(BlockdError):
    """A QMP client named a path the policy does not allow."""


@dataclass(frozen=True, slots=True)
class PathPolicy:
    """What QMP may open: ``entries`` (None: device nodes plus DEFAULT_SHARED_DIRS)."""

    entries: tuple[str, ...] | None

    @classmethod
    def for_listeners(cls, allowed: Sequence[str] | None, shared: bool) -> PathPolicy | None:
        """The policy for a daemon: None when QMP may open anything (private, no list)."""
        if allowed is not None:
            return cls(tuple(allowed))
        return cls(None) if shared else None

    def describe(self) -> str:
        if self.entries is None:
            return ("block devices, SCSI generic nodes and "
                    + ", ".join(DEFAULT_SHARED_DIRS))
        return ", ".join(self.entries) or "nothing"

    def resolve(self, filename: str) -> str:
        """The resolved path to open; PathRefused when the policy does not allow it.

        Blocks on the file system (realpath, stat): call it off the event loop.
        """
        resolved = os.path.realpath(filename)
        if self._allows(resolved):
            return resolved
        shown = filename if resolved == filename else f"{filename} (resolved: {resolved})"
        raise PathRefused(
            f"Path {shown} is not allowed for QMP clients; the configuration's "
            f"allowed-paths decides (now: {self.describe()})")

    def _allows(self, resolved: str) -> bool:
        if self.entries is None:
            try:
                st = os.stat(resolved)
            except OSError:
                st = None
            if st is not None and (stat.S_ISBLK(st.st_mode) or (
                    stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == SCSI_GENERIC_MAJOR)):
                return True
            return any(_inside(resolved, d) for d in DEFAULT_SHARED_DIRS)
        for entry in self.entries:
            if _GLOB & set(entry):
                if fnmatch.fnmatchcase(resolved, entry):
                    return True
            elif entry.endswith("/") or os.path.isdir(entry):
                if _inside(resolved, os.path.realpath(entry)):
                    return True
            elif resolved == os.path.realpath(entry):
                return True
        return False


def _inside(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory.rstrip("/") + "/")
