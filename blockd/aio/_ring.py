"""A minimal io_uring binding in ctypes: vectored reads and writes, fsync, fallocate.

Why
---
blockd's event loop must never block on disk.  Instead of handing each
``pwritev``/``fdatasync`` to a worker thread (a GIL hand-off and a thread
wake-up per request), the loop thread fills submission queue entries itself,
tells the kernel with one ``io_uring_enter`` per batch, and learns of
completions through an eventfd it watches.  The kernel completes a request
inline during ``io_uring_enter`` when it can do so without sleeping (a buffered
write that only copies into the page cache), and otherwise on its own io-wq
worker threads.  Nothing here waits: :meth:`Ring.submit` passes
``min_complete=0`` and no ``IORING_ENTER_GETEVENTS``.  Only :meth:`Ring.close`
waits, for requests still in flight, because their buffers must outlive them.

Usage from an event loop (single thread; a :class:`Ring` is not thread-safe)::

    ring = Ring(256)
    loop.add_reader(ring.eventfd, on_ready)
    ring.prep_writev(fd, [payload], offset, user_data=tag)  # False: ring full
    ring.submit()

    def on_ready():
        ring.drain_eventfd()                  # first drain, then reap: no lost wake-up
        for tag, res in ring.reap():          # res < 0 is -errno
            ...

Setup and memory layout
-----------------------
``io_uring_setup(entries, &params)`` (syscall 425) returns the ring fd and fills
``struct io_uring_params`` with the ring sizes and with ``io_sqring_offsets`` /
``io_cqring_offsets``: byte offsets of each field inside the mapped rings.  Three
regions are mapped ``MAP_SHARED`` from the ring fd at magic offsets:

* the SQ ring (``IORING_OFF_SQ_RING``): ``head``, ``tail``, ``ring_mask``,
  ``ring_entries``, ``flags``, ``dropped`` and the index ``array`` of
  ``sq_entries`` u32s;
* the CQ ring (``IORING_OFF_CQ_RING``): ``head``, ``tail``, ``ring_mask``,
  ``ring_entries``, ``overflow``, ``flags`` and ``cq_entries`` 16-byte
  ``io_uring_cqe`` (``user_data`` u64, ``res`` s32, ``flags`` u32).  With
  ``IORING_FEAT_SINGLE_MMAP`` (every kernel since 5.4) both rings live in one
  mapping and we map it once, sized for the larger of the two;
* the SQE array (``IORING_OFF_SQES``): ``sq_entries`` 64-byte ``io_uring_sqe``.

The index array maps ring positions to SQE slots.  We always use slot
``position & mask``, so the array is set to the identity once at setup and never
written again.  The SQE array is zeroed at setup; each request then fills the
first 40 bytes of its SQE (opcode to user_data) with one
:func:`struct.pack_into`, the remaining fields (buffer index, personality,
addr3) staying zero.  CQEs are read with one :func:`struct.unpack_from`.  The
ctypes structures below document the layout; ``tests/unit/test_uring.py`` pins
their sizes and offsets, and the struct formats, against ``linux/io_uring.h``.

Who owns which index
--------------------
* SQ ``tail``: written by us only.  We keep a private tail that each ``prep_*``
  advances, and publish it to the shared ``tail`` in :meth:`Ring.submit`.
* SQ ``head``: written by the kernel only, when ``io_uring_enter`` consumes SQEs.
  ``private tail - head`` is the number of prepared SQEs the kernel has not yet
  taken; when it equals ``sq_entries`` the SQ is full.
* CQ ``tail``: written by the kernel only, after it has written a CQE.
* CQ ``head``: written by us only, after we have copied CQEs out.

Memory ordering
---------------
The kernel pairs its accesses with ``smp_load_acquire``/``smp_store_release``.
On our side the SQ tail store must be a release (SQE and index writes visible
before it), the CQ tail load an acquire (CQE reads not hoisted above it) and
the CQ head store must follow the CQE reads.  x86_64 is TSO: stores are not
reordered with older stores, loads not with older loads, stores not with older
loads.  Each ctypes / struct access below is a separate C call made in program
order, which the C compiler cannot reorder across, so plain aligned 32-bit
loads and stores are enough there.  That argument is specific to x86's memory
model, so :class:`Ring` refuses (:class:`UringUnavailable`) on any other
architecture rather than run without barriers.

Buffers: pinned, never copied
-----------------------------
The kernel reads or writes a buffer until the request's CQE is posted, possibly
from an io-wq thread long after ``submit`` returned, so each buffer must stay
alive and at the same address until then.  For every buffer the Ring calls
``PyObject_GetBuffer`` (through ``ctypes.pythonapi``, which holds the GIL and
turns a failure into the exporter's Python exception) into a ``Py_buffer`` the
Ring owns, with ``PyBUF_WRITABLE`` for reads.  This one path serves ``bytes``,
``bytearray``, ``mmap`` and read-only or writable ``memoryview`` slices alike:
``Py_buffer.buf`` is the address of the first byte of the slice, without a
copy, and the held buffer export pins the object: it keeps the exporter alive,
a ``bytearray`` cannot be resized (which could move it), an ``mmap`` cannot be
closed and a ``memoryview`` cannot be released while the export is held.
(``ctypes.c_char.from_buffer`` would do for writable buffers only; taking
``id(obj)`` plus a header size would be CPython-layout guesswork and cannot find
a slice's offset.)  The ``Py_buffer`` structs and the ``iovec`` array built
from them live in C memory the Ring preallocates, room for 4 buffers for each of
the ``cq_entries`` requests that can be in flight (a request with more buffers
gets its own arrays); the Ring remembers them per ``user_data`` and releases the
exports in :meth:`Ring.reap` when the CQE arrives, or in :meth:`Ring.close`.
Building the iovecs reads ``Py_buffer.buf``/``len`` with :mod:`struct`.
``Py_buffer`` is part of the stable ABI since Python 3.11.  Per request this
costs about 2 µs of Python on the loop thread (prepare, submit share, reap).

Back-pressure and overflow
--------------------------
``prep_*`` returns False when the SQ is full, or when one more request would
make more requests in flight than the CQ has entries (which could only overflow
it): the caller submits and reaps, then retries, or falls back.  Should the CQ
overflow anyway, the kernel (``IORING_FEAT_NODROP``) keeps the completions and
sets ``IORING_SQ_CQ_OVERFLOW``; :meth:`Ring.reap` then asks it to flush them with a
non-waiting ``io_uring_enter(0, 0, GETEVENTS)``.

The ring is created with ``IORING_SETUP_CLAMP`` and, when the kernel knows them,
``IORING_SETUP_SUBMIT_ALL`` (5.18+: one bad SQE does not stop the batch) and
``IORING_SETUP_COOP_TASKRUN`` (5.19+).  Without the latter, every completion from
an io-wq worker interrupts the loop thread with an inter-processor interrupt so
that it posts the CQE at once; in a VM that is a VM exit per request, and perf
showed 12 % of blockd's CPU there during 4 KiB writes.  With it, the completion
waits until the loop thread next enters the kernel, which a busy loop does all
the time.  An idle loop does not miss it: the kernel still wakes a sleeping task,
and a task entering ``epoll_wait`` with the notification pending sees it as a
pending signal, returns EINTR, runs the completion on the way out (which
signals the eventfd) and polls again.  ``DEFER_TASKRUN`` is avoided: there,
completions run only inside ``io_uring_enter`` with GETEVENTS, so an
eventfd-driven loop could sleep on work that is already done.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
from collections.abc import Sequence
from typing import Final, NoReturn, Self, TypeAlias

from blockd.devices.pybuffer import PyBuffer, get_buffer, release_buffer

__all__ = ["BufferLike", "Ring", "UringUnavailable"]

BufferLike: TypeAlias = bytes | bytearray | memoryview
"""Anything exporting a C-contiguous buffer (``mmap`` and ``array`` work too)."""

# Syscall numbers (identical on every architecture since the 2019 unification).
_NR_IO_URING_SETUP: Final = 425
_NR_IO_URING_ENTER: Final = 426
_NR_IO_URING_REGISTER: Final = 427

# Opcodes (enum io_uring_op).
_IORING_OP_WRITEV: Final = 2
_IORING_OP_FSYNC: Final = 3
_IORING_OP_WRITE: Final = 23  # pwrite of one buffer (Linux 5.6, as IORING_SETUP_CLAMP)
_IORING_OP_SPLICE: Final = 30  # splice(2) (Linux 5.7)

_IORING_FSYNC_DATASYNC: Final = 1 << 0

# io_uring_setup flags.
_IORING_SETUP_CLAMP: Final = 1 << 4
_IORING_SETUP_SUBMIT_ALL: Final = 1 << 7
_IORING_SETUP_COOP_TASKRUN: Final = 1 << 8

# params.features.
_IORING_FEAT_SINGLE_MMAP: Final = 1 << 0

# sq_ring->flags.
_IORING_SQ_CQ_OVERFLOW: Final = 1 << 1

_IORING_ENTER_GETEVENTS: Final = 1 << 0
_IORING_REGISTER_EVENTFD: Final = 4
_IORING_REGISTER_IOWQ_MAX_WORKERS: Final = 19  # Linux 5.15

#: The most kernel worker threads of io-wq's "unbound" kind (splices into pipes among
#: them) the ring's submitter may have.  Without a cap the kernel starts one for every
#: such request that waits, up to the process limit.  As large as the splice pipe pool
#: can be (blockd/aio/pipes.py, MAX_PIPES): every splice then starts at once and holds
#: its file from the start, and a stuck backing cannot keep other devices' splices
#: queued.
MAX_UNBOUND_WORKERS: Final = 256
#: The same for the "bounded" kind: buffered writes to block devices and every fsync
#: (writes to one regular file wait for each other anyway).  The kernel's default is 4
#: per CPU, shared by every device on the ring, so a few fsyncs that never return (a
#: hard NFS mount, a disk that stopped answering) would hold up all other devices'
#: writes.  io-wq starts another worker only when a running one blocks with work
#: queued, so a high cap costs nothing while requests complete.
MAX_BOUNDED_WORKERS: Final = 256

# mmap offsets.
_IORING_OFF_SQ_RING: Final = 0
_IORING_OFF_CQ_RING: Final = 0x8000000
_IORING_OFF_SQES: Final = 0x10000000

_PyBUF_SIMPLE: Final = 0

_U32: Final = 0xFFFFFFFF
_U64: Final = 0xFFFFFFFFFFFFFFFF
_MAX_ENTRIES: Final = 32768


class _SqringOffsets(ctypes.Structure):
    """``struct io_sqring_offsets`` (40 bytes)."""

    _fields_ = [
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dropped", ctypes.c_uint32),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _CqringOffsets(ctypes.Structure):
    """``struct io_cqring_offsets`` (40 bytes)."""

    _fields_ = [
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("overflow", ctypes.c_uint32),
        ("cqes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _Params(ctypes.Structure):
    """``struct io_uring_params`` (120 bytes)."""

    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqringOffsets),
        ("cq_off", _CqringOffsets),
    ]


class _Sqe(ctypes.Structure):
    """``struct io_uring_sqe`` (64 bytes), the members this module uses named.

    Written through :data:`_SQE_FORMAT`; this class documents and pins the layout.
    """

    _fields_ = [
        ("opcode", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("ioprio", ctypes.c_uint16),
        ("fd", ctypes.c_int32),
        ("off", ctypes.c_uint64),  # union: offset / addr2
        ("addr", ctypes.c_uint64),  # union: buffer or iovec array address
        ("len", ctypes.c_uint32),  # buffer size or number of iovecs
        ("op_flags", ctypes.c_uint32),  # union: rw_flags / fsync_flags / ...
        ("user_data", ctypes.c_uint64),
        ("buf_index", ctypes.c_uint16),
        ("personality", ctypes.c_uint16),
        ("splice_fd_in", ctypes.c_int32),
        ("addr3", ctypes.c_uint64),
        ("pad2", ctypes.c_uint64),
    ]


class _Cqe(ctypes.Structure):
    """``struct io_uring_cqe`` (16 bytes; rings set up without ``CQE32``)."""

    _fields_ = [
        ("user_data", ctypes.c_uint64),
        ("res", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    ]


class _Iovec(ctypes.Structure):
    """``struct iovec``."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# opcode, flags, ioprio, fd, off, addr, len, op_flags, user_data, buf_index,
