"""Bounds against storage that stops answering (hardening issue, items 1 and 2).

The storage is a real FUSE file system served by this test (tests/fusefs.py), which
can leave reads or lookups unanswered: blockd's threads then wait in the kernel,
uninterruptibly, as they would on a dead NFS server.  Proven here: one such device
holds at most its in-flight cap of I/O threads and another device is still served;
an open that hangs fails after the open timeout without holding a control thread,
the opens that hang are bounded, and one that completes late is closed; shutdown
(QMP quit or SIGTERM) ends within its bound whatever is stuck; the ``[limits]``
table sets the bounds and blockd-query-limits reports them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import LoopFactory, drop_cache
from daemons import BlockdFactory, DaemonProcess
from fusefs import FuseFs, fuse_available, mounted_fuse
from nbdwire import CMD_FLUSH, CMD_READ, CMD_WRITE, SIMPLE_MAGIC, request_bytes
from qemu.qmp import ExecuteError, QMPClient

MiB = 1 << 20
IHAVEOPT = b"IHAVEOPT"
OPT_GO, REP_ACK, REP_INFO = 7, 1, 3


@pytest.fixture
def fuse(tmp_path: Path) -> Any:
    why = fuse_available()
    if why is not None:
        pytest.skip(why)

    def mount(files: dict[str, int]) -> Any:
        return mounted_fuse(tmp_path / "fuse", files)

    return mount


class Nbd:
    """Just enough of an NBD client to send a burst and never read the replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str, export: bytes | None) -> Nbd:
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        await client.read(18)
        if export is not None:
            writer.write(struct.pack(">I", 3) + IHAVEOPT + struct.pack(
                ">II", OPT_GO, 4 + len(export) + 2) + struct.pack(">I", len(export))
                + export + struct.pack(">H", 0))
            while True:
                _, _, reply, length = struct.unpack(">QIII", await client.read(20))
                await client.read(length)
                if reply != REP_INFO:
                    assert reply == REP_ACK, reply
                    break
        return client

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), 10)

    def reads(self, first_cookie: int, offsets: list[int], length: int = 4096) -> None:
        self.writer.write(b"".join(request_bytes(CMD_READ, first_cookie + n, offset, length)
                                   for n, offset in enumerate(offsets)))

    def flushes(self, cookies: range) -> None:
        self.writer.write(b"".join(request_bytes(CMD_FLUSH, cookie, 0, 0) for cookie in cookies))

    def write(self, cookie: int, offset: int, data: bytes) -> None:
        self.writer.write(request_bytes(CMD_WRITE, cookie, offset, len(data), payload=data))

    async def reply(self, length: int) -> tuple[int, int]:
        magic, error, cookie = struct.unpack(">IIQ", await self.read(16))
        assert magic == SIMPLE_MAGIC
        if not error:
            await self.read(length)
        return error, cookie


def _limits_config(tmp_path: Path, **limits: float) -> str:
    path = tmp_path / "limits.toml"
    path.write_text("[limits]\n" + "".join(f"{k.replace('_', '-')} = {v}\n"
                                           for k, v in limits.items()))
    return str(path)


async def _limits(qmp: QMPClient) -> dict[str, Any]:
    result = await qmp.execute("blockd-query-limits")
    assert isinstance(result, dict)
    return result


