#!/usr/bin/env python3
"""Load with faults: many NBD clients and QMP sessions against one blockd while its
backings fail, and a proof that nothing acknowledged was lost.

One real blockd serves five devices over NBD:

* ``file0`` (a file on the root filesystem) and ``loop0`` (a loop device, ``host_device``)
  stay healthy: no request on them may fail;
* ``detach0``, a loop device attached by a hotplug rule, is released with ``losetup -d``
  while its clients write (blockd notices the loop device's autoclear flag, drops the
  export and its clients and deletes the device);
* ``enospcr0`` (``werror=report``) and ``enospcs0`` (``werror=enospc``) are files on
  small tmpfs mounts that run out of space: the first answers ENOSPC until its tmpfs
  grows; the second pauses with its requests held, and each time it does the program
  grows the tmpfs and sends ``cont``.

NBD clients (a small asyncio client below, real UNIX sockets) each own a region of one
device and write self-describing 4 KiB blocks (magic, offset and a generation number in
every block), some with FUA, read every acknowledged write back at once, read at random
and flush.  QMP sessions (qemu.qmp's QMPClient) query and churn extra nodes, devices and
exports.  The program samples blockd's RSS and descriptors, times every request, counts
errors by kind, and at the end reads every block back through a fresh NBD connection and,
after blockd has exited, from the backing files.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient

REPO_ROOT = Path(__file__).resolve().parent.parent
BLOCK = 4096
MiB = 1 << 20
MAGIC = b"LDFAULT1"
PIPE_POOL_FDS = 2 * 64  # blockd/aio/pipes.py: MAX_PIPES pipes, two descriptors each

HEALTHY = ("file0", "loop0")
DETACH = "detach0"
ENOSPC_REPORT = "enospcr0"
ENOSPC_STOP = "enospcs0"
# Share of the NBD clients each device gets (every device gets at least one).
SHARES = {"file0": 0.3, "loop0": 0.2, DETACH: 0.15, ENOSPC_REPORT: 0.15, ENOSPC_STOP: 0.2}

# NBD wire constants (the NBD protocol specification).
NBD_OPT_GO = 7
NBD_REP_ACK = 1
NBD_REP_INFO = 3
NBD_INFO_EXPORT = 0
NBD_REPLY_MAGIC = 0x67446698
NBD_REQUEST_MAGIC = 0x25609513
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH = 0, 1, 2, 3
NBD_CMD_FLAG_FUA = 1
NBD_FLAG_SEND_FUA = 8
NBD_ERRNO = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
             75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}


# --------------------------------------------------------------------------------------
# Self-describing blocks and the model of what was acknowledged
# --------------------------------------------------------------------------------------


def make_block(offset: int, gen: int) -> bytes:
    """4 KiB that say where they belong and which write put them there."""
    header = struct.pack("<8sQQQ", MAGIC, offset, gen, offset ^ (gen * 0x9E3779B97F4A7C15
                                                                  & (2**64 - 1)))
    return header * (BLOCK // len(header))


class Model:
    """What each block of one device may hold.

    Every block is owned by one worker of one client, which has at most one request on
    it at a time, so the block's content is known: the generation of the last write
    acknowledged (0: never written, zeroes), or one of the generations written since
    that failed or lost their reply (``maybe``: a failed write may have landed).
    """

    def __init__(self, device: str, blocks: int) -> None:
        self.device = device
        self.acked = array("Q", bytes(8 * blocks))
        self.maybe: dict[int, set[int]] = {}

    def ack(self, first: int, count: int, gen: int) -> None:
        for b in range(first, first + count):
            self.acked[b] = gen
            self.maybe.pop(b, None)

    def unsure(self, first: int, count: int, gen: int) -> None:
        for b in range(first, first + count):
            self.maybe.setdefault(b, set()).add(gen)

    def check(self, block: int, data: bytes | memoryview) -> str | None:
        """None if ``data`` is a content ``block`` may hold, else what is wrong."""
        acked = self.acked[block]
        allowed = self.maybe.get(block, set())
        if data == bytes(BLOCK):
            return None if acked == 0 else f"zeroes where generation {acked} was acknowledged"
        header = bytes(data[:32])
        magic, offset, gen, _ = struct.unpack("<8sQQQ", header)
        if magic != MAGIC:
            return f"garbage where generation {acked} was acknowledged"
        if offset != block * BLOCK:
            return f"the block of offset {offset} found at offset {block * BLOCK}"
        if data != make_block(offset, gen):
            return f"torn block (header says generation {gen})"
        if gen == acked or gen in allowed:
            return None
        if gen < acked:
            return f"generation {gen} where {acked} was acknowledged (lost write)"
        return f"generation {gen} never written to it (acknowledged: {acked})"


# --------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------


def percentiles(samples: array[float] | list[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max of latencies in ms (nearest rank)."""
    if not samples:
        return {}
    ordered = sorted(samples)
    n = len(ordered)

    def rank(p: float) -> float:
        return ordered[min(n - 1, max(0, int(p * n + 0.999999) - 1))]

    return {"n": n, "p50": rank(0.5), "p99": rank(0.99), "p99.9": rank(0.999),
            "max": ordered[-1]}


