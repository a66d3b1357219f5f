"""What the ``file`` and ``host_device`` drivers share: opening, I/O, flush, zero-filling.

:class:`PosixDriver` is QEMU's file-posix core: it checks the common options,
opens the path with ``O_RDONLY`` or ``O_RDWR`` (plus ``O_DIRECT`` for
``cache.direct``, ``O_CLOEXEC`` always), applies ``auto-read-only``, and serves
reads and writes through :class:`~blockd.devices._aligned_io.AlignedIO` so that
callers may pass any buffers and offsets even with ``O_DIRECT``.  Subclasses
say which file types they accept, how big the backing is, how to discard and
how to zero.

Errors, with QEMU's texts so the QMP layer can pass them through:

* :class:`~blockd.errors.InvalidArgument`: bad option combinations
  (``force-share``, ``aio=native``), a missing filename, a file type the driver
  does not take, a filesystem without ``O_DIRECT`` (errno EINVAL);
* :class:`~blockd.errors.NotFound`: ``Could not open 'X': No such file or directory``;
* :class:`~blockd.errors.ReadOnly`: writing to a read-only node (EROFS), or a
  read-only block device opened for writing (``The device is not writable``,
  errno EACCES);
* :class:`~blockd.errors.BlockdError`: any other failure to open, with its errno;
* :class:`OSError` from I/O, with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar, Self

from blockd.devices import _image_locks as image_locks
from blockd.devices._aligned_io import AlignedIO, Alignment, aligned_buffer, read_full
from blockd.devices.base import Buffer, DriverInfo, NodeOptions
from blockd.errors import BlockdError, InvalidArgument, NotFound, ReadOnly

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "UNSUPPORTED_ERRNOS",
    "PosixDriver",
    "check_common_options",
    "fallocate",
    "open_error",
    "open_flags",
    "probe_direct_alignment",
]

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# Errnos meaning "this operation is not implemented here", after which a
# driver stops trying it and uses its fallback.
UNSUPPORTED_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENOTTY})

# Zero-filling by writing goes in chunks of this size (bounded memory).
ZERO_CHUNK = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


_fstatfs = _libc.fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
_fstatfs.restype = ctypes.c_int

# statfs(2) f_type values of file systems that keep their data in memory.
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6


log = logging.getLogger(__name__)


def filesystem_type(fd: int) -> int:
    """The ``f_type`` magic of the file system ``fd`` lives on (statfs(2)); raise OSError."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little", signed=True)