def _fds_into(pid: int, directory: Path) -> list[str]:
    """The daemon's descriptors open on files under ``directory`` (read as link text,
    so the FUSE mount itself is never touched)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def _exit_within(d: DaemonProcess, seconds: float) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        code = d.proc.wait(seconds)
    except Exception:
        raise AssertionError(f"blockd still runs {seconds} s after being told to stop:\n"
                             f"{d.stderr()}") from None
    return code, time.monotonic() - t0


async def test_a_device_whose_storage_hangs_holds_only_its_cap_and_others_are_served(
    blockd_factory: BlockdFactory, tmp_path: Path, fuse: Any
) -> None:
    """300 reads on a device whose storage never answers: without the per-device cap
    they took every I/O thread (256) and another device's reads waited for ever; with
    it, the stuck device holds 16 and the other is served.  The cap hit is counted (QMP
    and metrics), logged once for the burst, and quit still ends within its bound."""
    fast = tmp_path / "fast.img"
    fast.write_bytes(b"\x5a" * MiB)
    drop_cache(fast)  # its read must go to an I/O thread, not come from the page cache
    sock = str(tmp_path / "nbd.sock")
    with fuse({"slow.img": 64 * MiB}) as fs:
        d = blockd_factory(
            "--blockdev", f"driver=file,node-name=slow,filename={fs.path('slow.img')},"
                          "read-only=on",
            "--blockdev", f"driver=file,node-name=fast,filename={fast}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=slow,node-name=slow,name=slow",
            "--export", "type=nbd,id=fast,node-name=fast,name=fast",
            "--config", _limits_config(tmp_path, device_in_flight=16, shutdown_timeout=3),
            metrics="127.0.0.1:0")
        fs.hold("read")
        stuck = [await Nbd.connect(sock, b"slow") for _ in range(3)]
        for n, client in enumerate(stuck):  # 100 each: under the NBD client cap of 128
            client.reads(0, [(n * 100 + i) * 128 * 1024 for i in range(100)])
        assert await asyncio.to_thread(fs.wait_held, "read", 1, 10), d.stderr()
        other = await Nbd.connect(sock, b"fast")
        other.reads(7, [0])
        try:
            assert await asyncio.wait_for(other.reply(4096), 10) == (0, 7)
        except TimeoutError:
            raise AssertionError("the other device was not served") from None
        qmp = await d.client()
        report = await _limits(qmp)
        assert report["limits"]["device-in-flight"] == 16
        assert report["hits"]["device-in-flight"] >= 300 - 16
        with urllib.request.urlopen(d.metrics_url, timeout=10) as response:
            metrics = response.read().decode()
        assert f'blockd_limit_hits_total{{limit="device-in-flight"}} ' \
               f'{float(report["hits"]["device-in-flight"])}' in metrics
        assert d.stderr().count("more wait their turn") == 1, d.stderr()
        # quit with 16 reads stuck in the kernel and 284 waiting behind them.
        await qmp.execute("quit")
        code, took = _exit_within(d, 3 + 10)
        assert code == 0, d.stderr()
        assert "left behind" in d.stderr() and "I/O still running on slow" in d.stderr()
        print(f"quit took {took:.1f} s with stuck I/O (bound 3 s)")


async def test_flushes_that_never_return_hold_up_no_other_device(
    blockd_factory: BlockdFactory, tmp_path: Path, fuse: Any, loop_device: LoopFactory
) -> None:
    """Flushes of a file whose fsync never returns wait in the kernel's io-wq workers,
    which every device's writes to block devices (and every flush) share: 4 per CPU
    of them once took them all, and another device's write waited for ever, and then
    quit did, in the ring's close.  Now each stuck request holds a worker of its own,
    and the ring is given up at shutdown."""
    flushes = 4 * (os.cpu_count() or 1) + 8  # more than the kernel's default cap
    fast = str(loop_device(size=16 * MiB))
    sock = str(tmp_path / "nbd.sock")
    with fuse({"slow.img": 16 * MiB}) as fs:
        d = blockd_factory(
            "--blockdev", f"driver=file,node-name=slow,filename={fs.path('slow.img')},"
                          "locking=off",
            "--blockdev", f"driver=host_device,node-name=fast,filename={fast}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=slow,node-name=slow,name=slow,writable=on",
            "--export", "type=nbd,id=fast,node-name=fast,name=fast,writable=on",
            "--config", _limits_config(tmp_path, shutdown_timeout=3,
                                       device_in_flight=flushes + 8))
        fs.hold("fsync")
        stuck = await Nbd.connect(sock, b"slow")
        stuck.flushes(range(flushes))
        assert await asyncio.to_thread(fs.wait_held, "fsync", 1, 10), d.stderr()
        await asyncio.sleep(0.5)  # let them all reach the kernel
        other = await Nbd.connect(sock, b"fast")
        other.write(7, 0, b"\xa5" * 4096)
        try:
            assert await asyncio.wait_for(other.reply(0), 10) == (0, 7)
        except TimeoutError:
            raise AssertionError(f"the other device's write was not answered "
                                 f"({fs.held('fsync')} flushes held)") from None
        qmp = await d.client()
        await qmp.execute("quit")
        code, _ = _exit_within(d, 3 + 10)
        assert code == 0, d.stderr()
        for client in (stuck, other):
            client.writer.close()
    with open(fast, "rb") as f:
        assert f.read(4096) == b"\xa5" * 4096


async def test_an_open_that_hangs_times_out_and_never_takes_the_control_path_down(
    blockd_factory: BlockdFactory, tmp_path: Path, fuse: Any
) -> None:
    """blockdev-add on storage that never answers held a control thread for ever (8 of
    them blocked every later control command).  Now it fails after the open timeout with
    the path in the error, other commands go on, 16 stuck opens at most (then refused at
    once), and an open that completes after its caller gave up is closed again."""
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(MiB))
    with fuse({"late.img": MiB}) as fs:
        fs_: FuseFs = fs
        d = blockd_factory("--config", _limits_config(tmp_path, open_timeout=1))
        qmp = await d.client()
        fs_.hold("open")
        late = fs_.path("late.img")
        with pytest.raises(ExecuteError) as caught:
            await asyncio.wait_for(qmp.execute("blockdev-add", {
                "driver": "file", "node-name": "late", "filename": late}), 10)
        assert late in str(caught.value) and "within 1 s" in str(caught.value)
        # Control commands still work, opens elsewhere too.
        await qmp.execute("blockdev-add", {"driver": "file", "node-name": "p0",
                                           "filename": str(plain)})
        await qmp.execute("blockdev-del", {"node-name": "p0"})
        # 15 more hanging opens, at once from 15 sessions: the open slots are all held.
        sessions = [await d.client(f"s{n}") for n in range(15)]
        results = await asyncio.gather(*(
            s.execute("blockdev-add", {"driver": "file", "node-name": f"h{n}",
                                       "filename": fs_.path(f"h{n}.img")})
            for n, s in enumerate(sessions)), return_exceptions=True)
        assert all(isinstance(r, ExecuteError) and "within 1 s" in str(r) for r in results)
        with pytest.raises(ExecuteError) as refused:
            await asyncio.wait_for(qmp.execute("blockdev-add", {
                "driver": "file", "node-name": "p1", "filename": str(plain)}), 0.9)
        assert "16 earlier opens have not finished" in str(refused.value)
        report = await _limits(qmp)
        assert report["limits"]["open-timeout-ms"] == 1000
        assert report["limits"]["open-threads"] == 16
        assert report["opens-stuck"] == 16
        assert report["hits"]["open-timeout"] == 16 and report["hits"]["open-threads"] == 1
        assert "late" not in str(await qmp.execute("query-named-block-nodes"))
        # The storage answers again: the late open succeeds in its thread and is closed.
        fs_.release("open")
        for _ in range(100):
            if (await _limits(qmp))["opens-stuck"] == 0:
                break
            await asyncio.sleep(0.1)
        assert (await _limits(qmp))["opens-stuck"] == 0
        assert _fds_into(d.proc.pid, tmp_path / "fuse") == []
        assert "late" not in str(await qmp.execute("query-named-block-nodes"))
        assert "finished after its caller gave up (succeeded); undone" in d.stderr()
        # The slots are free again.
        await qmp.execute("blockdev-add", {"driver": "file", "node-name": "late",
                                           "filename": late})
        await qmp.execute("blockdev-del", {"node-name": "late"})
        for client in d.clients:
            await client.disconnect()
        assert d.stop() == 0, d.stderr()


async def test_sigterm_ends_within_the_bound_whatever_is_stuck(
    blockd_factory: BlockdFactory, tmp_path: Path, fuse: Any
) -> None:
    """SIGTERM with an open hanging, reads stuck in the kernel, a QMP client that never
    reads its replies and unfinished QMP and NBD handshakes: blockd exits within its
    shutdown bound and says what it left behind."""
    sock = str(tmp_path / "nbd.sock")
    with fuse({"slow.img": 64 * MiB, "hang.img": MiB}) as fs:
        d = blockd_factory(
            "--blockdev", f"driver=file,node-name=slow,filename={fs.path('slow.img')},"
                          "read-only=on",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=slow,node-name=slow,name=slow",
            "--config", _limits_config(tmp_path, open_timeout=60, shutdown_timeout=3))
        fs.hold("read")
        fs.hold("open")
        opener = await d.client("opener")
        hanging = asyncio.ensure_future(opener.execute("blockdev-add", {
            "driver": "file", "node-name": "hang", "filename": fs.path("hang.img")}))
        reader = await Nbd.connect(sock, b"slow")
        reader.reads(0, [i * MiB for i in range(20)])
        assert await asyncio.to_thread(fs.wait_held, "read", 1, 10)
        assert await asyncio.to_thread(fs.wait_held, "open", 1, 10)
        # A QMP client that asks for many replies and reads none.
        r, w = await asyncio.open_unix_connection(d.qmp_path)
        w.write(b'{"execute": "qmp_capabilities"}'
                + b'{"execute": "query-commands"}' * 2000)
        # Handshakes never finished.
        _, qmp_idle = await asyncio.open_unix_connection(d.qmp_path)
        nbd_idle = await Nbd.connect(sock, None)
        await asyncio.sleep(0.5)
        d.proc.send_signal(signal.SIGTERM)
        code, took = _exit_within(d, 3 + 10)
        assert code == 0, d.stderr()
        err = d.stderr()
        assert "left behind" in err and "opens that never returned" in err, err
        assert "I/O still running on slow" in err, err
        print(f"SIGTERM took {took:.1f} s with everything stuck (bound 3 s)")
        hanging.cancel()
        for writer in (w, qmp_idle, nbd_idle.writer, reader.writer):
            writer.close()
        del r
