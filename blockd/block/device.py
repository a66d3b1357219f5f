"""Devices: the named front ends that carry a medium (QEMU's BlockBackend + device).

A :class:`Device` is what users name in commands, events and metrics.  It holds
at most one :class:`~blockd.block.node.Node` as its medium and carries the state that
belongs to the front end rather than the backing: the tray and the medium lock
(``cd`` devices), the I/O status, the error policy (``rerror``/``werror``) and
the I/O accounting.

Every data request goes through a device.  The device checks it (medium
present, tray closed, in range, writable), accounts it, runs the driver call
where it cannot block the event loop (on the loop thread only for memory-backed
drivers and page-cache hits; buffered writes and flushes through io_uring where
it is available; everything else on the I/O workers), and applies the
error policy to failures: ``report`` returns the error, ``ignore`` hides it,
``stop`` (or ``enospc`` on ENOSPC) pauses the device and holds the request
until ``cont`` or ``blockd-device-resume`` retries it.  Each policy publishes
BLOCK_IO_ERROR; pausing also publishes STOP, resuming RESUME.

In-flight cap: a device lets at most ``max_in_flight`` requests into its driver at
once; later ones wait in the device, in order, and start as earlier ones finish.
A device whose backing stopped answering (a dead NFS server, a disk that hangs)
thus holds at most that many I/O threads, and other devices keep being served.
Each request that has to wait counts as a hit of the ``device-in-flight`` limit;
the first of a burst is logged, and the end of the burst.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from blockd.aio.buffers import MIN_POOLED, BufferPool
from blockd.aio.pipes import MIN_SPLICE, Pipe, PipePool
from blockd.aio.uring import UringIo
from blockd.aio.workers import IoWorkers
from blockd.block.node import Node
from blockd.block.stats import FOLD_AT, AcctCookie, BlockAcctStats, IoKind
from blockd.block.tray import Runner, Tray
from blockd.devices import scsi
from blockd.devices.base import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_WRITE,
    Buffer,
    Passthrough,
    ScsiResult,
)
from blockd.devices.posix import UNSUPPORTED_ERRNOS
from blockd.errors import InUse, InvalidArgument, NoMedium, ReadOnly, Unsupported
from blockd.events import BlockIoError, DeviceTrayMoved, EventBus, Resume, Stop

__all__ = [
    "DEFAULT_MAX_IN_FLIGHT", "ERROR_ACTIONS", "Device", "DeviceKind", "ErrorAction",
    "run_scsi_command",
]

DeviceKind = Literal["cd", "hd"]
ErrorAction = Literal["report", "ignore", "stop", "enospc", "auto"]
ERROR_ACTIONS = ("auto", "report", "ignore", "enospc", "stop")

log = logging.getLogger(__name__)

Done = Callable[[Any, BaseException | None], None]
# For the per-request paths: an attribute of the Enum class costs a trip through
# EnumType's __getattr__ hook on Python 3.11, a module global does not.
_READ = IoKind.READ
_WRITE = IoKind.WRITE
_preadv = os.preadv
_pwritev = os.pwritev
# Device.write_on_ring's completion: (token, length, None) or (token, length, error).
WriteDone = Callable[[Any, int, BaseException | None], None]
# A write_on_ring write in flight: node, offset, length, data, fua, done, token, start_ns.
_RingWrite = tuple[Node, int, int, Buffer, bool, WriteDone, Any, int]


def _tell_written(done: Done, length: int, exc: BaseException | None) -> None:
    """A :meth:`Device.write_on_ring` completion told as a :data:`Done` (the count written)."""
    if exc is None:
        done(length, None)
    else:
        done(None, exc)


DEFAULT_MAX_IN_FLIGHT = 64
"""Requests one device lets into its driver at once (the ``device-in-flight`` limit)."""


@dataclass(slots=True)
class _Request:
    """One data request as the device runs it (and holds it while paused)."""

    kind: IoKind
    nbytes: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    done: Done
    node: Node
    inline: bool = False  # the driver never blocks: call it on the loop thread
    nowait: Callable[..., Any] | None = None  # try this on the loop thread first
    # ("write", fd, buffers, flags), ("fsync", fd) or ("splice", fd, pipe): io_uring's way
    uring: tuple[Any, ...] | None = None
    written_at: int = -1  # a write's offset: its end counts for wr_highest_offset on success


class Device:
    """A named device: medium, tray, lock, I/O status, error policy and statistics."""

    def __init__(
        self,
        id: str,
        kind: DeviceKind,
        node: Node | None,
        *,
        workers: IoWorkers,
        bus: EventBus,
        rerror: ErrorAction = "auto",
        werror: ErrorAction = "auto",
        stats: BlockAcctStats | None = None,
        control: Runner | None = None,
        writes: bool = True,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        limit_hit: Callable[[str], None] | None = None,
    ) -> None:
        self.id = id
        # Requests in the driver now, at most max_in_flight (0: no cap); the rest wait,
        # in order, as functions that start them (see the module's docstring).
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._waiting: collections.deque[Callable[[], None]] = collections.deque()
        self._releasing = False  # starting waiting requests (no nested release)
        self.waited = 0  # requests of the current burst that had to wait
        self._limit_hit = limit_hit
        # Whether this device may write its medium: the image locks it takes say so
        # (an implicit device of a read-only export only reads, as in QSD).
        self.writes = writes
        self.kind: DeviceKind = kind
        self.node: Node | None = None
        self.rerror: ErrorAction = "report" if rerror == "auto" else rerror
        self.werror: ErrorAction = "enospc" if werror == "auto" else werror
        self.tray_open = False
        self.locked = False
        self.iostatus: Literal["ok", "failed", "nospace"] = "ok"
        self.paused = False
        self._held: list[_Request] = []
        self.stats = stats if stats is not None else BlockAcctStats()
        # The synchronous fast paths log their successes straight into the statistics
        # (BlockAcctStats.success_log: no call per request); None: nothing is counted.
        self._clock = self.stats.clock
        self._read_log = self.stats.success_log(_READ)
        self._write_log = self.stats.success_log(_WRITE)
        self._write_counters = self.stats.kind_counters(_WRITE)  # begin/end on the ring route
        # blockd-scsi-command: commands sent, by opcode name, and CHECK CONDITIONs
        # by sense key name (for the metrics).
        self.scsi_commands: dict[str, int] = {}
        self.scsi_check_conditions: dict[str, int] = {}
        self._workers = workers
        self._bus = bus
        self._ring_written = self._written_on_ring  # bound once: write_on_ring's callback
        self.tray = Tray(self, control if control is not None else _run_in_default_executor)
        if node is not None:
            self.attach(node)

    # -- identity -----------------------------------------------------------

    @property
    def removable(self) -> bool:
        return self.kind == "cd"

    @property
    def has_tray(self) -> bool:
        return self.kind == "cd"

    @property
    def qom_path(self) -> str:
        return f"/machine/peripheral/{self.id}"

    @property
    def iostatus_enabled(self) -> bool:
        """QEMU shows io-status only when the policy can stop the device."""
        return self.werror in ("stop", "enospc") or self.rerror == "stop"

    def is_available(self) -> bool:
        """Whether a medium is present and reachable (tray closed, a disc in a drive)."""
        return self.node is not None and not self.tray_open and self.node.has_medium

    # -- the medium and the tray (the only writers of this state) -----------------

    def attach(self, node: Node) -> None:
        """Make a free ``node`` this device's medium."""
        if node.user is not None:
            raise InUse(f"Node '{node.name}' is already in use")
        if self.node is not None:
            raise InUse(f"Device '{self.id}' already has a medium")
        if node.set_permissions is not None:
            # Like a QEMU device (and a QSD export): read, and write unless read-only;
            # share everything.  A guest holding the image refuses us, and we it.
            writes = self.writes and not node.read_only
            perm = PERM_CONSISTENT_READ | (PERM_WRITE if writes else 0)
            node.set_permissions(perm, PERM_ALL)
        node.user = self.id
        self.node = node

    def detach(self) -> Node | None:
        """Take the medium out; the node it was (now free), or None."""
        node, self.node = self.node, None
        if node is not None:
            node.user = None
            if node.set_permissions is not None:
                try:
                    node.set_permissions(0, PERM_ALL)
                except OSError as exc:  # releasing never conflicts; the file may be gone
                    log.warning("%s: releasing the image locks of %s: %s", self.id,
                                node.name, exc)
        return node

    def note_tray(self, tray_open: bool) -> None:
        """The tray moved (by a command or by the drive itself): record and announce it."""
        self.tray_open = tray_open
        self._bus.publish(DeviceTrayMoved(device=self.id, id=self.id, tray_open=tray_open))

    def note_lock(self, locked: bool) -> None:
        """The medium lock is now ``locked``."""
        self.locked = locked

    def note_medium(self, node: Node, size: int) -> None:
        """A host drive's disc changed: its size (0 without a disc) and presence."""
        node.size = size
        node.note_medium()

    # -- QMP views ------------------------------------------------------------

    def block_info(self) -> dict[str, object]:
        """QEMU's BlockInfo for query-block."""
        info: dict[str, object] = {
            "device": self.id,
            "qdev": self.id,
            "type": "unknown",
            "removable": self.removable,
            "locked": self.locked,
        }
        if self.has_tray:
            info["tray_open"] = self.tray_open
        if self.iostatus_enabled:
            info["io-status"] = self.iostatus
        if self.node is not None:
            info["inserted"] = self.node.device_info()
        return info

    def block_stats(self) -> dict[str, object]:
        """QEMU's BlockStats for query-blockstats in device mode."""
        entry: dict[str, object] = {"device": self.id, "qdev": self.id}
        highest = 0
        if self.node is not None:
            entry["node-name"] = self.node.name
            highest = self.node.wr_highest_offset
        entry["stats"] = self.stats.to_qmp(wr_highest_offset=highest)
        if self.node is not None:
            specific = self.node.driver_specific_stats()
            if specific is not None:
                entry["driver-specific"] = specific
        return entry

    # -- data path --------------------------------------------------------------

    def _medium(self, kind: IoKind) -> Node:
        node = self.node
        if node is None or self.tray_open or not node.has_medium:
            cookie = self.stats.start(kind, 0)
            self.stats.failed(cookie)
            raise NoMedium(f"{self.id}: No medium found")
        return node

    def _check_range(self, node: Node, kind: IoKind, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > node.size:
            self.stats.invalid(kind)
            raise InvalidArgument(
                f"{self.id}: request at {offset}+{length} is beyond the end ({node.size})"
            )

    def _check_writable(self, node: Node, kind: IoKind) -> None:
        if node.read_only:
            self.stats.invalid(kind)
            raise ReadOnly(f"{self.id}: device is read-only", errno.EPERM)

    def _submit(self, request: _Request) -> None:
        """Run one accounted request by the cheapest safe route.

        Memory-backed drivers run on the loop thread; reads that the page
        cache can serve run there too (RWF_NOWAIT); plain buffered writes and
        flushes go to io_uring when there is a ring; everything else goes to the
        I/O workers.  While the device is paused, requests are held, not failed.
        """
        if self.paused:
            self._held.append(request)
            return
        request.node.in_flight += 1  # waiting or running: the node must not close under it
        cookie = self.stats.start(request.kind, request.nbytes)
        cap = self.max_in_flight
        if cap and (self.in_flight >= cap or self._waiting):
            self._wait(lambda: self._start(request, cookie))
            return
        self._start(request, cookie)

    def _admit(self, start: Callable[[], None]) -> None:
        """Run ``start`` now if the in-flight cap allows (and nothing waits), else later."""
        cap = self.max_in_flight
        if cap and (self.in_flight >= cap or self._waiting):
            self._wait(start)
            return
        start()

    def _wait(self, start: Callable[[], None]) -> None:
        """Queue ``start`` behind the requests in the driver; count it, log a burst once."""
        self._waiting.append(start)
        if not self.waited:
            log.warning("%s: %d requests are in its driver (the device-in-flight limit); "
                        "more wait their turn", self.id, self.in_flight)
        self.waited += 1
        if self._limit_hit is not None:
            self._limit_hit("device-in-flight")

    def _left_driver(self) -> None:
        """A request left the driver: start those waiting, as far as the cap allows."""
        self.in_flight -= 1
        if self._waiting and not self._releasing:
            self._release()

    def _left_node(self, node: Node) -> None:
        """A data request is done with its node and the driver: wake whoever waits for that."""
        node.in_flight -= 1
        if not node.in_flight and node.idle_waiters:
            node.wake_idle()
        self.in_flight -= 1  # _left_driver(), inlined: this runs once per request
        if self._waiting and not self._releasing:
            self._release()

    def _release(self) -> None:
        self._releasing = True  # a request that completes at once must not recurse here
        try:
            waiting = self._waiting
            while waiting and self.in_flight < self.max_in_flight:
                waiting.popleft()()
        finally:
            self._releasing = False
        if not self._waiting and self.waited:
            log.info("%s: below the device-in-flight limit again (%d requests waited)",
                     self.id, self.waited)
            self.waited = 0

    def _start(self, request: _Request, cookie: AcctCookie) -> None:
        """Hand one admitted request to the driver by the cheapest safe route."""
        self.in_flight += 1
        if request.inline or request.nowait is not None:
            call = request.fn if request.inline else request.nowait
            assert call is not None
            try:
                result = call(*request.args)
            except BlockingIOError:
                pass  # not cached: the worker does the blocking version
            except OSError as exc:
                self._complete(request, cookie, None, exc)
                return
            else:
                self._complete(request, cookie, result, None)
                return
        uring = self._workers.uring
        if request.uring is not None and uring is not None and self._submit_uring(
            uring, request, cookie
        ):
            return
        self._workers.submit(
            request.fn, request.args,
            lambda result, exc: self._complete(request, cookie, result, exc),
        )

    def _submit_uring(self, uring: UringIo, request: _Request, cookie: AcctCookie) -> bool:
        """Hand a write or flush to io_uring; False if the ring is full."""
        op = request.uring
        assert op is not None
        if op[0] == "splice":
            _, fd, pipe = op
            if request.node is not self.node:
                # Held across a medium change (error policy stop): its descriptor may be
                # closed, and the number reused.  The worker's way fails it instead.
                return False
            if pipe.held:
                pipe.discard()  # a retried read: drop what the failed try left
            _, offset, length = request.args
            return uring.splice(fd, offset, pipe.w, length,
                                lambda res: self._spliced(request, cookie, pipe, res))
        if op[0] == "fsync":
            def synced(res: int) -> None:
                exc = OSError(-res, os.strerror(-res)) if res < 0 else None
                self._complete(request, cookie, None, exc)

            return uring.fdatasync(op[1], synced)
        _, fd, buffers, flags = op
        if len(buffers) != 1:
            return False  # the ring takes one buffer (the drivers' plans have no more)
        return uring.write(fd, buffers[0], request.args[0], flags,
                           lambda res: self._written(request, cookie, res))

    def _written(self, request: _Request, cookie: AcctCookie, res: int) -> None:
        """A write's io_uring completion: done, failed, or short (the rest goes to a worker)."""
        length = request.nbytes
        if res == length:
            self._complete(request, cookie, res, None)
        elif res < 0:
            self._complete(request, cookie, None, OSError(-res, os.strerror(-res)))
        else:  # short: the careful path writes the rest (and finds the error)
            offset, buffers, fua = request.args
            rest = memoryview(buffers[0]).cast("B")[res:]
            self._workers.submit(
                request.fn, (offset + res, [rest], fua),
                lambda more, exc: self._complete(
                    request, cookie, None if exc else res + more, exc),
            )

    def _spliced(self, request: _Request, cookie: AcctCookie, pipe: Pipe, res: int) -> None:
        """A splice's io_uring completion: done, failed, or short (a worker moves the rest)."""
        if res < 0:
            self._complete(request, cookie, None, OSError(-res, os.strerror(-res)))
            return
        pipe.held = res
        length = request.nbytes
        if res == length:
            self._complete(request, cookie, res, None)
            return
        splice_read, offset, _ = request.args
        self._workers.submit(
            pipe.fill_more, (splice_read, offset + res, length - res),
            lambda more, exc: self._complete(request, cookie, None if exc else res + more, exc),
        )

    def write_on_ring(self, offset: int, data: Buffer, fua: bool, done: WriteDone,
                      token: Any) -> bool:
        """Start a write on io_uring by the shortest route; False (nothing done): use another.

        The NBD server's route for writes, and :meth:`submit_write`'s first choice.  A
        write to a running device with a medium, in range, under its in-flight cap,
        whose node has a plain io_uring descriptor (``Node.ring_fd``) goes straight
        to the ring: no request object, no route choice.  Its success is accounted
        as :meth:`_complete` accounts one and told as ``done(token, length, None)``;
        a failure, a short write or a full ring takes the full path (error policy,
        the rest written by a worker), which ends in ``done(token, length, exc)``.
        ``done`` is never called before this returns.
        """
        node = self.node
        if node is None or node.ring_fd < 0:
            return False  # first: memory-backed drivers write inline (try_write) instead
        if self.paused or self.tray_open or self._waiting or not node.has_medium:
            return False
        fd = node.ring_fd
        uring = self._workers.uring
        if uring is None:
            return False
        length = len(data)
        cap = self.max_in_flight
        if offset < 0 or offset + length > node.size or (cap and self.in_flight >= cap):
            return False
        flags = 0
        if fua:
            plan = node.uring_write([data], True) if node.uring_write is not None else None
            if plan is None:
                return False  # no RWF_DSYNC here: the full path writes, then flushes
            fd, _, flags = plan
        node.in_flight += 1
        self.in_flight += 1
        self._write_counters.in_flight += 1  # self.stats.begin(_WRITE), inlined
        start_ns = self._clock()
        # The request's state as one tuple and a bound method made once: no closure
        # (a function and a cell per variable) for every write.
        state = (node, offset, length, data, fua, done, token, start_ns)
        if uring.write(fd, data, offset, flags, self._ring_written, state):
            return True
        self.in_flight -= 1  # the ring is full: the worker threads (_start counts it again)
        self._start(self._write_request(node, offset, length, data, fua, done, token),
                    AcctCookie(_WRITE, length, start_ns))
        return True

    def _written_on_ring(self, state: _RingWrite, res: int) -> None:
        """The completion of a :meth:`write_on_ring` write: account it and tell ``done``."""
        node, offset, length, data, fua, done, token, start_ns = state
        if res != length:
            self._written(self._write_request(node, offset, length, data, fua, done, token),
                          AcctCookie(_WRITE, length, start_ns), res)
            return
        node.in_flight -= 1  # self._left_node(node), inlined: once per write
        if not node.in_flight and node.idle_waiters:
            node.wake_idle()
        self.in_flight -= 1
        if self._waiting and not self._releasing:
            self._release()
        self._write_counters.in_flight -= 1  # self.stats.end(_WRITE, ...), inlined
        log = self._write_log
        if log is not None:
            log.append(start_ns)
            log.append(self._clock())
            log.append(length)
            if len(log) >= FOLD_AT:
                self.stats.fold(_WRITE)
        if offset + length > node.wr_highest_offset:  # node.note_write(), inlined
            node.wr_highest_offset = offset + length
        done(token, length, None)

    def _write_request(self, node: Node, offset: int, length: int, data: Buffer, fua: bool,
                       done: WriteDone, token: Any) -> _Request:
        """The request object of a write that takes the full path after all."""
        return _Request(
            IoKind.WRITE, length, node.driver.pwritev, (offset, [data], fua),
            lambda result, exc: done(token, length, exc), node, node.driver.memory_backed,
            written_at=offset,
        )

    def _complete(
        self, request: _Request, cookie: AcctCookie, result: object, exc: BaseException | None
    ) -> None:
        """Account the outcome, apply the error policy, and tell the requester."""
        node = request.node
        self._left_node(node)
        if exc is None:
            self.stats.done(cookie)
            if request.written_at >= 0:
                node.note_write(request.written_at, request.nbytes)
            request.done(result, None)
            return
        if not isinstance(exc, OSError):
            self.stats.failed(cookie)
            request.done(None, exc)
            return
        action = self._error_action(request.kind, exc)
        if action == "stop":
            # Not a failure: the request waits and is tried again on resume.
            self.stats.retry(cookie)
            self._publish_error(request.kind, exc, "stop")
            self._stop_on_error(exc)
            self._held.append(request)
            return
        self.stats.failed(cookie)
        self._publish_error(request.kind, exc, action)
        request.done(None, None if action == "ignore" else exc)

    def _error_action(self, kind: IoKind, err: OSError) -> str:
        """What rerror/werror say to do with this error: report, ignore or stop."""
        policy = self.rerror if kind is IoKind.READ else self.werror
        if policy == "enospc":
            return "stop" if err.errno == errno.ENOSPC else "report"
        return policy

    def _publish_error(self, kind: IoKind, err: OSError, action: str) -> None:
        code = err.errno or errno.EIO
        self._bus.publish(
            BlockIoError(
                device=self.id,
                node_name=self.node.name if self.node is not None else None,
                operation="read" if kind is IoKind.READ else "write",
                action=action,
                nospace=(code == errno.ENOSPC) if self.iostatus_enabled else None,
                reason=os.strerror(code),
            )
        )

    def _stop_on_error(self, err: OSError) -> None:
        """The first stopping error sets the I/O status; it sticks until resumed."""
        if self.iostatus == "ok":
            self.iostatus = "nospace" if err.errno == errno.ENOSPC else "failed"
        self.pause()

    # -- the synchronous fast path ------------------------------------------------
    #
    # The common request, served on the loop thread where that cannot block: a
    # medium in, the device running, the range valid, and a memory-backed
    # driver (or, for reads, a page-cache hit).  It is accounted like any other
    # and costs about a third less Python than the callback path.  Anything else (a
    # miss, a paused device, an error, a bad range) makes it decline without
    # side effects on the counters, and the caller takes the full path, which
    # checks, accounts and applies the error policy as usual.  A page-cache miss
    # or an error is thus met twice (one more non-blocking system call before a
    # disk read; reads and writes at an offset can be repeated).

    def try_read(self, offset: int, buf: bytearray) -> int | None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf`` now; the count, or None.

        None: the request needs the full path (:meth:`submit_read`).  A node with a
        ``read_fd`` is read with one ``os.preadv`` here (no driver frame).  A refused
        or partly cached read declines; a short one from memory is read again by the
        driver, which reads on to the end of the file.
        """
        node = self.node
        if node is None or self.paused or self.tray_open or not node.has_medium:
            return None
        length = len(buf)
        if offset < 0 or offset + length > node.size:
            return None
        fd = node.read_fd
        clock = self._clock  # a local: LOAD_METHOD on an instance attribute is never specialized
        start = clock()
        if fd >= 0:
            try:
                count = _preadv(fd, (buf,), offset, node.read_flags)
            except BlockingIOError:
                return None  # not in the page cache
            except OSError as exc:
                if node.read_flags and exc.errno in UNSUPPORTED_ERRNOS:
                    node.read_fd = -1  # the kernel refuses the flags: the driver's way now
                return None
            if count != length and node.read_flags:
                return None  # partly cached
        if fd < 0 or count != length:
            read = node.read_now
            if read is None:
                return None
            try:
                count = read(offset, (memoryview(buf),))
            except OSError:
                return None
            if count < length:
                buf[count:] = bytes(length - count)
        log = self._read_log  # self.stats.account(_READ, length, start), inlined
        if log is not None:
            log.append(start)  # three appends: cheaper than extending by a tuple
            log.append(clock())
            log.append(length)
            if len(log) >= FOLD_AT:
                self.stats.fold(_READ)
        return count

    def try_read_hole(self, offset: int, length: int) -> bool:
        """Account a read the caller may answer as a hole: True for a zero-reading node.

        False: the read needs :meth:`try_read` or :meth:`submit_read`.
        """
        node = self.node
        if node is None or not node.reads_zeroes:
            return False
        if self.paused or self.tray_open or not node.has_medium:
            return False
        if offset < 0 or length <= 0 or offset + length > node.size:
            return False
        self.stats.account(_READ, length, self._clock())
        return True

    def try_write(self, offset: int, data: Buffer, fua: bool) -> bool:
        """Write ``data`` at ``offset`` now; False: it needs :meth:`submit_write`.

        A plain write to a node with a ``write_fd`` (memory-backed) is one ``os.pwritev``
        here; FUA and a short count take the driver's way.
        """
        node = self.node
        if node is None or self.paused or self.tray_open or not node.has_medium:
            return False
        length = len(data)
        if offset < 0 or offset + length > node.size:
            return False
        fd = node.write_fd
        clock = self._clock
        start = clock()
        count = -1
        if fd >= 0 and not fua:
            try:
                count = _pwritev(fd, (data,), offset)
            except OSError:
                return False
        if count != length:
            write = node.write_now
            if write is None or node.read_only:
                return False
            try:
                write(offset, (data,), fua)
            except OSError:
                return False
        if offset + length > node.wr_highest_offset:  # node.note_write(), inlined
            node.wr_highest_offset = offset + length
        log = self._write_log  # self.stats.account(_WRITE, length, start), inlined
        if log is not None:
            log.append(start)  # three appends: cheaper than extending by a tuple
            log.append(clock())
            log.append(length)
            if len(log) >= FOLD_AT:
                self.stats.fold(_WRITE)
        return True

    # -- request entry points (callback style, for the NBD server's hot path) -------
    #
    # Each checks the request synchronously (raising NoMedium, InvalidArgument
    # or ReadOnly, already accounted) and later calls ``done(result, exc)`` on
    # the loop thread, possibly before returning.

    def submit_read(
        self,
        offset: int,
        length: int,
        done: Done,
        pool: BufferPool | None = None,
        pipes: PipePool | None = None,
    ) -> None:
        """Read ``length`` bytes at ``offset``; ``done`` gets a bytearray or a Pipe.

        With a ``pool``, large reads use a recycled buffer that may be longer
        than ``length`` (the first ``length`` bytes are the data); the caller
        gives it back to the pool when it no longer needs it.  With ``pipes``,
        large reads from a driver that can splice arrive as a
        :class:`~blockd.aio.pipes.Pipe` holding exactly ``length`` bytes (by
        reference, not copied); the caller sends it and puts it back.
        """
        node = self._medium(IoKind.READ)
        self._check_range(node, IoKind.READ, offset, length)
        if pipes is not None and length >= MIN_SPLICE and node.splice_read is not None:
            pipe = pipes.get(offset, length)
            if pipe is not None:
                self._submit_splice(node, offset, length, pipe, pipes, done)
                return
        buf = pool.get(length) if pool is not None and length >= MIN_POOLED else bytearray(length)
        view = memoryview(buf)[:length]
        driver = node.driver

        def read(count: object, exc: BaseException | None) -> None:
            if exc is not None:
                done(None, exc)
                return
            # A short read, or one whose error was ignored, leaves part of the
            # (possibly recycled) buffer unread: never hand out stale memory.
            filled = count if isinstance(count, int) else 0
            if filled < length:
                view[filled:] = bytes(length - filled)
            done(buf, None)

        self._submit(_Request(
            IoKind.READ, length, driver.preadv, (offset, [view]), read,
            node, driver.memory_backed, node.nowait_read,
        ))

    def _submit_splice(
        self, node: Node, offset: int, length: int, pipe: Pipe, pipes: PipePool, done: Done
    ) -> None:
        def filled(count: object, exc: BaseException | None) -> None:
            if exc is None and count is None:
                # A failure the error policy ignores: the client gets zeroes.
                try:
                    pipe.discard()
                    pipe.add_zeroes(length)
                except OSError as zero_exc:
                    exc = zero_exc
            if exc is not None:
                pipes.put(pipe)
                done(None, exc)
                return
            done(pipe, None)

        assert node.splice_read is not None
        # A backing that may wait (not memory-backed) splices on io_uring where the node
        # has a plain descriptor for it (Node.splice_fd): the kernel's io-wq worker
        # waits, not a Python thread (the hand-off to a worker thread cost about a
        # quarter of the CPU per MiB).
        self._submit(_Request(
            IoKind.READ, length, pipe.fill, (node.splice_read, offset, length), filled,
            node, node.driver.memory_backed,
            uring=("splice", node.splice_fd, pipe) if node.splice_fd >= 0 else None,
        ))

    def submit_write(self, offset: int, data: Buffer, fua: bool, done: Done) -> None:
        """Write ``data`` at ``offset`` (``fua``: durable before ``done``)."""
        if self.write_on_ring(offset, data, fua, _tell_written, done):
            return
        node = self._medium(IoKind.WRITE)
        length = len(data)
        self._check_range(node, IoKind.WRITE, offset, length)
        self._check_writable(node, IoKind.WRITE)

        driver = node.driver
        plan = node.uring_write([data], fua) if node.uring_write is not None else None
        self._submit(_Request(
            IoKind.WRITE, length, driver.pwritev, (offset, [data], fua), done,
            node, driver.memory_backed, uring=("write", *plan) if plan is not None else None,
            written_at=offset,
        ))

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool, done: Done) -> None:
        """Zero a range (accounted as a write, like QEMU)."""
        node = self._medium(IoKind.WRITE)
        self._check_range(node, IoKind.WRITE, offset, length)
        self._check_writable(node, IoKind.WRITE)

        self._submit(_Request(
            IoKind.WRITE, length, node.driver.write_zeroes, (offset, length, may_unmap), done,
            node, node.driver.memory_backed, written_at=offset,
        ))

    def submit_discard(self, offset: int, length: int, done: Done) -> None:
        """Discard a range (a hint: drivers may ignore it)."""
        node = self._medium(IoKind.UNMAP)
        self._check_range(node, IoKind.UNMAP, offset, length)
        self._check_writable(node, IoKind.UNMAP)

        def discarded(result: object, exc: BaseException | None) -> None:
            node.note_discard(length, ok=exc is None)
            done(result, exc)

        self._submit(_Request(
            IoKind.UNMAP, length, node.driver.discard, (offset, length), discarded,
            node, node.driver.memory_backed,
        ))

    def submit_flush(self, done: Done) -> None:
        """Make completed writes durable."""
        node = self._medium(IoKind.FLUSH)
        driver = node.driver
        fd = node.uring_flush() if node.uring_flush is not None else None
        self._submit(_Request(
            IoKind.FLUSH, 0, driver.flush, (), done, node, driver.memory_backed,
            uring=("fsync", fd) if fd is not None else None,
        ))

    def submit_block_status(self, offset: int, length: int, done: Done) -> None:
        """The allocation extents ``[(length, flags), ...]`` from ``offset`` (NBD block status).

        Checked like a read (medium, tray, range) but not counted as one: QEMU
        accounts no block-status requests.  Raises Unsupported when the driver
        keeps no allocation map, NoMedium or InvalidArgument as a read would.
        SEEK_DATA/SEEK_HOLE may read file-system metadata from disk, so the
        lookup runs on an I/O worker unless the driver is memory-backed.
        """
        node = self.node
        if node is None or self.tray_open or not node.has_medium:
            raise NoMedium(f"{self.id}: No medium found")
        if offset < 0 or length <= 0 or offset + length > node.size:
            raise InvalidArgument(
                f"{self.id}: request at {offset}+{length} is beyond the end ({node.size})")
        lookup = node.block_status
        if lookup is None:
            raise Unsupported("block status is not supported", errno.ENOTSUP)
        if node.driver.memory_backed:
            try:
                extents = lookup(offset, length)
            except OSError as exc:
                done(None, exc)
                return
            done(extents, None)
            return
        node.in_flight += 1  # the driver must not close under the lookup

        def looked_up(extents: object, exc: BaseException | None) -> None:
            node.in_flight -= 1
            if not node.in_flight and node.idle_waiters:
                node.wake_idle()
            self._left_driver()
            done(extents, exc)

        def start() -> None:
            self.in_flight += 1
            self._workers.submit(lookup, (offset, length), looked_up)

        self._admit(start)

    # -- raw SCSI commands ---------------------------------------------------------

    def note_scsi_command(self, opcode: int, result: ScsiResult) -> None:
        """Count one raw command sent to this device's unit, and its CHECK CONDITION."""
        name = scsi.opcode_name(opcode)
        self.scsi_commands[name] = self.scsi_commands.get(name, 0) + 1
        if result.status == scsi.CHECK_CONDITION:
            sense = scsi.decode_sense(result.sense)
            key = sense.key_name if sense is not None else "none"
            self.scsi_check_conditions[key] = self.scsi_check_conditions.get(key, 0) + 1

    # -- pausing --------------------------------------------------------------------

    def pause(self, *, publish: bool = True) -> bool:
        """Hold new and retried requests; publish STOP if the device was running."""
        if self.paused:
            return False
        self.paused = True
        if publish:
            self._bus.publish(Stop())
        return True

    def resume(self, *, publish: bool = True) -> bool:
        """Reset the I/O status and release held requests (RESUME if it was paused)."""
        self.iostatus = "ok"
        if not self.paused:
            return False
        self.paused = False
        held, self._held = self._held, []
        for request in held:
            self._submit(request)
        if publish:
            self._bus.publish(Resume())
        return True


async def run_scsi_command(
    node: Node,
    device: Device | None,
    run: Runner,
    cdb: bytes,
    data_out: bytes,
    data_in_len: int,
    timeout_ms: int,
) -> ScsiResult:
    """Send one raw SCSI command to ``node``'s unit (blockd-scsi-command).

    The command runs through ``run`` (the control executor), one at a time per
    node, so a client holds at most one control thread per node however many
    commands it sends; the node counts it in flight, so it cannot close under
    it.  ``device`` (the node's user, if a device) counts it for the metrics.
    Raises Unsupported for a node whose driver cannot send SCSI commands and
    OSError when the command did not complete.
    """
    driver = node.driver
    if not isinstance(driver, Passthrough):
        raise Unsupported(
            f"Node '{node.name}' (driver {node.drv}) cannot send SCSI commands")
    async with node.passthrough_lock:
        node.in_flight += 1
        try:
            result: ScsiResult = await run(
                driver.scsi_command, cdb, data_out, data_in_len, timeout_ms)
        finally:
            node.in_flight -= 1
            if not node.in_flight and node.idle_waiters:
                node.wake_idle()
    if device is not None:
        device.note_scsi_command(cdb[0], result)
    return result


async def _run_in_default_executor(fn: Callable[..., Any], *args: object) -> Any:
    """The tray's runner when none is given: the loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