def swap_active() -> bool:
    """Whether any swap is on (then memory-backed pages may need disk I/O)."""
    try:
        with open("/proc/swaps") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return True


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux fallocate(2) with ``mode`` flags (Python's os module has none); raise OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def check_common_options(options: NodeOptions) -> None:
    """Reject the option combinations QEMU refuses before opening anything.

    Raises InvalidArgument with QEMU's text.
    """
    if options.force_share and not options.read_only:
        raise InvalidArgument("force-share=on can only be used with read-only images")
    if options.aio == "native" and not options.cache_direct:
        raise InvalidArgument(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
        )
    if not options.filename:
        raise InvalidArgument("Parameter 'filename' is missing")


def open_error(filename: str, err: int, detail: str | None = None) -> BlockdError:
    """The error for a failed open(2) of ``filename``, as QEMU words it."""
    message = f"Could not open '{filename}': {detail or os.strerror(err)}"
    if err == errno.ENOENT:
        return NotFound(message, err)
    if err == errno.EINVAL:
        return InvalidArgument(message, err)
    if err == errno.EROFS:
        return ReadOnly(message, err)
    return BlockdError(message, err)


def _open_path(filename: str, writable: bool, direct: bool) -> int:
    """open(2) ``filename``; raise the BlockdError QEMU would report.

    Anything but a block device is opened with O_NONBLOCK, cleared again at
    once: a FIFO opened for reading would otherwise wait for a writer, holding
    a control thread (and shutdown) for ever; the type checks then refuse it.
    Block devices are opened as QEMU opens them (O_NONBLOCK changes what some
    drivers do, CD-ROMs' among them).
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
    if direct:
        flags |= os.O_DIRECT
    try:
        block = stat.S_ISBLK(os.stat(filename).st_mode)
    except OSError:
        block = False
    if block:
        return open_flags(filename, flags)
    fd = open_flags(filename, flags | os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def open_flags(
    filename: str, flags: int, opener: Callable[[str, int], int] | None = None
) -> int:
    """``opener(filename, flags)`` (default os.open); raise the BlockdError QEMU would report."""
    if opener is None:
        opener = os.open
    try:
        return opener(filename, flags)
    except OSError as exc:
        err = exc.errno or errno.EIO
    if err == errno.EINVAL and flags & os.O_DIRECT:
        # Tell "no O_DIRECT on this filesystem" apart from other EINVALs.
        try:
            os.close(opener(filename, flags & ~os.O_DIRECT))
        except OSError:
            pass
        else:
            raise open_error(filename, err, "filesystem does not support O_DIRECT")
    raise open_error(filename, err)


def probe_direct_alignment(fd: int, request: int | None = None) -> Alignment:
    """Find the O_DIRECT alignment of ``fd`` by trying reads, as QEMU does.

    ``request`` is a known request alignment (a block device's logical block
    size); otherwise it is probed with reads of 1, 512, ... 4096 bytes at offset
    0 into page-aligned memory.  The memory alignment is probed with 4 KiB reads
    into buffers offset by those amounts.  A read that succeeds at size 1 proves
    nothing (an empty file never checks alignment), so it yields the safe value:
    4 KiB (page size if larger) for requests and the request alignment for
    memory.  Raises InvalidArgument if nothing works.
    """
    max_align = max(4096, mmap.PAGESIZE)
    candidates = (1, 512, 1024, 2048, 4096)

    def works(view: memoryview) -> bool:
        try:
            read_full(fd, 0, [view])
        except OSError as exc:
            # Misaligned O_DIRECT reads fail with EINVAL; any other error is
            # about the medium, not the alignment.
            return exc.errno != errno.EINVAL
        return True

    whole = aligned_buffer(2 * max_align)
    if request is None:
        for size in candidates:
            if works(whole[:size]):
                request = size if size != 1 else max_align
                break
    memory = None
    for shift in candidates:
        if works(whole[shift : shift + max_align]):
            memory = shift if shift != 1 else request
            break
    if not request or not memory:
        raise InvalidArgument("Could not find working O_DIRECT alignment", errno.EINVAL)
    return Alignment(request=request, memory=memory)


class PosixDriver:
    """An opened path: the shared part of the ``file`` and ``host_device`` drivers.

    Thread-safe: the device layer may call any method from several executor
    threads at once.  ``read_only`` is true when the descriptor is read-only,
    either because the node asked for it or because ``auto-read-only`` fell
    back after the backing refused write access.
    """

    format_name: ClassVar[str] = ""
    # Whether the node takes QEMU's image locks (not drives: their descriptor is
    # reopened as discs come and go, and a read-only CD shares everything anyway).
    image_locking: ClassVar[bool] = True

    options: NodeOptions

    def __init__(
        self,
        options: NodeOptions,
        fd: int,
        *,
        read_only: bool,
        medium_read_only: bool,
        alignment: Alignment,
    ) -> None:
        self.options = options
        self.filename = options.filename or ""
        self.read_only = read_only
        self.medium_read_only = medium_read_only
        self.alignment = alignment
        self._fd = fd
        wanted = self.image_locking and options.locking != "off"
        self._locking = wanted and image_locks.supported(fd)
        if wanted and not self._locking:
            log.warning("%s: the file system takes no OFD locks; opened without image "
                        "locks (locking=%s)", self.filename, options.locking)
        self._lock_mutex = threading.Lock()
        self._io = AlignedIO(fd, alignment, keep_size=self._regular_file)
        self._discard_supported = True
        self._zero_supported = True
        self._dsync_supported = hasattr(os, "RWF_DSYNC")
        self._nowait_supported = hasattr(os, "RWF_NOWAIT") and not options.cache_direct
        # Without O_DIRECT any buffer, offset and length will do.
        self._unaligned_ok = alignment.request == 1 and alignment.memory == 1
        self.memory_backed = self._memory_backed(fd)
        self._setup(fd)

    def _setup(self, fd: int) -> None:
        """Subclass hook: learn what else the backing can tell, once, at open time."""

    def _memory_backed(self, fd: int) -> bool:
        """True for regular files on tmpfs/ramfs with no swap: no call ever waits for a disk."""
        if not self._regular_file or self.options.cache_direct or swap_active():
            return False
        try:
            return filesystem_type(fd) in (TMPFS_MAGIC, RAMFS_MAGIC)
        except OSError:
            return False

    # -- subclass hooks ---------------------------------------------------

    _regular_file: ClassVar[bool] = False

    @classmethod
    def _check_type(cls, filename: str, st: os.stat_result) -> None:
        """Raise InvalidArgument if this driver does not take this kind of file."""
        raise NotImplementedError

    @classmethod
    def _medium_read_only(cls, fd: int, st: os.stat_result) -> bool:
        """Whether the backing refuses writes although open(2) allowed O_RDWR."""
        return False

    @classmethod
    def _alignment(cls, fd: int, st: os.stat_result, direct: bool) -> Alignment:
        """The alignment requests on ``fd`` must respect."""
        return probe_direct_alignment(fd) if direct else Alignment()

    # -- opening ----------------------------------------------------------

    @classmethod
    def open(cls, options: NodeOptions) -> Self:
        """Open ``options.filename``; raise BlockdError with QEMU's text on failure."""
        check_common_options(options)
        filename = options.filename or ""
        direct = options.cache_direct
        writable = not options.read_only
        try:
            fd = _open_path(filename, writable, direct)
        except BlockdError as exc:
            if not (
                writable and options.auto_read_only and exc.errno in (errno.EACCES, errno.EROFS)
            ):
                raise
            writable = False
            fd = _open_path(filename, writable, direct)
        try:
            st = os.fstat(fd)
            medium_read_only = cls._medium_read_only(fd, st)
            if writable and medium_read_only:
                if not options.auto_read_only:
                    raise ReadOnly(
                        f"The device is not writable: {os.strerror(errno.EACCES)}", errno.EACCES
                    )
                os.close(fd)
                fd = -1
                writable = False
                fd = _open_path(filename, writable, direct)
                st = os.fstat(fd)
            cls._check_type(filename, st)
            alignment = cls._alignment(fd, st, direct)
            return cls(
                options,
                fd,
                read_only=not writable,
                medium_read_only=medium_read_only,
                alignment=alignment,
            )
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    @classmethod
    def probe_device(cls, filename: str) -> int:
        """Score 0-100 for how well this driver fits ``filename``."""
        return 0

    # -- I/O --------------------------------------------------------------

    def set_permissions(self, perm: int, shared: int) -> None:
        """Take QEMU's lock bytes for ``perm`` while sharing ``shared`` (PermissionLocks)."""
        if not self._locking or self._fd < 0:
            return
        with self._lock_mutex:
            image_locks.check(self._fd, perm, shared)
            image_locks.apply(self._fd, perm, shared)

    @property
    def fd(self) -> int:
        """The open descriptor (-1 once closed)."""
        return self._fd

    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnly(f"{what} '{self.filename}': node is read-only", errno.EROFS)

    def preadv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Read into ``buffers`` from ``offset``; a short count means end of file.

        A file that shrank underneath is not an error: the count says how much
        was there, and the caller decides what to do with the rest.
        """
        if self._unaligned_ok and len(buffers) == 1:
            # Buffered I/O takes any buffer and offset: one system call, usually complete.
            count = os.preadv(self._fd, buffers, offset)
            if count == 0 or count == buffers[0].nbytes:
                return count
            view = memoryview(buffers[0]).cast("B")  # short: the careful path reads the rest
            return count + self._io.read(offset + count, [view[count:]])
        return self._io.read(offset, buffers)

    def preadv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Read only if the data is already in the page cache (preadv2 with RWF_NOWAIT).

        Safe to call on the event loop thread: it never waits for a disk.
        Raises BlockingIOError when the caller must use :meth:`preadv` from a
        worker instead: data not cached, a partial result, or a backing that
        does not support RWF_NOWAIT (tmpfs; then it stops trying).
        """
        if not self._nowait_supported:
            raise BlockingIOError(errno.EAGAIN, "non-blocking reads are not supported")
        # One buffer is the hot path's case (a generator costs more than the check).
        wanted = len(buffers[0]) if len(buffers) == 1 else sum(len(b) for b in buffers)
        try:
            count = os.preadv(self._fd, buffers, offset, os.RWF_NOWAIT)
        except OSError as exc:
            if exc.errno in UNSUPPORTED_ERRNOS:
                self._nowait_supported = False
                raise BlockingIOError(errno.EAGAIN, "non-blocking reads are not supported") from exc
            raise
        if count != wanted:
            raise BlockingIOError(errno.EAGAIN, "partly cached")
        return count

    def loop_read_plan(self) -> tuple[int, int]:
        """See NowaitReader: buffered descriptors only; a memory-backed file reads with
        no flags, anything else with RWF_NOWAIT (from the page cache or not at all)."""
        if not self._unaligned_ok:
            return -1, 0
        if self.memory_backed:
            return self._fd, 0
        if self._nowait_supported:
            return self._fd, os.RWF_NOWAIT
        return -1, 0

    @property
    def can_splice(self) -> bool:
        """Whether :meth:`splice_read` works: buffered I/O only (O_DIRECT bypasses the cache)."""
        return self._unaligned_ok and self._fd >= 0

    def splice_read(self, offset: int, length: int, pipe_fd: int) -> int:
        """Move up to ``length`` bytes at ``offset`` into a pipe by reference (splice(2)).

        Returns the count moved (0 at the end of the file).  May wait for a
        disk like :meth:`preadv`, so it runs on a worker unless the backing is
        memory-backed.
        """
        return os.splice(self._fd, pipe_fd, length, offset_src=offset)

    def splice_plain_fd(self) -> int:
        """See SpliceReader: :meth:`splice_read` is one splice(2) from this descriptor
        (read-only nodes included: a splice only reads)."""
        return self._fd if self.can_splice else -1

    def pwritev(self, offset: int, buffers: Sequence[Buffer], fua: bool = False) -> int:
        """Write all of ``buffers`` at ``offset``; with ``fua`` the data is durable on return.

        FUA uses ``RWF_DSYNC`` where the kernel supports it, else a write
        followed by fdatasync.
        """
        self._check_writable("Cannot write to")
        if fua and self._dsync_supported and not self.options.cache_no_flush:
            try:
                return self._io.write(offset, buffers, os.RWF_DSYNC)
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_ERRNOS:
                    raise
                self._dsync_supported = False
        if self._unaligned_ok and len(buffers) == 1:
            first = buffers[0]
            count = os.pwritev(self._fd, buffers, offset)
            if count < (first.nbytes if type(first) is memoryview else len(first)):
                # Short: the careful path writes the rest.
                count += self._io.write(offset + count, [memoryview(first).cast("B")[count:]])
        else:
            count = self._io.write(offset, buffers)
        if fua:
            self.flush()
        return count

    def uring_write(
        self, buffers: Sequence[Buffer], fua: bool
    ) -> tuple[int, Sequence[Buffer], int] | None:
        """``(fd, buffers, rw_flags)`` to write through io_uring, or None for the careful path.

        Only plain buffered writes qualify; O_DIRECT alignment handling and
        FUA without RWF_DSYNC stay with :meth:`pwritev`.
        """
        if not self._unaligned_ok or len(buffers) != 1 or self.read_only:
            return None
        flags = 0
        if fua and not self.options.cache_no_flush:
            if not self._dsync_supported:
                return None
            flags = os.RWF_DSYNC
        return self._fd, buffers, flags

    def uring_plain_fd(self) -> int:
        """The descriptor a plain write (one buffer, no FUA) goes to io_uring with, or -1.

        What :meth:`uring_write` answers for such a write, fixed at open: the node
        keeps it, so the per-write hot path asks nothing.
        """
        return self._fd if self._unaligned_ok and not self.read_only else -1

    def uring_flush(self) -> int | None:
        """The fd to fdatasync through io_uring, or None when flushing is off."""
        return None if self.options.cache_no_flush else self._fd

    def flush(self) -> None:
        """fdatasync the descriptor, unless ``cache.no-flush`` is set."""
        if not self.options.cache_no_flush:
            os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range when ``discard=unmap``; otherwise (like QEMU) do nothing.

        A backing that cannot discard makes this a no-op too.
        """
        self._check_writable("Cannot discard on")
        if self.options.discard != "unmap" or not self._discard_supported or length <= 0:
            return
        try:
            self._discard(offset, length)
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise
            self._discard_supported = False

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make a range read back as zeroes, cheaply where the backing can.

        ``may_unmap`` allows deallocating (only honoured with ``discard=unmap``).
        Falls back to writing zero buffers in bounded chunks.
        """
        self._check_writable("Cannot write zeroes to")
        if length <= 0:
            return
        unmap = may_unmap and self.options.discard == "unmap" and self._discard_supported
        try:
            if self._write_zeroes(offset, length, unmap):
                return
        except OSError as exc:
            if exc.errno not in UNSUPPORTED_ERRNOS | {errno.EINVAL}:
                raise
            self._zero_supported = False
        self._write_zero_buffers(offset, length)

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        """Zero a range by writing zeroes, at most ZERO_CHUNK bytes per request."""
        zeroes = aligned_buffer(min(length, ZERO_CHUNK))
        done = 0
        while done < length:
            n = min(length - done, zeroes.nbytes)
            self._io.write(offset + done, [zeroes[:n]])
            done += n

    def _discard(self, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> bool:
        """Zero cheaply; return False to make the caller write zero buffers instead.

        May raise OSError with an "unsupported" errno (or EINVAL): the caller
        then stops trying and writes zero buffers from now on.  Implementations
        check ``self._zero_supported`` first.
        """
        return False

    # -- information ------------------------------------------------------

    def getlength(self) -> int:
        """The size of the backing in bytes."""
        raise NotImplementedError

    def _logical_block_size(self) -> int:
        return max(512, self.alignment.request)

    def _physical_block_size(self) -> int:
        return self._logical_block_size()

    def get_info(self) -> DriverInfo:
        """Sizes, alignment and capabilities for query-named-block-nodes and NBD."""
        st = os.fstat(self._fd)
        return DriverInfo(
            filename=self.filename,
            logical_block_size=self._logical_block_size(),
            physical_block_size=self._physical_block_size(),
            request_alignment=self.alignment.request,
            buffer_alignment=self.alignment.memory,
            actual_size=st.st_blocks * 512,
            can_discard=self.options.discard == "unmap" and self._discard_supported,
            can_write_zeroes=True,
            read_only_medium=self.medium_read_only,
            extra={"direct": self.options.cache_direct, "read_only": self.read_only},
        )

    def close(self) -> None:
        """Close the descriptor; calling it again does nothing."""
        fd, self._fd = self._fd, -1
        self._io.fd = -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.filename!r} fd={self._fd}>"