@dataclass
class Stats:
    """Everything measured, shared by all tasks (one event loop, no locks)."""

    latency: dict[str, array[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    problems: list[dict[str, Any]] = field(default_factory=list)
    problem_count: int = 0
    blocks_checked: int = 0
    hangs: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    last_error_at: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def time(self, kind: str, ms: float) -> None:
        self.latency.setdefault(kind, array("d")).append(ms)

    def problem(self, where: str, device: str, block: int, what: str) -> None:
        self.problem_count += 1
        if len(self.problems) < 50:
            self.problems.append({"where": where, "device": device, "block": block,
                                  "offset": block * BLOCK, "what": what})


# --------------------------------------------------------------------------------------
# A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies)
# --------------------------------------------------------------------------------------


class Disconnected(Exception):
    """The server closed the connection; the request got no reply."""


class Refused(Exception):
    """The server refused the option haggling (e.g. the export is gone)."""


class NbdClient:
    """One NBD connection with any number of requests in flight, matched by cookie."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[asyncio.Future[tuple[int, bytes]], int]] = {}
        self.cookie = 0
        self.lost: BaseException | None = None
        self.size = 0
        self.flags = 0
        self._task: asyncio.Task[None] | None = None

    async def connect(self, path: str, name: str) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(path)
        nbdmagic, optmagic, hflags = struct.unpack(">8s8sH",
                                                   await self.reader.readexactly(18))
        if nbdmagic != b"NBDMAGIC" or optmagic != b"IHAVEOPT":
            raise Refused("not a newstyle NBD server")
        self.writer.write(struct.pack(">I", 1 | (hflags & 2)))
        raw = name.encode()
        body = struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0)
        self.writer.write(struct.pack(">8sII", b"IHAVEOPT", NBD_OPT_GO, len(body)) + body)
        await self.writer.drain()
        while True:
            _, _, rtype, rlen = struct.unpack(">QIII", await self.reader.readexactly(20))
            data = await self.reader.readexactly(rlen)
            if rtype == NBD_REP_ACK:
                break
            if rtype & (1 << 31):
                self.writer.close()
                raise Refused(f"NBD_OPT_GO refused (reply type {rtype:#x}): "
                              f"{data.decode(errors='replace')}")
            if rtype == NBD_REP_INFO and struct.unpack(">H", data[:2])[0] == NBD_INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", data[2:12])
        self._task = asyncio.create_task(self._replies())

    async def _replies(self) -> None:
        try:
            while True:
                magic, error, cookie = struct.unpack(">IIQ", await self.reader.readexactly(16))
                if magic != NBD_REPLY_MAGIC or cookie not in self.pending:
                    raise Disconnected(f"bad reply (magic {magic:#x}, cookie {cookie})")
                fut, length = self.pending.pop(cookie)
                payload = await self.reader.readexactly(length) if length and not error else b""
                if not fut.done():
                    fut.set_result((error, payload))
        except (asyncio.IncompleteReadError, OSError, Disconnected) as exc:
            self.lost = exc
        finally:
            for fut, _ in self.pending.values():
                if not fut.done():
                    fut.set_exception(Disconnected(str(self.lost)))
                    fut.exception()  # a requester whose send failed no longer waits for it
            self.pending.clear()
            self.writer.close()

    async def request(self, cmd: int, offset: int, length: int, *, flags: int = 0,
                      data: bytes = b"", timeout: float = 60) -> tuple[int, bytes]:
        """Send one request and wait for its reply: (NBD error, read payload)."""
        if self.lost is not None or self._task is None or self._task.done():
            raise Disconnected(str(self.lost))
        self.cookie += 1
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.pending[self.cookie] = (fut, length if cmd == NBD_CMD_READ else 0)
        try:
            self.writer.write(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd,
                                          self.cookie, offset, length) + data)
            await self.writer.drain()
        except OSError as exc:
            raise Disconnected(str(exc)) from exc
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise TimeoutError(f"no reply within {timeout} s") from None

    async def close(self) -> None:
        """NBD_CMD_DISC, then wait until the server closes."""
        if self._task is None:
            return
        if self.lost is None and not self._task.done():
            with contextlib.suppress(OSError):
                self.writer.write(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC,
                                              0, 0, 0))
                await self.writer.drain()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), 10)
        if not self._task.done():
            self._task.cancel()
            self.writer.close()


# --------------------------------------------------------------------------------------
# The load
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    """The run's shared state."""

    args: argparse.Namespace
    stats: Stats
    nbd_sock: str
    qmp_sock: str
    models: dict[str, Model]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    start: float = field(default_factory=time.monotonic)
    counts: dict[str, int] = field(default_factory=dict)
    detach_disconnects: list[float] = field(default_factory=list)
    detach_at: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.start


class NbdLoad:
    """One NBD client: ``depth`` workers on one connection, each on its own blocks."""

    def __init__(self, run: Run, device: str, index: int, first: int, blocks: int,
                 seed: int) -> None:
        self.run, self.device, self.index = run, device, index
        self.first, self.blocks = first, blocks
        self.model = run.models[device]
        self.rng = random.Random(seed)
        self.gen = index << 40  # generations unique per client
        self.conn = NbdClient()
        self.role = "healthy" if device in HEALTHY else device

    def error(self, kind: str) -> None:
        self.run.stats.errors[f"{self.device}: {kind}"] += 1
        self.run.stats.last_error_at[self.device] = round(self.run.now(), 2)

    async def main(self) -> None:
        run = self.run
        try:
            await self.conn.connect(run.nbd_sock, self.device)
        except (Refused, OSError, asyncio.IncompleteReadError) as exc:
            self.error(f"connect failed: {exc}")
            return
        depth = run.args.depth
        span = self.blocks // depth
        await asyncio.gather(*(self.worker(self.first + w * span, span)
                               for w in range(depth)))
        if self.conn.lost is None and not run.stop.is_set():
            return
        if self.conn.lost is not None:
            if self.device == DETACH:
                run.detach_disconnects.append(run.now())
            else:
                self.error("disconnected")
            # Once its export is gone, a new connection must be refused cleanly.
            again = NbdClient()
            try:
                await again.connect(run.nbd_sock, self.device)
                self.error("reconnected to a device that should be gone")
                await again.close()
            except Refused:
                self.error("reconnect refused (export gone)")
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.error(f"reconnect failed uncleanly: {exc!r}")
            return
        with contextlib.suppress(Disconnected, TimeoutError):
            error, _ = await self.conn.request(NBD_CMD_FLUSH, 0, 0,
                                               timeout=run.args.hang_timeout)
            if error:
                self.error(f"final flush {NBD_ERRNO.get(error, error)}")
        await self.conn.close()

    async def worker(self, first: int, span: int) -> None:
        run, rng, stats = self.run, self.rng, self.run.stats
        fua_ok = bool(self.conn.flags & NBD_FLAG_SEND_FUA)
        while not run.stop.is_set():
            r = rng.random()
            try:
                if r < 0.55:
                    count = rng.randint(1, min(8, span))
                    block = first + rng.randrange(span - count + 1)
                    await self.write(block, count, fua_ok and rng.random() < 0.2)
                elif r < 0.95:
                    count = rng.randint(1, min(16, span))
                    block = first + rng.randrange(span - count + 1)
                    await self.read(block, count, "read")
                else:
                    t = time.perf_counter()
                    error, _ = await self.conn.request(NBD_CMD_FLUSH, 0, 0,
                                                       timeout=run.args.hang_timeout)
                    stats.time(f"nbd flush ({self.role})", (time.perf_counter() - t) * 1e3)
                    if error:
                        self.error(f"flush {NBD_ERRNO.get(error, error)}")
            except Disconnected:
                self.error("request without reply at disconnect")
                return
            except TimeoutError:
                stats.hangs += 1
                self.error(f"no reply within {run.args.hang_timeout} s (hang)")
                return

    async def write(self, block: int, count: int, fua: bool) -> None:
        self.gen += 1
        gen = self.gen
        data = b"".join(make_block((block + i) * BLOCK, gen) for i in range(count))
        kind = "write fua" if fua else "write"
        t = time.perf_counter()
        try:
            error, _ = await self.conn.request(
                NBD_CMD_WRITE, block * BLOCK, len(data), data=data,
                flags=NBD_CMD_FLAG_FUA if fua else 0, timeout=self.run.args.hang_timeout)
        except (Disconnected, TimeoutError):
            self.model.unsure(block, count, gen)  # it may or may not have landed
            raise
        self.run.stats.time(f"nbd {kind} ({self.role})", (time.perf_counter() - t) * 1e3)
        if error:
            self.model.unsure(block, count, gen)
            self.error(f"{kind} {NBD_ERRNO.get(error, error)}")
            await self.read(block, count, "read-back after a failed write")
            return
        self.model.ack(block, count, gen)
        await self.read(block, count, "read-back")

    async def read(self, block: int, count: int, where: str) -> None:
        stats = self.run.stats
        t = time.perf_counter()
        error, payload = await self.conn.request(NBD_CMD_READ, block * BLOCK, count * BLOCK,
                                                 timeout=self.run.args.hang_timeout)
        stats.time(f"nbd read ({self.role})", (time.perf_counter() - t) * 1e3)
        if error:
            self.error(f"read {NBD_ERRNO.get(error, error)}")
            return
        view = memoryview(payload)
        for i in range(count):
            stats.blocks_checked += 1
            what = self.model.check(block + i, view[i * BLOCK:(i + 1) * BLOCK])
            if what:
                stats.problem(where, self.device, block + i, what)


async def timed_qmp(run: Run, qmp: QMPClient, cmd: str, args: dict[str, Any] | None = None,
                    *, expect_error: bool = False) -> Any:
    """Execute ``cmd``, time it, count an unexpected error by its class and text."""
    t = time.perf_counter()
    try:
        result = await asyncio.wait_for(qmp.execute(cmd, args), run.args.hang_timeout)
    except ExecuteError as exc:
        run.stats.time(f"qmp {cmd}", (time.perf_counter() - t) * 1e3)
        if not expect_error:
            run.stats.errors[f"qmp {cmd}: {exc.error_class}: {exc}"] += 1
        return None
    except TimeoutError:
        run.stats.hangs += 1
        run.stats.errors[f"qmp {cmd}: no reply within {run.args.hang_timeout} s (hang)"] += 1
        raise
    run.stats.time(f"qmp {cmd}", (time.perf_counter() - t) * 1e3)
    return result


QUERIES = ("query-block", "query-blockstats", "query-named-block-nodes",
           "query-block-exports", "query-status", "blockd-query-limits")


async def qmp_session(run: Run, qmp: QMPClient, index: int, churn_file: Path) -> None:
    """Queries and churn: node, device and export added, used and removed again."""
    rng = random.Random(run.args.seed * 1000 + index)
    cycle = 0
    while not run.stop.is_set():
        try:
            if rng.random() < 0.6:
                await timed_qmp(run, qmp, rng.choice(QUERIES))
            else:
                cycle += 1
                await churn(run, qmp, rng, f"c{index}x{cycle}", churn_file)
        except (TimeoutError, OSError, EOFError) as exc:
            run.stats.errors[f"qmp session lost: {exc!r}"] += 1
            return
        except Exception as exc:  # qemu.qmp raises its own connection errors
            run.stats.errors[f"qmp session lost: {type(exc).__name__}: {exc}"] += 1
            return
        await asyncio.sleep(rng.uniform(0, run.args.qmp_think))


async def churn(run: Run, qmp: QMPClient, rng: random.Random, name: str,
                churn_file: Path) -> None:
    node, dev, exp = f"{name}n", f"{name}d", f"{name}e"
    if rng.random() < 0.5:
        opts: dict[str, Any] = {"driver": "null-co", "node-name": node, "size": MiB}
    else:
        opts = {"driver": "file", "node-name": node, "filename": str(churn_file)}
    if await timed_qmp(run, qmp, "blockdev-add", opts) is None:
        return
    await timed_qmp(run, qmp, "device_add", {"driver": "hd", "id": dev, "drive": node})
    await timed_qmp(run, qmp, "block-export-add",
                    {"type": "nbd", "id": exp, "node-name": node, "name": exp,
                     "writable": rng.random() < 0.5})
    hard = False
    if rng.random() < 0.3:
        # Use the new export once, as a client would, then leave.
        client = NbdClient()
        t = time.perf_counter()
        try:
            await client.connect(run.nbd_sock, exp)
            error, _ = await client.request(NBD_CMD_READ, 0, BLOCK,
                                            timeout=run.args.hang_timeout)
            if error:
                run.stats.errors[f"churn export read {NBD_ERRNO.get(error, error)}"] += 1
            await client.close()
        except (Refused, Disconnected, OSError, asyncio.IncompleteReadError) as exc:
            run.stats.errors[f"churn export: {exc!r}"] += 1
            hard = True
        run.stats.time("nbd churn connect+read+close", (time.perf_counter() - t) * 1e3)
    await timed_qmp(run, qmp, "block-export-del", {"id": exp, "mode": "hard" if hard else "safe"})
    await timed_qmp(run, qmp, "device_del", {"id": dev})
    await timed_qmp(run, qmp, "blockdev-del", {"node-name": node})


# --------------------------------------------------------------------------------------
# Faults and sampling
# --------------------------------------------------------------------------------------


def fd_kinds(pid: int) -> Counter[str]:
    """What blockd's descriptors point at, by kind (socket, pipe, a file path, ...)."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target.split(":[")[0] if ":[" in target else target] += 1
    return kinds


def proc_sample(pid: int) -> dict[str, Any]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


async def sampler(run: Run, pid: int, phase: list[str]) -> None:
    while True:
        with contextlib.suppress(OSError, KeyError):
            run.stats.samples.append({"t": round(run.now(), 2), "phase": phase[0],
                                      **proc_sample(pid)})
        await asyncio.sleep(0.5)


def remount(mountpoint: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size // 1024}k", str(mountpoint)],
                   check=True)


@dataclass
class Faults:
    """The fault plan and what it saw."""

    loop_detach: str
    report_mount: Path
    report_full: int
    stop_mount: Path
    stop_full: int
    stop_size: int
    stop_step: int
    deleted: asyncio.Event = field(default_factory=asyncio.Event)
    io_stop: asyncio.Event = field(default_factory=asyncio.Event)
    cycles: list[dict[str, float]] = field(default_factory=list)
    detach: dict[str, Any] = field(default_factory=dict)


def event_filter(run: Run, faults: Faults) -> Any:
    """Count every event the control session gets and act on the two the faults wait for.

    It accepts nothing: a qemu.qmp listener keeps a history of every event it accepted,
    which under this load grows by megabytes a second.
    """
    def seen(event: dict[str, Any]) -> bool:
        name, data = event["event"], event.get("data", {})
        device = data.get("device") or data.get("id") or ""
        own = not str(device).startswith("c")  # churn names start with c<session>x
        run.stats.events[f"{name} {device}" if own else f"{name} (churn)"] += 1
        if name == "DEVICE_DELETED" and device == DETACH:
            faults.deleted.set()
        if name == "BLOCK_IO_ERROR" and device == ENOSPC_STOP and data.get("action") == "stop":
            faults.io_stop.set()
        return False
    return seen


async def detach_fault(run: Run, qmp: QMPClient, faults: Faults, clients: int) -> None:
    await asyncio.sleep(max(0.0, run.args.duration * 0.3 - run.now()))
    run.detach_at = run.now()
    subprocess.run(["losetup", "-d", faults.loop_detach], check=True)
    t = time.monotonic()
    info = faults.detach
    info["at_s"] = round(run.detach_at, 2)
    try:
        await asyncio.wait_for(faults.deleted.wait(), 30)
        info["device_deleted_after_s"] = round(time.monotonic() - t, 3)
    except TimeoutError:
        info["device_deleted_after_s"] = None
        run.stats.hangs += 1
    deadline = time.monotonic() + 30
    while len(run.detach_disconnects) < clients and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    info["clients_disconnected"] = len(run.detach_disconnects)
    if run.detach_disconnects:
        info["last_client_disconnected_after_s"] = round(
            max(run.detach_disconnects) - run.detach_at, 3)
    blocks = await timed_qmp(run, qmp, "query-block")
    info["gone_from_query_block"] = blocks is not None and all(
        b["device"] != DETACH for b in blocks)


async def enospc_faults(run: Run, qmp: QMPClient, faults: Faults) -> None:
    """Grow the report device's tmpfs at 60 %; free space and ``cont`` at each pause."""
    hold = min(5.0, max(1.0, run.args.duration / 40))
    report_at = run.args.duration * 0.6
    grown = False
    while not run.stop.is_set():
        if not grown and run.now() >= report_at:
            remount(faults.report_mount, faults.report_full)
            run.stats.notes["enospc_report_grown_at_s"] = round(run.now(), 2)
            grown = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(faults.io_stop.wait(), 0.25)
        blocks = await timed_qmp(run, qmp, "query-block")
        status = {b["device"]: b.get("io-status") for b in blocks or ()}
        if status.get(ENOSPC_STOP) != "nospace":
            faults.io_stop.clear()
            continue
        paused = time.monotonic()
        await asyncio.sleep(hold)  # the device stays paused, its requests held
        await resume(run, qmp, faults, paused)


async def resume(run: Run, qmp: QMPClient, faults: Faults, paused: float) -> None:
    faults.stop_size = min(faults.stop_full, faults.stop_size + faults.stop_step)
    remount(faults.stop_mount, faults.stop_size)
    faults.io_stop.clear()
    await timed_qmp(run, qmp, "cont")
    faults.cycles.append({"at_s": round(run.now(), 2),
                          "paused_s": round(time.monotonic() - paused, 2),
                          "tmpfs_mib": round(faults.stop_size / MiB, 2)})


# --------------------------------------------------------------------------------------
# Setup, the run, the verification
# --------------------------------------------------------------------------------------


class Cleanup:
    """What the run created, undone in reverse order whatever happens."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Any]] = []

    def add(self, what: str, fn: Any) -> None:
        self.steps.append((what, fn))

    def run(self) -> None:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            while self.steps:
                what, fn = self.steps.pop()
                try:
                    fn()
                except Exception as exc:  # every step is tried
                    print(f"load_faults: cleanup: {what}: {exc}", file=sys.stderr)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def log(msg: str) -> None:
    print(f"load_faults: {msg}", file=sys.stderr, flush=True)


def losetup(image: Path) -> str:
    return subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True,
                          text=True, check=True).stdout.strip()


def detach_loop(dev: str, image: Path) -> None:
    """``losetup -d`` of ``dev``, only while it is still bound to ``image``."""
    backing = Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file")
    with contextlib.suppress(OSError):
        if backing.read_text().strip() == str(image):
            subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


def split_clients(n: int) -> dict[str, int]:
    counts = {dev: max(1, int(n * share)) for dev, share in SHARES.items()}
    while sum(counts.values()) > n:
        biggest = max(counts, key=lambda d: counts[d])
        counts[biggest] -= 1
    while sum(counts.values()) < n:
        counts["file0"] += 1
    return counts


def sized(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@dataclass
class Setup:
    work: Path
    images: dict[str, Path]
    loops: dict[str, str]
    faults: Faults
    counts: dict[str, int]
    proc: subprocess.Popen[bytes] | None = None
    stderr_path: Path | None = None


def prepare(args: argparse.Namespace, cleanup: Cleanup) -> Setup:
    work = Path(tempfile.mkdtemp(prefix="load-faults-", dir="/var/tmp"))
    cleanup.add(f"remove {work}", lambda: shutil.rmtree(work, ignore_errors=True))
    counts = split_clients(args.nbd_clients)
    region = args.region_blocks * BLOCK
    images: dict[str, Path] = {}
    loops: dict[str, str] = {}
    for dev in ("file0", "loop0", DETACH):
        images[dev] = sized(work / f"{dev}.img", counts[dev] * region)
    mounts = {}
    for dev in (ENOSPC_REPORT, ENOSPC_STOP):
        mnt = work / f"tmpfs-{dev}"
        mnt.mkdir()
        size = counts[dev] * region
        initial = max(64 * 1024, (size // (4 if dev == ENOSPC_REPORT else 8)) // 4096 * 4096)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={initial // 1024}k", "tmpfs",
                        str(mnt)], check=True)
        cleanup.add(f"umount {mnt}",
                    lambda m=mnt: subprocess.run(["umount", "-l", str(m)], check=False))
        images[dev] = sized(mnt / "disk.img", size)
        mounts[dev] = (mnt, size, initial)
    for dev in ("loop0", DETACH):
        loops[dev] = losetup(images[dev])
        cleanup.add(f"losetup -d {loops[dev]}",
                    lambda d=loops[dev], i=images[dev]: detach_loop(d, i))
    report_mnt, report_size, _ = mounts[ENOSPC_REPORT]
    stop_mnt, stop_size, stop_initial = mounts[ENOSPC_STOP]
    faults = Faults(loop_detach=loops[DETACH], report_mount=report_mnt,
                    report_full=report_size + MiB, stop_mount=stop_mnt,
                    stop_full=stop_size + MiB, stop_size=stop_initial,
                    stop_step=max(64 * 1024, stop_size // 8 // 4096 * 4096))
    return Setup(work, images, loops, faults, counts)


def start_blockd(args: argparse.Namespace, setup: Setup, cleanup: Cleanup) -> tuple[str, str]:
    work = setup.work
    qmp_sock, nbd_sock = str(work / "qmp.sock"), str(work / "nbd.sock")
    conf = work / "blockd.toml"
    conf.write_text(
        "[[hotplug.rule]]\n"
        'name = "load-faults-detach"\n'
        f'match = {{ SUBSYSTEM = "block", "ATTR{{loop/backing_file}}" = '
        f'"{setup.images[DETACH]}" }}\n'
        f'driver = "host_device"\nread-only = false\nid = "{DETACH}"\n'
        f'export = {{ name = "{DETACH}", writable = true }}\n')
    argv = [sys.executable, "-m", "blockd", "--metrics", "none", "--qmp", qmp_sock,
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock},max-connections=0",
            "--config", str(conf)]
    specs = {"file0": ("file", setup.images["file0"], ""),
             "loop0": ("host_device", setup.loops["loop0"], ""),
             ENOSPC_REPORT: ("file", setup.images[ENOSPC_REPORT], ",werror=report"),
             ENOSPC_STOP: ("file", setup.images[ENOSPC_STOP], ",werror=enospc")}
    for dev, (driver, filename, policy) in specs.items():
        argv += ["--blockdev", f"driver={driver},node-name={dev}n,filename={filename}",
                 "--device", f"hd,id={dev},drive={dev}n{policy}",
                 "--export", f"type=nbd,id={dev},node-name={dev}n,name={dev},writable=on"]
    pidfile = work / "blockd.pid"
    setup.stderr_path = work / "blockd.stderr"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    with open(setup.stderr_path, "wb") as err:
        setup.proc = subprocess.Popen([*argv, "--pidfile", str(pidfile)], stdout=err,
                                      stderr=err, env=env, cwd=work)
    proc = setup.proc

    def stop_daemon() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    cleanup.add("stop blockd", stop_daemon)
    deadline = time.monotonic() + 30
    while not pidfile.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"blockd did not start: {setup.stderr_path.read_text()}")
        time.sleep(0.05)
    return qmp_sock, nbd_sock


async def wait_for_detach_device(qmp_sock: str) -> None:
    qmp = QMPClient("load-faults-setup")
    await qmp.connect(qmp_sock)
    try:
        deadline = time.monotonic() + 20
        while True:
            exports = await qmp.execute("query-block-exports")
            if any(e["id"] == DETACH for e in exports):  # type: ignore[union-attr]
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the hotplug rule did not attach the loop device")
            await asyncio.sleep(0.1)
    finally:
        await qmp.disconnect()


async def settle_samples(pid: int, count: int = 4) -> dict[str, int]:
    got = []
    for _ in range(count):
        got.append(proc_sample(pid))
        await asyncio.sleep(0.5)
    return {k: sorted(s[k] for s in got)[len(got) // 2] for k in got[0]}


async def verify_exports(run: Run, devices: list[str]) -> dict[str, int]:
    """Read every block of each device through a fresh NBD connection."""
    checked = {}
    for dev in devices:
        model = run.models[dev]
        client = NbdClient()
        await client.connect(run.nbd_sock, dev)
        blocks = len(model.acked)
        step = 64
        for first in range(0, blocks, step):
            count = min(step, blocks - first)
            error, payload = await client.request(NBD_CMD_READ, first * BLOCK, count * BLOCK,
                                                  timeout=run.args.hang_timeout)
            if error:
                run.stats.problem("final NBD read", dev, first,
                                  f"read failed: {NBD_ERRNO.get(error, error)}")
                continue
            for i in range(count):
                what = model.check(first + i, payload[i * BLOCK:(i + 1) * BLOCK])
                if what:
                    run.stats.problem("final NBD read", dev, first + i, what)
        await client.close()
        checked[dev] = blocks
    return checked


def verify_backing(run: Run, images: dict[str, Path]) -> dict[str, int]:
    """Read every block of each device's backing file, blockd gone."""
    checked = {}
    for dev, image in images.items():
        model = run.models[dev]
        with open(image, "rb") as f:
            data = f.read()
        blocks = len(model.acked)
        if len(data) < blocks * BLOCK:
            run.stats.problem("backing file", dev, len(data) // BLOCK, "backing file short")
            continue
        for b in range(blocks):
            what = model.check(b, data[b * BLOCK:(b + 1) * BLOCK])
            if what:
                run.stats.problem("backing file", dev, b, what)
        checked[dev] = blocks
    return checked


async def run_load(args: argparse.Namespace, setup: Setup, qmp_sock: str,
                   nbd_sock: str) -> dict[str, Any]:
    assert setup.proc is not None
    pid = setup.proc.pid
    stats = Stats()
    counts = setup.counts
    models = {dev: Model(dev, counts[dev] * args.region_blocks) for dev in counts}
    run = Run(args, stats, nbd_sock, qmp_sock, models, counts=dict(counts))
    await wait_for_detach_device(qmp_sock)
    await asyncio.sleep(1)
    phase = ["start"]
    start = await settle_samples(pid)
    start_fds = fd_kinds(pid)
    log(f"blockd pid {pid}: RSS {start['rss_kib'] // 1024} MiB, {start['fds']} fds; "
        f"connecting {args.nbd_clients} NBD clients and {args.qmp_sessions} QMP sessions")
    sample_task = asyncio.create_task(sampler(run, pid, phase))

    sessions: list[QMPClient] = []
    churn_dir = setup.work / "churn"
    churn_dir.mkdir()
    for i in range(args.qmp_sessions):
        qmp = QMPClient(f"load-faults-{i}")
        await qmp.connect(qmp_sock)
        # Every session gets every event; the default listener would queue them all.
        qmp.events.event_filter = lambda event: False
        sessions.append(qmp)
    ctl = sessions[0]
    faults = setup.faults
    ctl.register_listener(EventListener(event_filter=event_filter(run, faults)))

    clients: list[NbdLoad] = []
    for dev, n in counts.items():
        for k in range(n):
            clients.append(NbdLoad(run, dev, len(clients), k * args.region_blocks,
                                   args.region_blocks, args.seed * 7919 + len(clients)))
    run.start = time.monotonic()
    phase[0] = "load"
    nbd_tasks = [asyncio.create_task(c.main()) for c in clients]
    qmp_tasks = [asyncio.create_task(qmp_session(run, s, i, sized(churn_dir / f"s{i}.img", MiB)))
                 for i, s in enumerate(sessions)]
    fault_tasks = [asyncio.create_task(detach_fault(run, ctl, faults, counts[DETACH])),
                   asyncio.create_task(enospc_faults(run, ctl, faults))]
    next_log = 10.0
    while run.now() < args.duration:
        await asyncio.sleep(min(1.0, args.duration - run.now()))
        if run.now() >= next_log:
            last = stats.samples[-1] if stats.samples else {}
            done = sum(len(v) for k, v in stats.latency.items() if k.startswith("nbd "))
            log(f"{run.now():.0f} s: {done:,} NBD requests, RSS "
                f"{last.get('rss_kib', 0) // 1024} MiB, {last.get('fds')} fds, "
                f"{stats.problem_count} problems, {stats.hangs} hangs")
            next_log += 10
    log("stopping the load")
    run.stop.set()
    phase[0] = "stopping"
    for task in fault_tasks:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, args.hang_timeout)
    # A pause at the very end: give the space back so held requests finish.
    blocks = await timed_qmp(run, ctl, "query-block")
    if any(b["device"] == ENOSPC_STOP and b.get("io-status") == "nospace" for b in blocks or ()):
        faults.stop_step = faults.stop_full
        await resume(run, ctl, faults, time.monotonic())
    _, pending = await asyncio.wait(nbd_tasks + qmp_tasks, timeout=args.hang_timeout + 30)
    for task in pending:
        stats.hangs += 1
        stats.errors["client task never finished (hang)"] += 1
        task.cancel()
    for task in nbd_tasks + qmp_tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            stats.errors[f"client crashed: {task.exception()!r}"] += 1
    for qmp in sessions:
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    phase[0] = "after"
    await asyncio.sleep(2)
    after = await settle_samples(pid)
    after_fds = fd_kinds(pid)
    stats.notes["pipe_fds"] = {"start": start_fds["pipe"], "after": after_fds["pipe"]}
    stats.notes["fds_added"] = dict(after_fds - start_fds)
    stats.notes["fds_removed"] = dict(start_fds - after_fds)
    sample_task.cancel()
    log(f"clients gone: RSS {after['rss_kib'] // 1024} MiB, {after['fds']} fds; verifying")

    alive = setup.proc.poll() is None
    final: dict[str, Any] = {"alive_after_load": alive}
    exports_checked = await verify_exports(
        run, [*HEALTHY, ENOSPC_REPORT, ENOSPC_STOP]) if alive else {}
    final["exports_checked_blocks"] = exports_checked
    if alive:
        qmp = QMPClient("load-faults-final")
        await qmp.connect(qmp_sock)
        status = await qmp.execute("query-status")
        blocks = await qmp.execute("query-block")
        final["query_status"] = status
        final["devices_at_end"] = {b["device"]: b.get("io-status", "-")
                                   for b in blocks}  # type: ignore[union-attr]
        await qmp.execute("quit")
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    try:
        final["exit_code"] = await asyncio.to_thread(setup.proc.wait, 30)
    except subprocess.TimeoutExpired:
        final["exit_code"] = None
        stats.hangs += 1
    # blockd is gone: the loop devices can go too, then read the backing files.
    detach_loop(setup.loops["loop0"], setup.images["loop0"])
    final["backing_checked_blocks"] = verify_backing(run, setup.images)
    return {"run": run, "start": start, "after": after, "final": final, "faults": faults}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def verdicts(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    run: Run = out["run"]
    stats, final, faults = run.stats, out["final"], out["faults"]
    start, after = out["start"], out["after"]
    errs = stats.errors
    healthy_errs = {k: v for k, v in errs.items() if k.split(":")[0] in HEALTHY}
    enospc_errs = {k: v for k, v in errs.items()
                   if k.split(":")[0] in (ENOSPC_REPORT, ENOSPC_STOP)}
    unclean_enospc = {k: v for k, v in enospc_errs.items() if "ENOSPC" not in k}
    detach_errs = {k: v for k, v in errs.items() if k.startswith(DETACH)}
    qmp_errs = {k: v for k, v in errs.items() if k.startswith("qmp") or k.startswith("churn")}
    stop_errs = {k: v for k, v in enospc_errs.items() if k.startswith(ENOSPC_STOP)}
    report_last = stats.last_error_at.get(ENOSPC_REPORT, 0.0)
    grown_at = stats.notes.get("enospc_report_grown_at_s", 0.0)
    reported_enospc = sum(v for k, v in enospc_errs.items() if k.startswith(ENOSPC_REPORT))
    all_blocks = sum(len(m.acked) for m in run.models.values())
    backing = final.get("backing_checked_blocks", {})
    exports = final.get("exports_checked_blocks", {})
    rss_growth = (after["rss_kib"] - start["rss_kib"]) / 1024
    pipes = stats.notes["pipe_fds"]
    v = {
        "no-lost-write": {
            "ok": stats.problem_count == 0 and sum(backing.values()) == all_blocks
            and sum(exports.values()) == all_blocks - len(run.models[DETACH].acked),
            "problems": stats.problem_count, "blocks checked in the run": stats.blocks_checked,
            "blocks checked through a fresh connection": sum(exports.values()),
            "blocks checked in the backing files": sum(backing.values())},
        "no-hang": {"ok": stats.hangs == 0, "hangs": stats.hangs},
        "daemon-alive": {
            "ok": bool(final.get("alive_after_load")) and final.get("exit_code") == 0
            and final.get("query_status", {}).get("running") is True,
            "query-status": final.get("query_status"), "exit code after quit":
            final.get("exit_code")},
        "healthy-devices-clean": {"ok": not healthy_errs, "errors": healthy_errs},
        "faulted-requests-clean": {
            "ok": not unclean_enospc and reported_enospc > 0 and not stop_errs
            and report_last <= grown_at + 1
            and faults.detach.get("clients_disconnected") == run.counts[DETACH]
            and faults.detach.get("gone_from_query_block") is True
            and not any("uncleanly" in k or "should be gone" in k for k in detach_errs),
            "enospc errors": enospc_errs, "detach": faults.detach,
            "last ENOSPC on the report device s": report_last,
            "its tmpfs grown at s": grown_at,
            "detach client errors": detach_errs},
        "enospc-stop-cycles": {"ok": len(faults.cycles) > 0
                               and final.get("devices_at_end", {}).get(ENOSPC_STOP) == "ok",
                               "cycles": len(faults.cycles)},
        "qmp-clean": {"ok": not qmp_errs, "errors": qmp_errs},
        # The splice pipes (blockd/aio/pipes.py) are a pool kept for reuse, bounded at
        # PIPE_POOL_FDS descriptors: counted apart from everything else.
        "fds-back": {"ok": after["fds"] - pipes["after"] <= start["fds"] - pipes["start"]
                     + args.fd_margin and pipes["after"] <= PIPE_POOL_FDS,
                     "start": start["fds"], "after": after["fds"], "margin": args.fd_margin,
                     "pipe fds start": pipes["start"], "pipe fds after": pipes["after"]},
        "rss-back": {"ok": rss_growth <= args.rss_margin_mib,
                     "start MiB": round(start["rss_kib"] / 1024, 1),
                     "after MiB": round(after["rss_kib"] / 1024, 1),
                     "margin MiB": args.rss_margin_mib},
    }
    return v


def summary(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    run: Run = out["run"]
    stats = run.stats
    during = [s for s in stats.samples if s["phase"] in ("load", "stopping")]
    peak = {k: max((s[k] for s in during), default=0) for k in ("rss_kib", "fds", "threads")}
    nbd_total = sum(len(v) for k, v in stats.latency.items() if k.startswith("nbd "))
    qmp_total = sum(len(v) for k, v in stats.latency.items() if k.startswith("qmp "))
    return {
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "clients_per_device": run.counts,
        "requests": {"nbd": nbd_total, "qmp": qmp_total,
                     "nbd_per_s": round(nbd_total / args.duration)},
        "latency_ms": {k: {m: round(x, 3) for m, x in percentiles(v).items()}
                       for k, v in sorted(stats.latency.items())},
        "errors": dict(stats.errors.most_common()),
        "events": dict(stats.events.most_common()),
        "problems": stats.problems,
        "daemon": {"start": out["start"], "peak": peak, "after": out["after"]},
        "faults": {"detach": out["faults"].detach, "enospc_stop_cycles": out["faults"].cycles,
                   **stats.notes},
        "final": out["final"],
        "samples": stats.samples,
        "verdicts": verdicts(args, out),
    }


def print_report(s: dict[str, Any]) -> None:
    o = s["options"]
    print(f"load with faults: {o['duration']:g} s, {o['nbd_clients']} NBD clients "
          f"({o['depth']} requests in flight each), {o['qmp_sessions']} QMP sessions")
    print("clients per device: " + ", ".join(f"{d} {n}" for d, n in
                                             s["clients_per_device"].items()))
    r = s["requests"]
    print(f"requests: NBD {r['nbd']:,} ({r['nbd_per_s']:,}/s), QMP {r['qmp']:,}")
    print(f"\n{'latency ms':44} {'n':>9} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>9}")
    for kind, p in s["latency_ms"].items():
        print(f"{kind:44} {p['n']:>9,} {p['p50']:>8.2f} {p['p99']:>8.2f} "
              f"{p['p99.9']:>8.2f} {p['max']:>9.2f}")
    print("\nerrors by kind:" + ("" if s["errors"] else " none"))
    for kind, n in s["errors"].items():
        print(f"  {n:>8,}  {kind}")
    print("events: " + ", ".join(f"{k} {n:,}" for k, n in s["events"].items()))
    f = s["faults"]
    d = f["detach"]
    print(f"loop detach: losetup -d at {d.get('at_s')} s, DEVICE_DELETED after "
          f"{d.get('device_deleted_after_s')} s, {d.get('clients_disconnected')} clients "
          f"disconnected (last after {d.get('last_client_disconnected_after_s')} s), "
          f"gone from query-block: {d.get('gone_from_query_block')}")
    cycles = f["enospc_stop_cycles"]
    print(f"enospc stop/cont: {len(cycles)} cycles" + (
        f", paused {min(c['paused_s'] for c in cycles):.1f}-"
        f"{max(c['paused_s'] for c in cycles):.1f} s each" if cycles else ""))
    dm = s["daemon"]
    print("daemon            start    peak   after")
    mib = {k: dm[k]["rss_kib"] / 1024 for k in ("start", "peak", "after")}
    print(f"  RSS MiB     {mib['start']:>9.1f} {mib['peak']:>7.1f} {mib['after']:>7.1f}")
    print(f"  fds         {dm['start']['fds']:>9} {dm['peak']['fds']:>7} {dm['after']['fds']:>7}")
    print(f"  threads     {dm['start']['threads']:>9} {dm['peak']['threads']:>7} "
          f"{dm['after']['threads']:>7}")
    for p in s["problems"][:10]:
        print(f"PROBLEM {p['where']}: {p['device']} offset {p['offset']}: {p['what']}")
    print("\nverdicts:")
    for name, v in s["verdicts"].items():
        detail = {k: x for k, x in v.items() if k != "ok"}
        print(f"  {'ok  ' if v['ok'] else 'FAIL'}  {name}: {json.dumps(detail, default=str)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300, help="seconds of load")
    parser.add_argument("--nbd-clients", type=int, default=64)
    parser.add_argument("--qmp-sessions", type=int, default=64,
                        help="QMP sessions (blockd allows 64 at most); the first also "
                        "drives the faults")
    parser.add_argument("--depth", type=int, default=4, help="requests in flight per client")
    parser.add_argument("--region-blocks", type=int, default=256,
                        help="4 KiB blocks each NBD client owns")
    parser.add_argument("--qmp-think", type=float, default=0.2,
                        help="a QMP session pauses up to this many seconds between commands")
    parser.add_argument("--hang-timeout", type=float, default=60,
                        help="a request without reply after this long is a hang")
    parser.add_argument("--fd-margin", type=int, default=4,
                        help="descriptors blockd may hold above its start after the load")
    parser.add_argument("--rss-margin-mib", type=float, default=64,
                        help="RSS growth allowed from start to after the load")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="write the full results there ('-': "
                        "stdout, instead of the report)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (loop devices, tmpfs mounts)")
    if args.nbd_clients < len(SHARES) or args.qmp_sessions < 1:
        parser.error(f"needs at least {len(SHARES)} NBD clients and one QMP session")
    if args.region_blocks < 8 * args.depth:
        parser.error("--region-blocks must be at least 8 x --depth")

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    cleanup = Cleanup()
    try:
        setup = prepare(args, cleanup)
        qmp_sock, nbd_sock = start_blockd(args, setup, cleanup)
        out = asyncio.run(run_load(args, setup, qmp_sock, nbd_sock))
        s = summary(args, out)
        if setup.stderr_path is not None:
            s["blockd_stderr_tail"] = setup.stderr_path.read_text(errors="replace")[-4000:]
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        cleanup.run()
    if args.json:
        text = json.dumps(s, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    if args.json != "-":
        print_report(s)
    return 0 if all(v["ok"] for v in s["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
