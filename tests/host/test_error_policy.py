"""Error policies end to end: real ENOSPC and EIO under real NBD clients, QMP as witness."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import FailingFile
from daemons import BlockdFactory, DaemonProcess
from nbdclients import libnbd
from qemu.qmp import EventListener, QMPClient

MiB = 1 << 20


async def next_events(listener: EventListener, count: int) -> list[dict[str, Any]]:
    return [await asyncio.wait_for(listener.get(), 15) for _ in range(count)]


async def blocks(qmp: QMPClient) -> dict[str, dict[str, Any]]:
    return {b["device"]: b for b in await qmp.execute("query-block")}


async def stats(qmp: QMPClient, device: str) -> dict[str, Any]:
    for entry in await qmp.execute("query-blockstats"):
        if entry["device"] == device:
            return entry["stats"]  # type: ignore[no-any-return]
    raise AssertionError(device)


def start(blockd_factory: BlockdFactory, tmp_path: Path, image: Path,
          device_opts: str) -> tuple[DaemonProcess, str]:
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory(
        "--blockdev", f"driver=file,node-name=f0,filename={image}",
        "--device", f"hd,id=hd0,drive=f0,{device_opts}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on")
    return d, sock


def connect(sock: str) -> Any:
    nbd = libnbd()
    h = nbd.NBD()
    h.set_export_name("disk")
    h.connect_unix(sock)
    return h


async def in_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    return asyncio.ensure_future(asyncio.to_thread(fn, *args))


async def test_enospc_stops_holds_and_cont_retries(small_tmpfs: Path,
                                                   blockd_factory: BlockdFactory,
                                                   tmp_path: Path) -> None:
    image = small_tmpfs / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)  # sparse: writing it needs more space than the 1 MiB tmpfs has
    d, sock = start(blockd_factory, tmp_path, image, "werror=enospc")
    qmp = await d.client()
    assert (await blocks(qmp))["hd0"]["io-status"] == "ok"
    listener = EventListener()
    h = await asyncio.to_thread(connect, sock)
    payload = os.urandom(2 * MiB)
    with qmp.listen(listener):
        write = await in_thread(h.pwrite, payload, MiB)
        error, stop = await next_events(listener, 2)
        assert error["event"] == "BLOCK_IO_ERROR" and stop["event"] == "STOP"
        assert error["data"] == {"device": "hd0", "node-name": "f0", "operation": "write",
                                 "action": "stop", "nospace": True,
                                 "reason": os.strerror(errno.ENOSPC)}
        assert (await blocks(qmp))["hd0"]["io-status"] == "nospace"
        status = await qmp.execute("query-status")
        assert status == {"status": "io-error", "singlestep": False, "running": False}
        await asyncio.sleep(0.3)
        assert not write.done()  # held, not failed
        # Make room for real, then continue: the held write is retried and succeeds.
        subprocess.run(["mount", "-o", "remount,size=32M", str(small_tmpfs)], check=True)
        await qmp.execute("cont")
        resume = await asyncio.wait_for(listener.get(), 15)
        assert resume["event"] == "RESUME" and "data" not in resume
        await asyncio.wait_for(write, 30)
    await asyncio.to_thread(h.flush)
    assert image.read_bytes()[MiB:3 * MiB] == payload
    s = await stats(qmp, "hd0")
    assert s["wr_operations"] == 1 and s["wr_bytes"] == 2 * MiB
    assert s["failed_wr_operations"] == 0  # a request retried after a stop is not a failure
    assert (await blocks(qmp))["hd0"]["io-status"] == "ok"
    assert (await qmp.execute("query-status"))["running"] is True
    await asyncio.to_thread(h.shutdown)


@pytest.mark.parametrize("length", [4096, MiB], ids=["4k", "1m-spliced"])
@pytest.mark.parametrize("policy", ["report", "ignore", "stop"])
async def test_eio_on_read(failing_file: FailingFile, blockd_factory: BlockdFactory,
                           tmp_path: Path, policy: str, length: int) -> None:
    # failing_file comes first so that it is torn down after blockd has closed it.
    # 1 MiB reads go through a pipe (blockd.aio.pipes): the policies apply the same.
    nbd = libnbd()
    d, sock = start(blockd_factory, tmp_path, failing_file.path, f"rerror={policy}")
    qmp = await d.client()
    h = await asyncio.to_thread(connect, sock)
    await asyncio.to_thread(h.pwrite, b"X" * 4096, 5 * MiB)
    listener = EventListener()
    with qmp.listen(listener):
        failing_file.fail()
        read = await in_thread(h.pread, length, 9 * MiB)
        event = await asyncio.wait_for(listener.get(), 15)
        assert event["event"] == "BLOCK_IO_ERROR"
        assert event["data"] == {"device": "hd0", "node-name": "f0", "operation": "read",
                                 "action": policy, "nospace": False,
                                 "reason": os.strerror(errno.EIO)}
        if policy == "report":
            with pytest.raises(nbd.Error) as info:
                await read
            assert info.value.errno == errno.errorcode[errno.EIO]  # libnbd names it
            assert (await stats(qmp, "hd0"))["failed_rd_operations"] == 1
            # report does not stop: io-status stays ok (and shows: werror is enospc)
            assert (await blocks(qmp))["hd0"]["io-status"] == "ok"
        elif policy == "ignore":
            assert await read == bytes(length)  # completed as if it had worked, with zeroes
            assert (await stats(qmp, "hd0"))["failed_rd_operations"] == 1
        else:
            assert (await asyncio.wait_for(listener.get(), 15))["event"] == "STOP"
            assert (await blocks(qmp))["hd0"]["io-status"] == "failed"
            await asyncio.sleep(0.3)
            assert not read.done()
            failing_file.fail(False)
            await qmp.execute("blockd-device-resume", {"id": "hd0"})
            assert (await asyncio.wait_for(listener.get(), 15))["event"] == "RESUME"
            assert await asyncio.wait_for(read, 15) == bytes(length)
            s = await stats(qmp, "hd0")
            assert s["failed_rd_operations"] == 0 and s["rd_operations"] == 1
            assert (await blocks(qmp))["hd0"]["io-status"] == "ok"
    failing_file.fail(False)
    assert await asyncio.to_thread(h.pread, 4096, 5 * MiB) == b"X" * 4096
    await asyncio.to_thread(h.shutdown)


async def test_eio_on_write_reported(failing_file: FailingFile,
                                     blockd_factory: BlockdFactory, tmp_path: Path) -> None:
    nbd = libnbd()
    d, sock = start(blockd_factory, tmp_path, failing_file.path, "werror=report")
    qmp = await d.client()
    h = await asyncio.to_thread(connect, sock)
    listener = EventListener()
    with qmp.listen(listener):
        failing_file.fail()
        with pytest.raises(nbd.Error) as info:
            await asyncio.to_thread(h.pwrite, b"Y" * 4096, 2 * MiB, nbd.CMD_FLAG_FUA)
        assert info.value.errno == errno.errorcode[errno.EIO]
        event = await asyncio.wait_for(listener.get(), 15)
    assert event["data"]["operation"] == "write" and event["data"]["action"] == "report"
    assert "io-status" not in (await blocks(qmp))["hd0"]  # werror=report: nothing can stop
    assert (await stats(qmp, "hd0"))["failed_wr_operations"] == 1
    failing_file.fail(False)
    await asyncio.to_thread(h.shutdown)
