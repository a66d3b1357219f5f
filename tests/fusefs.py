"""A tiny FUSE file system, served by a thread of the test, that can stop answering.

It stands in for a dead NFS server or a failing disk without device-mapper (this
kernel has none): the kernel's FUSE client is real, so a process that opens, stats or
reads a file here waits in the kernel, uninterruptibly, until the file system answers.
The file system holds one directory with regular files of given sizes, whose data
reads as zeroes.  :meth:`FuseFs.hold` makes it keep the requests of one kind (``open``:
the lookup of a name, which every open and stat starts with; ``read``; ``fsync``)
unanswered;
:meth:`FuseFs.release` answers what it kept and stops holding.  A held request whose
process is killed is let go (answered EINTR when the kernel asks to interrupt it), as a
hard NFS mount lets a killed process go; nothing else ends the wait.  Closing unmounts
(lazily) and aborts the connection, so anything still waiting fails with ENOTCONN.

Only what Linux's FUSE client needs for lookup, getattr, open, read, fsync, flush and
release is spoken (protocol 7.31, no writes); anything else gets ENOSYS.
Mounting needs root and /dev/fuse.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FuseFs", "fuse_available", "mounted_fuse"]

_LOOKUP, _FORGET, _GETATTR, _OPEN, _READ, _STATFS, _RELEASE, _FSYNC = 1, 2, 3, 14, 15, 17, 18, 20
_FLUSH, _INIT, _OPENDIR, _READDIR, _RELEASEDIR, _INTERRUPT = 25, 26, 27, 28, 29, 36
_BATCH_FORGET = 42
_NO_REPLY = frozenset({_FORGET, _BATCH_FORGET})
_IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
_OUT_HEADER = struct.Struct("=IiQ")  # len error unique
_ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # fuse_attr
_ROOT = 1
_KINDS = {_LOOKUP: "open", _READ: "read", _FSYNC: "fsync"}  # what hold() can keep


def fuse_available() -> str | None:
    """Why FUSE cannot be used here, or None when it can."""
    if os.geteuid() != 0:
        return "mounting FUSE needs root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


class FuseFs:
    """One mounted instance; ``files`` maps names to sizes."""

    def __init__(self, mountpoint: Path, files: dict[str, int]) -> None:
        self.mountpoint = mountpoint
        self._names = list(files)
        self._sizes = dict(files)
        self._held: dict[str, list[tuple[int, int, bytes]]] = {k: [] for k in _KINDS.values()}
        self._holding: set[str] = set()
        self._lock = threading.Lock()
        self.waiting = threading.Condition(self._lock)  # notified when a request is held
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other"
        if libc.mount(b"blockd-test", os.fsencode(mountpoint), b"fuse.blockd-test",
                      ctypes.c_ulong(0x2 | 0x4), options.encode()) != 0:  # nosuid, nodev
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"mounting FUSE on {mountpoint}: {os.strerror(err)}")
        self._connection = _connection_dir(mountpoint)
        self._thread = threading.Thread(target=self._serve, name="fusefs", daemon=True)
        self._thread.start()

    def path(self, name: str) -> str:
        return str(self.mountpoint / name)

    # -- control ------------------------------------------------------------------

    def hold(self, kind: str) -> None:
        """Leave requests of ``kind`` ("open", "read" or "fsync") unanswered from now on."""
        with self._lock:
            self._holding.add(kind)

    def held(self, kind: str) -> int:
        with self._lock:
            return len(self._held[kind])

    def wait_held(self, kind: str, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` requests of ``kind`` are held."""
        with self._lock:
            return self.waiting.wait_for(lambda: len(self._held[kind]) >= count, timeout)

    def release(self, kind: str) -> None:
        """Answer the requests of ``kind`` kept so far, and answer the next ones at once."""
        with self._lock:
            self._holding.discard(kind)
            held, self._held[kind] = self._held[kind], []
        for opcode, unique, body in held:
            self._answer(opcode, unique, body)

    def close(self) -> None:
        """Unmount (lazily) and abort: whatever still waits on this file system fails."""
        # Closing /dev/fuse alone does not abort while our reader sits in read(): the
        # connection's abort file does, and every held request ends with ENOTCONN.
        if self._connection is not None:
            with contextlib.suppress(OSError):
                (self._connection / "abort").write_text("1")
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True, check=False)
        self._thread.join(5)
        os.close(self._fd)

    # -- the protocol -------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                message = os.read(self._fd, 1 << 20 | 4096)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV once unmounted, EBADF once closed
            length, opcode, unique, nodeid, *_ = _IN_HEADER.unpack_from(message)
            body = message[_IN_HEADER.size:length]
            if opcode in _NO_REPLY:
                continue
            if opcode == _INTERRUPT:
                self._interrupt(struct.unpack_from("=Q", body)[0])
                continue
            kind = _KINDS.get(opcode)
            with self._lock:
                if kind is not None and kind in self._holding:
                    self._held[kind].append((opcode, unique, nodeid.to_bytes(8, "little")
                                             + body))
                    self.waiting.notify_all()
                    continue
            self._answer(opcode, unique, nodeid.to_bytes(8, "little") + body)

    def _interrupt(self, unique: int) -> None:
        """The kernel interrupts a request (its process got a signal, or is killed):
        a held one ends with EINTR; others are answered anyway."""
        with self._lock:
            for held in self._held.values():
                for entry in held:
                    if entry[1] == unique:
                        held.remove(entry)
                        break
                else:
                    continue
                break
            else:
                return
        self._send(unique, -errno.EINTR, b"")

    def _answer(self, opcode: int, unique: int, body: bytes) -> None:
        nodeid = int.from_bytes(body[:8], "little")
        body = body[8:]
        try:
            reply = self._reply(opcode, nodeid, body)
        except OSError as exc:
            self._send(unique, -(exc.errno or errno.EIO), b"")
            return
        self._send(unique, 0, reply)

    def _send(self, unique: int, error: int, payload: bytes) -> None:
        with contextlib.suppress(OSError):  # the request may have been interrupted
            os.write(self._fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), error,
                                                unique) + payload)

    def _attr(self, nodeid: int) -> bytes:
        if nodeid == _ROOT:
            return _ATTR.pack(_ROOT, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0,
                              0, 4096, 0)
        size = self._sizes[self._names[nodeid - 2]]
        return _ATTR.pack(nodeid, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0,
                          stat.S_IFREG | 0o644, 1, 0, 0, 0, 4096, 0)

    def _reply(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        if opcode == _INIT:
            _major, _minor, readahead, _flags = struct.unpack_from("=IIII", body)
            return struct.pack("=IIIIHHIIHHI", 7, 31, readahead, 0, 16, 12, 128 << 10, 1,
                               32, 0, 0) + bytes(28)
        if opcode == _LOOKUP:
            name = body.split(b"\0", 1)[0].decode()
            if nodeid != _ROOT or name not in self._sizes:
                raise OSError(errno.ENOENT, "no such file")
            child = self._names.index(name) + 2
            return struct.pack("=QQQQII", child, 0, 0, 0, 0, 0) + self._attr(child)
        if opcode == _GETATTR:
            return struct.pack("=QII", 0, 0, 0) + self._attr(nodeid)
        if opcode in (_OPEN, _OPENDIR):
            return struct.pack("=QIi", 1, 0, 0)
        if opcode == _READ:
            _fh, offset, size = struct.unpack_from("=QQI", body)
            total = self._sizes[self._names[nodeid - 2]]
            return bytes(max(0, min(size, total - offset)))
        if opcode in (_RELEASE, _RELEASEDIR, _FLUSH, _FSYNC):
            return b""
        if opcode == _READDIR:
            return b""
        if opcode == _STATFS:
            return struct.pack("=QQQQQIIII", 0, 0, 0, 0, 0, 4096, 255, 4096, 0) + bytes(24)
        raise OSError(errno.ENOSYS, "not implemented")


def _connection_dir(mountpoint: Path) -> Path | None:
    """/sys/fs/fuse/connections/N for the mount (fusectl mounted if it is not), found from
    /proc/self/mountinfo so that the mount itself is never touched."""
    control = Path("/sys/fs/fuse/connections")
    if control.is_dir() and not any(control.iterdir()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)],
                       capture_output=True, check=False)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mountpoint):
            minor = fields[2].split(":")[1]
            found = control / minor
            return found if found.is_dir() else None
    return None


@contextlib.contextmanager
def mounted_fuse(mountpoint: Path, files: dict[str, int]) -> Iterator[FuseFs]:
    """A :class:`FuseFs` on ``mountpoint`` (created), unmounted and aborted at the end."""
    mountpoint.mkdir(exist_ok=True)
    fs = FuseFs(mountpoint, files)
    try:
        yield fs
    finally:
        fs.close()