# personality, splice_fd_in, addr3, pad2: the 64 bytes of one SQE.
_SQE_FORMAT: Final = "=BBHiQQIIQHHiQQ"
_SQE_STRUCT: Final = struct.Struct(_SQE_FORMAT)
# The first 40 bytes, up to user_data: all this module sets but for splices.  The other
# 24 (buf_index, personality, splice_fd_in, addr3) are zeroed at setup; a splice sets
# splice_fd_in, and submit() zeroes that SQE's tail again once the kernel has read it,
# so every other SQE carries zeroes there.
_SQE_HEAD_STRUCT: Final = struct.Struct(_SQE_FORMAT[:10])
_SQE_TAIL_STRUCT: Final = struct.Struct("=" + _SQE_FORMAT[10:])
_CQE_STRUCT: Final = struct.Struct("=QiI")
_iter_cqes: Final = _CQE_STRUCT.iter_unpack
_SQE_SIZE: Final = 64
_CQE_SIZE: Final = 16
_PYBUF_SIZE: Final = ctypes.sizeof(PyBuffer)

_libc = ctypes.CDLL(None, use_errno=True)

# syscall(2) is variadic; glibc implements it in assembly that only moves
# registers, so fixed 64-bit argument types are safe on x86_64.  Each syscall
# gets its own function object so each can have its own argtypes.
_sys_setup = _libc["syscall"]
_sys_setup.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p)
_sys_setup.restype = ctypes.c_long

_sys_enter = _libc["syscall"]
_sys_enter.argtypes = (
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_void_p,
    ctypes.c_long,
)
_sys_enter.restype = ctypes.c_long

_sys_register = _libc["syscall"]
_sys_register.argtypes = (
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_void_p,
    ctypes.c_long,
)
_sys_register.restype = ctypes.c_long

_mmap = _libc.mmap
_mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_mmap.restype = ctypes.c_void_p
_MAP_FAILED: Final = ctypes.c_void_p(-1).value

_munmap = _libc.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munmap.restype = ctypes.c_int

_get_buffer = get_buffer
_release_buffer = release_buffer


class UringUnavailable(OSError):
    """io_uring cannot be used here (ENOSYS, EPERM from seccomp or the
    ``kernel.io_uring_disabled`` sysctl, an unsupported architecture, ...).

    Callers catch it and fall back to worker threads.
    """


STAGE_SIZE: Final = 16 * 1024
"""The largest buffer :meth:`Ring.prep_write` copies instead of pinning."""

# Each request slot has room for this many buffers in the preallocated pools;
# requests with more buffers get their own arrays.
_IOV_INLINE: Final = 4
_IOVEC_SIZE: Final = ctypes.sizeof(_Iovec)
_IOVEC_STRUCT: Final = struct.Struct("=QQ")  # iov_base, iov_len
_PYBUF_BUF_LEN: Final = struct.Struct("=Q8xq")  # Py_buffer.buf, (obj), Py_buffer.len

# user_data -> (pool slot or -1, number of buffers, address of their Py_buffers,
# privately allocated arrays to keep alive or None), or for a write staged in its
# slot's copy (nothing pinned) the bare slot number
_Pinned: TypeAlias = tuple[int, int, int, object]
_Entry: TypeAlias = _Pinned | int
_NO_BUFFERS: Final[_Pinned] = (-1, 0, 0, None)


def _c_bytes(size: int) -> tuple[ctypes.Array[ctypes.c_char], memoryview, int]:
    """Zeroed C memory of ``size`` bytes: the array, a memoryview on it, its address."""
    arr = (ctypes.c_char * max(size, 1))()
    return arr, memoryview(arr), ctypes.addressof(arr)


class Ring:
    """One io_uring instance with an eventfd that becomes readable on completions.

    Not thread-safe: use it from one thread (the event loop's).
    """

    eventfd: int
    """Readable when completions are waiting; drain it with :meth:`drain_eventfd`."""
    sq_entries: int
    """Size of the submission queue (``entries`` rounded up to a power of two)."""
    cq_entries: int
    """Size of the completion queue, and the most requests ever in flight."""
    features: int
    """``IORING_FEAT_*`` bits the kernel reported."""

    def __init__(self, entries: int = 256) -> None:
        if platform.machine() not in ("x86_64", "AMD64"):
            raise UringUnavailable(
                errno.ENOTSUP,
                f"io_uring binding supports x86_64 only (not {platform.machine()})",
            )
        if not 1 <= entries <= _MAX_ENTRIES:
            raise ValueError(f"entries must be in 1..{_MAX_ENTRIES}, not {entries}")
        self._closed = True  # until fully set up
        self._fd = -1
        self.eventfd = -1
        self._maps: list[tuple[int, int]] = []
        self._ops: dict[int, _Entry] = {}
        self._unsubmitted = 0
        # SQ positions of splices whose SQE tail (splice_fd_in) is not zero: cleared once
        # the kernel has read them, because the other preps write only the head and the
        # same bytes mean other things to other opcodes (recent kernels give writes a
        # write_stream there; on 6.18 a stale value did not disturb file writes).
        self._tails_set: list[int] = []

        params = _Params()
        fd = -1
        for flags in (
            _IORING_SETUP_CLAMP | _IORING_SETUP_SUBMIT_ALL | _IORING_SETUP_COOP_TASKRUN,
            _IORING_SETUP_CLAMP | _IORING_SETUP_SUBMIT_ALL,
            _IORING_SETUP_CLAMP,
        ):
            ctypes.memset(ctypes.addressof(params), 0, ctypes.sizeof(params))
            params.flags = flags
            fd = _sys_setup(_NR_IO_URING_SETUP, entries, ctypes.addressof(params))
            if fd >= 0 or ctypes.get_errno() != errno.EINVAL:
                break
        if fd < 0:
            err = ctypes.get_errno()
            raise UringUnavailable(err, f"io_uring_setup: {os.strerror(err)}")
        self._fd = fd
        self.setup_flags = flags  # what this kernel accepted
        try:
            self._setup(params)
        except BaseException:
            self._teardown()
            raise
        self._closed = False

    # -- setup and teardown -------------------------------------------------------------

    def _map(self, size: int, offset: int) -> int:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        addr = _mmap(None, size, prot, flags, self._fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise UringUnavailable(err, f"mmap of io_uring ring: {os.strerror(err)}")
        self._maps.append((addr, size))
        return int(addr)

    def _setup(self, p: _Params) -> None:
        self.sq_entries = sq_n = p.sq_entries
        self.cq_entries = cq_n = p.cq_entries
        self.features = p.features
        sq_off, cq_off = p.sq_off, p.cq_off

        sq_size = sq_off.array + sq_n * 4
        cq_size = cq_off.cqes + cq_n * _CQE_SIZE
        if p.features & _IORING_FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
            sq_base = cq_base = self._map(sq_size, _IORING_OFF_SQ_RING)
        else:
            sq_base = self._map(sq_size, _IORING_OFF_SQ_RING)
            cq_base = self._map(cq_size, _IORING_OFF_CQ_RING)
        sqes_base = self._map(sq_n * _SQE_SIZE, _IORING_OFF_SQES)

        u32 = ctypes.c_uint32
        self._sq_head = u32.from_address(sq_base + sq_off.head)
        self._sq_tail = u32.from_address(sq_base + sq_off.tail)
        self._sq_flags = u32.from_address(sq_base + sq_off.flags)
        self._sq_mask = u32.from_address(sq_base + sq_off.ring_mask).value
        self._cq_head = u32.from_address(cq_base + cq_off.head)
        self._cq_tail = u32.from_address(cq_base + cq_off.tail)
        self._cq_mask = u32.from_address(cq_base + cq_off.ring_mask).value

        # Identity index array: ring position p always names SQE slot p & mask.
        array = (u32 * sq_n).from_address(sq_base + sq_off.array)
        for i in range(sq_n):
            array[i] = i
        self._sqe_tail = self._sq_tail.value  # private tail, published by submit()

        ctypes.memset(sqes_base, 0, sq_n * _SQE_SIZE)
        self._sqes = memoryview((ctypes.c_char * (sq_n * _SQE_SIZE)).from_address(sqes_base))
        self._cqes = memoryview(
            (ctypes.c_char * (cq_n * _CQE_SIZE)).from_address(cq_base + cq_off.cqes)
        )

        # Pools for the Py_buffers and iovecs of requests in flight (at most cq_n).
        self._views_arr, self._views_mv, self._views_base = _c_bytes(
            cq_n * _IOV_INLINE * _PYBUF_SIZE
        )
        self._iov_arr, self._iov_mv, self._iov_base = _c_bytes(cq_n * _IOV_INLINE * _IOVEC_SIZE)
        # prep_write's copies: a slot per request in flight, in anonymous memory that
        # the kernel backs only where it is written (the slots in use).
        stage_size = cq_n * STAGE_SIZE
        stage = _mmap(None, stage_size, mmap.PROT_READ | mmap.PROT_WRITE,
                      mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if stage is None or stage == _MAP_FAILED:
            err = ctypes.get_errno()
            raise UringUnavailable(err, f"mmap of the staging area: {os.strerror(err)}")
        self._maps.append((stage, stage_size))
        self._stage_base = int(stage)
        self._stage_mv = memoryview((ctypes.c_char * stage_size).from_address(stage)).cast("B")
        self._free_slots = list(range(cq_n))

        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        efd = ctypes.c_int32(self.eventfd)
        ret = _sys_register(
            _NR_IO_URING_REGISTER, self._fd, _IORING_REGISTER_EVENTFD, ctypes.addressof(efd), 1
        )
        if ret < 0:
            err = ctypes.get_errno()
            raise UringUnavailable(err, f"IORING_REGISTER_EVENTFD: {os.strerror(err)}")
        # [bounded, unbounded], for the submitting thread's io-wq.  Older kernels (before
        # 5.15) refuse it: the ring still works at the kernel's caps, and the pipe pool
        # bounds the splices.
        counts = (ctypes.c_uint32 * 2)(MAX_BOUNDED_WORKERS, MAX_UNBOUND_WORKERS)
        self.workers_capped = _sys_register(
            _NR_IO_URING_REGISTER, self._fd, _IORING_REGISTER_IOWQ_MAX_WORKERS,
            ctypes.addressof(counts), 2,
        ) >= 0

    def _teardown(self) -> None:
        for name in ("_sqes", "_cqes", "_views_mv", "_iov_mv", "_stage_mv"):
            view = self.__dict__.pop(name, None)
            if isinstance(view, memoryview):
                view.release()
        for name in (
            "_sq_head",
            "_sq_tail",
            "_sq_flags",
            "_cq_head",
            "_cq_tail",
            "_views_arr",
            "_iov_arr",
        ):
            self.__dict__.pop(name, None)
        for addr, size in reversed(self._maps):
            _munmap(addr, size)
        self._maps.clear()
        for fd in (self.eventfd, self._fd):
            if fd >= 0:
                os.close(fd)
        self.eventfd = self._fd = -1

    def close(self) -> None:
        """Wait for requests in flight, release every buffer, unmap, close both fds.

        Requests still in flight are waited for, blocking (the kernel may write into
        their buffers until they complete); their completions are dropped, so reap
        first if they matter.  Prepared but unsubmitted requests are discarded.
        Idempotent.
        """
        if self._closed:
            return
        try:
            while self.pending > 0:
                self._wait(self.pending)
                self.reap()
        finally:
            self._closed = True
            for entry in self._ops.values():
                if not isinstance(entry, int):
                    self._release(entry)
            self._ops.clear()
            self._unsubmitted = 0
            self._teardown()

    def abandon(self) -> None:
        """Give up the ring without waiting: for a process about to exit with requests stuck.

        Nothing is released: the kernel may still use the buffers, mappings and
        pipes of requests in flight, and cancels them when the process exits.
        :meth:`close` (and the garbage collector) then do nothing.
        """
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # -- state --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Requests submitted to the kernel whose completion has not been reaped."""
        return len(self._ops) - self._unsubmitted

    @property
    def queued(self) -> int:
        """Requests prepared but not yet taken by :meth:`submit`."""
        return self._unsubmitted

    @property
    def space(self) -> int:
        """How many more requests ``prep_*`` would accept now."""
        if self._closed:
            return 0
        sq_free = self.sq_entries - ((self._sqe_tail - self._sq_head.value) & _U32)
        return max(0, min(sq_free, self.cq_entries - len(self._ops)))

    # -- preparing requests -------------------------------------------------------------

    def _full(self, user_data: int) -> bool:
        """Check ``user_data``; True when the ring has no room for one more request."""
        if self._closed:
            raise ValueError("io_uring Ring is closed")
        if user_data in self._ops:
            raise ValueError(f"user_data {user_data} is already in flight")
        if not 0 <= user_data <= _U64:
            raise ValueError(f"user_data {user_data} does not fit in 64 bits")
        return (self._sqe_tail - self._sq_head.value) & _U32 >= self.sq_entries or len(
            self._ops
        ) >= self.cq_entries

    def _push(
        self,
        opcode: int,
        fd: int,
        off: int,
        addr: int,
        length: int,
        op_flags: int,
        user_data: int,
        entry: _Entry,
    ) -> None:
        """Fill the next SQE and remember what to release on completion."""
        tail = self._sqe_tail
        _SQE_HEAD_STRUCT.pack_into(
            self._sqes,
            (tail & self._sq_mask) * _SQE_SIZE,
            opcode,
            0,
            0,
            fd,
            off,
            addr,
            length,
            op_flags,
            user_data,
        )
        self._ops[user_data] = entry
        self._sqe_tail = (tail + 1) & _U32
        self._unsubmitted += 1

    def _prep_rw(
        self,
        opcode: int,
        fd: int,
        buffers: Sequence[BufferLike],
        offset: int,
        user_data: int,
        rw_flags: int,
        pin_flags: int,
    ) -> bool:
        # _full() and _push() written out: this is the per-request hot path.
        if self._closed:
            raise ValueError("io_uring Ring is closed")
        ops = self._ops
        if user_data in ops:
            raise ValueError(f"user_data {user_data} is already in flight")
        if not 0 <= user_data <= _U64:
            raise ValueError(f"user_data {user_data} does not fit in 64 bits")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        tail = self._sqe_tail
        if (tail - self._sq_head.value) & _U32 >= self.sq_entries or len(ops) >= self.cq_entries:
            return False
        n = len(buffers)
        slot = self._free_slots.pop()
        keep: object = None
        if n <= _IOV_INLINE:
            views_mv, views_off = self._views_mv, slot * _IOV_INLINE * _PYBUF_SIZE
            iov_mv, iov_off = self._iov_mv, slot * _IOV_INLINE * _IOVEC_SIZE
            views_addr = self._views_base + views_off
            iov_addr = self._iov_base + iov_off
        else:
            views_arr, views_mv, views_addr = _c_bytes(n * _PYBUF_SIZE)
            iov_arr, iov_mv, iov_addr = _c_bytes(n * _IOVEC_SIZE)
            views_off = iov_off = 0
            keep = (views_arr, iov_arr)
        done = 0
        try:
            for buf in buffers:
                # Takes a buffer export (pins buf) or raises the exporter's error.
                _get_buffer(buf, views_addr + done * _PYBUF_SIZE, pin_flags)
                done += 1
            for i in range(n):
                base, length = _PYBUF_BUF_LEN.unpack_from(views_mv, views_off + i * _PYBUF_SIZE)
                _IOVEC_STRUCT.pack_into(iov_mv, iov_off + i * _IOVEC_SIZE, base, length)
        except BaseException:
            self._release((slot, done, views_addr, keep))
            raise
        _SQE_HEAD_STRUCT.pack_into(
            self._sqes,
            (tail & self._sq_mask) * _SQE_SIZE,
            opcode,
            0,
            0,
            fd,
            offset,
            iov_addr,
            n,
            rw_flags,
            user_data,
        )
        ops[user_data] = (slot, n, views_addr, keep)
        self._sqe_tail = (tail + 1) & _U32
        self._unsubmitted += 1
        return True

    def _release(self, entry: _Pinned) -> None:
        slot, n, views_addr, _keep = entry
        for i in range(n):
            _release_buffer(views_addr + i * _PYBUF_SIZE)
        if slot >= 0:
            self._free_slots.append(slot)

    def prep_writev(
        self, fd: int, buffers: Sequence[BufferLike], offset: int, user_data: int, rw_flags: int = 0
    ) -> bool:
        """Queue ``pwritev2(fd, buffers, offset, rw_flags)``; False when the ring is full.

        ``rw_flags`` takes ``os.RWF_*`` (``RWF_DSYNC`` for a FUA write).  Read-only
        buffers (``bytes``, read-only memoryview slices) are used in place, not copied,
        and pinned until the completion is reaped.
        """
        return self._prep_rw(
            _IORING_OP_WRITEV, fd, buffers, offset, user_data, rw_flags, _PyBUF_SIMPLE
        )

    def prep_write(
        self, fd: int, buf: BufferLike, offset: int, user_data: int, rw_flags: int = 0
    ) -> bool:
        """:meth:`prep_writev` of one buffer, for the per-write hot path; False when full.

        A buffer of up to ``STAGE_SIZE`` bytes is copied into the ring's own memory
        (a slot per request in flight) and written with ``IORING_OP_WRITE`` from
        there: a copy of a few KiB costs less than the two ctypes calls that take and
        release a buffer export, and the SQE points at the copy without an iovec.
        Larger buffers, and views that are not plain bytes, are pinned instead.  The
        fullness test counts unsubmitted SQEs instead of reading the kernel's head,
        which moves only inside :meth:`submit`.
        """
        ops = self._ops
        if self._closed or user_data in ops or not 0 <= user_data <= _U64 or offset < 0:
            self._refuse(user_data, offset)
        if self._unsubmitted >= self.sq_entries or len(ops) >= self.cq_entries:
            return False
        slot = self._free_slots.pop()
        entry: _Entry = slot  # a bare slot: nothing to release but the slot
        stage_off = slot * STAGE_SIZE
        try:
            nbytes = len(buf)  # items: a cast view's copy below fails
            staged = nbytes <= STAGE_SIZE
            if staged:
                self._stage_mv[stage_off : stage_off + nbytes] = buf
        except (TypeError, ValueError):  # not sized, or not plain bytes (cast, strided)
            staged = False  # pinning says what it is
        if staged:
            addr = self._stage_base + stage_off
        else:
            views_off = slot * _IOV_INLINE * _PYBUF_SIZE
            views_addr = self._views_base + views_off
            try:
                _get_buffer(buf, views_addr, _PyBUF_SIMPLE)  # pins buf until reaped
            except BaseException:
                self._free_slots.append(slot)
                raise
            addr, nbytes = _PYBUF_BUF_LEN.unpack_from(self._views_mv, views_off)
            entry = (slot, 1, views_addr, None)
        tail = self._sqe_tail
        _SQE_HEAD_STRUCT.pack_into(
            self._sqes, (tail & self._sq_mask) * _SQE_SIZE, _IORING_OP_WRITE, 0, 0, fd,
            offset, addr, nbytes, rw_flags, user_data,
        )
        ops[user_data] = entry
        self._sqe_tail = (tail + 1) & _U32
        self._unsubmitted += 1
        return True

    def _refuse(self, user_data: int, offset: int) -> NoReturn:
        """Raise what :meth:`prep_write` says of a closed ring or a bad argument."""
        self._full(user_data)  # raises for a closed ring, a user_data in flight or too big
        raise ValueError(f"offset must be >= 0, not {offset}")

    def prep_splice(
        self, fd_in: int, off_in: int, pipe_w: int, length: int, user_data: int
    ) -> bool:
        """Queue ``splice(fd_in at off_in -> pipe_w, length)``; False when the ring is full.

        ``off_in`` is -1 where ``fd_in`` is a pipe.  ``pipe_w`` is a pipe's write end; the
        result is the count moved (short at the end of the file or when the pipe fills),
        -errno on failure.  The kernel always runs a splice on one of its io-wq workers,
        where it may wait for the disk.
        """
        if self._full(user_data):
            return False
        if off_in < -1:
            raise ValueError(f"offset must be >= 0 (or -1 for a pipe), not {off_in}")
        tail = self._sqe_tail
        _SQE_STRUCT.pack_into(
            self._sqes, (tail & self._sq_mask) * _SQE_SIZE, _IORING_OP_SPLICE, 0, 0,
            pipe_w, _U64,  # off_out -1: the pipe has no offset
            off_in & _U64, length, 0, user_data, 0, 0, fd_in, 0, 0,
        )
        self._tails_set.append(tail)
        self._ops[user_data] = _NO_BUFFERS
        self._sqe_tail = (tail + 1) & _U32
        self._unsubmitted += 1
        return True

    def _clear_read_tails(self, head: int) -> None:
        """Zero the SQE tails (bytes 40-63) of splices the kernel has read (before ``head``)."""
        keep = []
        for position in self._tails_set:
            if (head - position - 1) & _U32 < self.sq_entries:  # consumed: position < head
                _SQE_TAIL_STRUCT.pack_into(
                    self._sqes, (position & self._sq_mask) * _SQE_SIZE + _SQE_HEAD_STRUCT.size,
                    0, 0, 0, 0, 0)
            else:
                keep.append(position)
        self._tails_set = keep

    def prep_fsync(self, fd: int, user_data: int, datasync: bool = True) -> bool:
        """Queue ``fdatasync(fd)`` (``fsync`` with ``datasync=False``); False when full."""
        if self._full(user_data):
            return False
        flags = _IORING_FSYNC_DATASYNC if datasync else 0
        self._push(_IORING_OP_FSYNC, fd, 0, 0, 0, flags, user_data, _NO_BUFFERS)
        return True

    # -- submitting and reaping ---------------------------------------------------------

    def _enter(self, to_submit: int, min_complete: int, flags: int) -> int:
        """io_uring_enter, retrying EINTR; returns the result or -errno."""
        while True:
            ret = _sys_enter(_NR_IO_URING_ENTER, self._fd, to_submit, min_complete, flags, None, 0)
            if ret >= 0:
                return int(ret)
            err = ctypes.get_errno()
            if err != errno.EINTR:
                return -err

    def submit(self) -> int:
        """Hand every prepared request to the kernel without waiting for any.

        Returns how many the kernel took.  EAGAIN (no memory for requests) and EBUSY
        (completions backed up) leave the rest queued and return what was taken:
        reap, then call again.  Other errors raise OSError.
        """
        if self._closed:
            raise ValueError("io_uring Ring is closed")
        if not self._unsubmitted:
            return 0
        head = self._sq_head.value
        # Release store: the SQEs were written before it, in program order (x86 TSO).
        self._sq_tail.value = self._sqe_tail
        ret = self._enter((self._sqe_tail - head) & _U32, 0, 0)
        if ret < 0 and -ret not in (errno.EAGAIN, errno.EBUSY):
            raise OSError(-ret, f"io_uring_enter: {os.strerror(-ret)}")
        new_head = self._sq_head.value
        self._unsubmitted = (self._sqe_tail - new_head) & _U32
        if self._tails_set:
            self._clear_read_tails(new_head)
        return (new_head - head) & _U32

    def discard_queued(self) -> list[int]:
        """Take back every request prepared but not taken by the kernel; their user_data.

        For a caller whose :meth:`submit` raised: those requests will never run, so
        their buffers are released now.  Requests the kernel took are untouched: they
        still complete, and :meth:`reap` still reports them.
        """
        if self._closed:
            raise ValueError("io_uring Ring is closed")
        head = self._sq_head.value
        dropped = []
        position = head
        while position != self._sqe_tail:
            base = (position & self._sq_mask) * _SQE_SIZE
            user_data = _SQE_HEAD_STRUCT.unpack_from(self._sqes, base)[-1]
            entry = self._ops.pop(user_data)
            if isinstance(entry, int):
                self._free_slots.append(entry)
            else:
                self._release(entry)
            dropped.append(user_data)
            position = (position + 1) & _U32
        if self._tails_set:
            self._clear_read_tails(self._sqe_tail)  # the dropped splices' tails too
        self._sqe_tail = head
        self._sq_tail.value = head  # the kernel reads the tail only in io_uring_enter
        self._unsubmitted = 0
        return dropped

    def reap(self) -> list[tuple[int, int]]:
        """``(user_data, res)`` for every completion available now; never waits.

        ``res`` is the operation's result, ``-errno`` on failure.  The buffers of the
        reaped requests are released.
        """
        if self._closed:
            raise ValueError("io_uring Ring is closed")
        out: list[tuple[int, int]] = []
        append = out.append
        pop = self._ops.pop
        free = self._free_slots.append
        cqes = self._cqes
        size = len(cqes)
        mask = self._cq_mask
        cq_head = self._cq_head
        while True:
            head = cq_head.value
            tail = self._cq_tail.value  # acquire: the CQE reads below follow it (x86 TSO)
            if head != tail:
                first = (head & mask) * _CQE_SIZE
                end = first + ((tail - head) & _U32) * _CQE_SIZE
                # The CQEs in ring order: one slice, or two where they wrap around.
                chunks = (cqes[first:end],) if end <= size else (cqes[first:], cqes[:end - size])
                for chunk in chunks:
                    for user_data, res, _flags in _iter_cqes(chunk):
                        entry = pop(user_data, None)
                        if isinstance(entry, int):  # a staged write: its slot is free again
                            free(entry)
                        elif entry is not None:
                            self._release(entry)
                        append((user_data, res))
                head = tail
            cq_head.value = head  # after the CQE reads, in program order
            if not self._sq_flags.value & _IORING_SQ_CQ_OVERFLOW:
                return out
            # Completions overflowed the CQ ring: have the kernel move them in.
            ret = self._enter(0, 0, _IORING_ENTER_GETEVENTS)
            if ret < 0 and -ret not in (errno.EAGAIN, errno.EBUSY):
                raise OSError(-ret, f"io_uring_enter: {os.strerror(-ret)}")
            if self._cq_tail.value == head:
                return out

    def _wait(self, min_complete: int) -> None:
        """Block until ``min_complete`` completions are in the CQ (used by close only)."""
        ret = self._enter(0, min_complete, _IORING_ENTER_GETEVENTS)
        if ret < 0:
            raise OSError(-ret, f"io_uring_enter: {os.strerror(-ret)}")

    def drain_eventfd(self) -> None:
        """Reset the eventfd counter; never blocks."""
        if self._closed:
            return
        # Not contextlib.suppress: this runs once per loop turn with completions.
        try:  # noqa: SIM105
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass
