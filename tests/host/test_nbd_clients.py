"""Real NBD clients (qemu-img, nbdinfo, nbdcopy, libnbd) move real data through blockd."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import BlockdFactory, DaemonProcess
from nbdclients import libnbd, need, uri
from qemu.qmp import QMPClient

MiB = 1 << 20


def run(*cmd: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{cmd}: {result.stderr}"
    return result.stdout


def export_file(blockd_factory: BlockdFactory, tmp_path: Path, size: int = 16 * MiB,
                *extra: str, img_dir: Path | None = None) -> tuple[DaemonProcess, Path, str]:
    img = (img_dir or tmp_path) / "disk.img"
    with open(img, "wb") as f:
        f.truncate(size)
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory(
        "--blockdev", f"driver=file,node-name=f0,filename={img},discard=unmap",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on,description=scratch",
        *extra)
    return d, img, sock


async def stats_of(qmp: QMPClient, device: str) -> dict[str, object]:
    for entry in await qmp.execute("query-blockstats"):
        if entry["device"] == device:
            return entry["stats"]  # type: ignore[no-any-return]
    raise AssertionError(f"no stats for {device}")


async def test_qemu_img_round_trip(blockd_factory: BlockdFactory, tmp_path: Path) -> None:
    need("qemu-img")
    _, img, sock = export_file(blockd_factory, tmp_path)
    src = tmp_path / "src.img"
    data = os.urandom(3 * MiB)
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(5 * MiB)
        f.write(data)
    target = uri(sock, "disk")
    await asyncio.to_thread(run, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                            str(src), target)
    assert img.read_bytes()[5 * MiB:8 * MiB] == data  # on the backing, byte for byte
    await asyncio.to_thread(run, "qemu-img", "compare", "-f", "raw", "-F", "raw",
                            str(src), target)
    mapping = json.loads(await asyncio.to_thread(
        run, "qemu-img", "map", "--output=json", "-f", "raw", target))
    data_ranges = [(m["start"], m["length"]) for m in mapping if m["data"]]
    assert any(s <= 5 * MiB and s + n >= 8 * MiB for s, n in data_ranges)
    assert not any(s >= 9 * MiB for s, n in data_ranges)  # the tail is a hole


async def test_nbdinfo_and_nbdcopy(blockd_factory: BlockdFactory, tmp_path: Path) -> None:
    need("nbdinfo", "nbdcopy")
    _, img, sock = export_file(blockd_factory, tmp_path)
    payload = os.urandom(MiB)
    with open(img, "r+b") as f:
        f.seek(2 * MiB)
        f.write(payload)
    info = json.loads(await asyncio.to_thread(run, "nbdinfo", "--json", uri(sock, "disk")))
    export = info["exports"][0]
    assert export["export-size"] == 16 * MiB and export["description"] == "scratch"
    assert export["is_read_only"] is False and export["can_flush"] is True
    assert export["can_trim"] is True and export["can_zero"] is True
    assert export["can_fua"] is True and export["can_multi_conn"] is True
    assert export["block_size_minimum"] == 1
    listing = await asyncio.to_thread(run, "nbdinfo", "--list", "--json",
                                      f"nbd+unix://?socket={sock}")
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["disk"]
    extents = await asyncio.to_thread(run, "nbdinfo", "--map", uri(sock, "disk"))
    rows = [line.split() for line in extents.splitlines()]
    assert ["2097152", "1048576", "0", "data"] in rows
    copy = tmp_path / "copy.img"
    await asyncio.to_thread(run, "nbdcopy", uri(sock, "disk"), str(copy))
    assert copy.read_bytes() == img.read_bytes()
    back = tmp_path / "back.img"
    back.write_bytes(os.urandom(16 * MiB))
    await asyncio.to_thread(run, "nbdcopy", str(back), uri(sock, "disk"))
    assert img.read_bytes() == back.read_bytes()


@pytest.fixture(params=["disk", "tmpfs"])
def image_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """Where the image lives: on the disk's file system (page-cache reads on the spot,
    writes through io_uring) or on tmpfs (memory-backed: reads and writes on the spot)."""
    if request.param == "disk":
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="blockd-test-", dir="/dev/shm"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_libnbd_every_command_is_accounted(blockd_factory: BlockdFactory,
                                                 tmp_path: Path, image_dir: Path) -> None:
    nbd = libnbd()
    d, img, sock = export_file(blockd_factory, tmp_path, img_dir=image_dir)
    qmp = await d.client()
    before = await stats_of(qmp, "e0")  # the implicit device is named after the export
    assert before["rd_operations"] == before["wr_operations"] == 0

    def work() -> bytes:
        h = nbd.NBD()
        h.set_export_name("disk")
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_unix(sock)
        assert h.get_size() == 16 * MiB and h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.pwrite(b"A" * 4096, 0)
        h.pwrite(b"B" * 65536, MiB, nbd.CMD_FLAG_FUA)
        h.pwrite(b"C" * 512, 6 * MiB + 100)
        h.flush()
        h.zero(4096, 8192)
        h.trim(4 * MiB, MiB)  # libnbd takes (count, offset): this trim wipes the B data
        got = h.pread(4096, 0) + h.pread(100, 6 * MiB + 100) + h.pread(4096, 8192)
        seen: list[tuple[int, int]] = []

        def extent(metacontext: str, offset: int, entries: list[int], err: int) -> int:
            seen.extend(zip(entries[::2], entries[1::2], strict=True))
            return 0

        h.block_status(16 * MiB, 0, extent)
        h.shutdown()
        assert sum(n for n, _ in seen) == 16 * MiB
        return got

    got = await asyncio.to_thread(work)
    assert got == b"A" * 4096 + b"C" * 100 + b"\0" * 4096
    disk = img.read_bytes()
    assert disk[:4096] == b"A" * 4096 and disk[MiB:MiB + 65536] == b"\0" * 65536
    assert disk[6 * MiB + 100:6 * MiB + 612] == b"C" * 512
    after = await stats_of(qmp, "e0")
    assert (after["wr_operations"], after["wr_bytes"]) == (4, 4096 + 65536 + 512 + 4096)
    assert (after["rd_operations"], after["rd_bytes"]) == (3, 4096 + 100 + 4096)
    assert (after["flush_operations"], after["unmap_operations"]) == (1, 1)
    assert after["unmap_bytes"] == 4 * MiB
    assert after["wr_highest_offset"] == 6 * MiB + 612
    blocks = {b["device"]: b for b in await qmp.execute("query-block")}
    assert blocks["e0"]["inserted"]["node-name"] == "f0"


async def test_zero_reading_null_co_answers_reads_with_holes(blockd_factory: BlockdFactory,
                                                             tmp_path: Path) -> None:
    """As qemu-storage-daemon does: zeroes cost a hole chunk, not a payload, yet count."""
    nbd = libnbd()
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory(
        "--blockdev", f"driver=null-co,node-name=z0,size={16 * MiB},read-zeroes=on",
        "--blockdev", f"driver=null-co,node-name=g0,size={16 * MiB}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=ez,node-name=z0,name=zero",
        "--export", "type=nbd,id=eg,node-name=g0,name=garbage")
    qmp = await d.client()

    def chunks(name: str, structured: bool) -> tuple[list[tuple[int, int, int]], bytes]:
        h = nbd.NBD()
        h.set_export_name(name)
        h.set_request_structured_replies(structured)
        h.connect_unix(sock)
        assert h.get_structured_replies_negotiated() == structured
        seen: list[tuple[int, int, int]] = []

        def chunk(subbuf: bytes, offset: int, status: int, error: int) -> int:
            seen.append((offset, len(subbuf), status))
            return 0

        data = b""
        if structured:
            data += h.pread_structured(MiB, 3 * MiB, chunk)
            data += h.pread_structured(4096, 16 * MiB - 4096, chunk)
        else:
            data += h.pread(MiB, 3 * MiB) + h.pread(4096, 16 * MiB - 4096)
        h.shutdown()
        return seen, data

    seen, data = await asyncio.to_thread(chunks, "zero", True)
    assert seen == [(3 * MiB, MiB, nbd.READ_HOLE), (16 * MiB - 4096, 4096, nbd.READ_HOLE)]
    assert data == bytes(MiB + 4096)
    seen, data = await asyncio.to_thread(chunks, "zero", False)  # no chunks: the zeroes
    assert data == bytes(MiB + 4096)
    seen, data = await asyncio.to_thread(chunks, "garbage", True)  # no read-zeroes: data
    assert [status for _, _, status in seen] == [nbd.READ_DATA, nbd.READ_DATA]
    zero = await stats_of(qmp, "ez")
    assert (zero["rd_operations"], zero["rd_bytes"]) == (4, 2 * (MiB + 4096))
    assert zero["invalid_rd_operations"] == zero["failed_rd_operations"] == 0
    garbage = await stats_of(qmp, "eg")
    assert (garbage["rd_operations"], garbage["rd_bytes"]) == (2, MiB + 4096)


async def test_export_qmp_commands(blockd_factory: BlockdFactory, tmp_path: Path) -> None:
    nbd = libnbd()
    d = blockd_factory()
    qmp = await d.client()
    sock = str(tmp_path / "nbd.sock")
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "null0",
                                       "size": MiB, "read-zeroes": True})
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "ro0",
                                       "read-only": True})

    async def error(cmd: str, args: dict[str, object]) -> str:
        try:
            await qmp.execute(cmd, args)
        except Exception as exc:
            return str(exc)
        raise AssertionError(f"{cmd} {args} succeeded")

    assert await error("block-export-add", {"type": "nbd", "id": "e0", "node-name": "null0"}) \
        == "NBD server not running"
    await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    assert await error("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}) \
        == "NBD server already running"
    await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "null0",
                                           "writable": True, "name": "disk"})
    assert await error("block-export-add", {"type": "nbd", "id": "e0",
                                            "node-name": "null0"}) \
        == "Block export id 'e0' is already in use"
    assert await error("block-export-add", {"type": "nbd", "id": "e2", "node-name": "nope"}) \
        == "Cannot find device='' nor node-name='nope'"
    assert await error("block-export-add", {"type": "nbd", "id": "e3", "node-name": "ro0",
                                            "writable": True}) \
        == "Cannot export read-only node as writable"
    assert await error("block-export-add", {"type": "nbd", "id": "1x", "node-name": "ro0"}) \
        == "Invalid block export id"
    await qmp.execute("nbd-server-add", {"device": "ro0", "writable": True})
    assert await qmp.execute("query-block-exports") == [
        {"id": "ro0", "type": "nbd", "node-name": "ro0", "shutting-down": False},
        {"id": "e0", "type": "nbd", "node-name": "null0", "shutting-down": False},
    ]
    assert await error("blockdev-del", {"node-name": "null0"}) == "Node null0 is in use"

    h = nbd.NBD()
    h.set_export_name("disk")
    await asyncio.to_thread(h.connect_unix, sock)
    assert await error("block-export-del", {"id": "e0"}) == "export 'e0' still in use"
    from qemu.qmp import EventListener

    listener = EventListener()
    with qmp.listen(listener):
        await qmp.execute("block-export-del", {"id": "e0", "mode": "hard"})
        event = await asyncio.wait_for(listener.get(), 10)
    assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"] == {"id": "e0"}
    with pytest.raises(nbd.Error):
        await asyncio.to_thread(h.pread, 512, 0)
    await qmp.execute("blockdev-del", {"node-name": "null0"})  # free again
    await qmp.execute("nbd-server-remove", {"name": "ro0"})
    assert await error("nbd-server-remove", {"name": "ro0"}) == "Export 'ro0' is not found"
    await qmp.execute("nbd-server-stop")
    assert await error("nbd-server-stop", {}) == "NBD server not running"
    assert not os.path.exists(sock)


async def test_loop_device_discard_zero_and_flush(blockd_factory: BlockdFactory,
                                                  tmp_path: Path, loop_device: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real loop device: trim deallocates the backing, zero zeroes, flush fdatasyncs.

    Runs with io_uring off, so that the fdatasync is a system call strace can see
    (test_io_uring_route checks the io_uring route).
    """
    nbd = libnbd()
    need("strace")
    monkeypatch.setenv("BLOCKD_IO_URING", "0")
    loop = loop_device(16 * MiB)
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory(
        "--blockdev", f"driver=host_device,node-name=l0,filename={loop.path},discard=unmap",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=l0,name=loop,writable=on")
    h = nbd.NBD()
    h.set_export_name("loop")
    await asyncio.to_thread(h.connect_unix, sock)
    assert h.can_trim() and h.can_zero() and h.can_flush()
    await asyncio.to_thread(h.pwrite, os.urandom(8 * MiB), 0)
    await asyncio.to_thread(h.flush)
    allocated = os.stat(loop.image).st_blocks

    # Watch blockd's own system calls while the client flushes.
    tracer = subprocess.Popen(["strace", "-f", "-e", "trace=fdatasync,fsync", "-p",
                               str(d.proc.pid)], stderr=subprocess.PIPE, text=True)
    await asyncio.sleep(1.0)  # strace attaches to every thread
    await asyncio.to_thread(h.flush)
    await asyncio.sleep(0.2)
    tracer.terminate()
    trace = tracer.communicate(timeout=10)[1]
    assert "fdatasync(" in trace, trace

    await asyncio.to_thread(h.trim, 4 * MiB, 0)
    await asyncio.to_thread(h.zero, MiB, 6 * MiB)
    await asyncio.to_thread(h.flush)
    assert await asyncio.to_thread(h.pread, 4096, MiB) == b"\0" * 4096
    assert await asyncio.to_thread(h.pread, 4096, 6 * MiB) == b"\0" * 4096
    assert os.stat(loop.image).st_blocks < allocated  # the backing file really shrank
    with open(loop.image, "rb") as f:
        f.seek(6 * MiB)
        assert f.read(MiB) == b"\0" * MiB
    await asyncio.to_thread(h.shutdown)


async def test_tcp_loopback_and_block_size_from_alignment(blockd_factory: BlockdFactory,
                                                          tmp_path: Path,
                                                          loop_device: Any) -> None:
    """An O_DIRECT node on a 4096-byte-sector device advertises 4096 as its minimum block."""
    need("nbdinfo")
    import socket

    loop = loop_device(8 * MiB, sector_size=4096)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = blockd_factory(
        "--blockdev", f"driver=host_device,node-name=l0,filename={loop.path},cache.direct=on",
        "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
        "--export", "type=nbd,id=e0,node-name=l0,name=direct")
    info = json.loads(await asyncio.to_thread(
        run, "nbdinfo", "--json", f"nbd://127.0.0.1:{port}/direct"))
    export = info["exports"][0]
    assert export["block_size_minimum"] == 4096 and export["block_size_preferred"] == 4096
    assert export["is_read_only"] is True  # writable defaults to off
    qmp = await d.client()
    try:
        await qmp.execute("nbd-server-stop")
        await qmp.execute("nbd-server-start", {"addr": {"type": "inet", "data": {
            "host": "0.0.0.0", "port": str(port)}}})
    except Exception as exc:
        assert "needs TLS" in str(exc)  # no TLS yet: non-loopback NBD is refused
    else:
        raise AssertionError("NBD on 0.0.0.0 without TLS was accepted")


async def test_writethrough_makes_every_write_durable(blockd_factory: BlockdFactory,
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    nbd = libnbd()
    need("strace")
    monkeypatch.setenv("BLOCKD_IO_URING", "0")  # a visible pwritev2 (see test_io_uring_route)
    img = tmp_path / "wt.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    d = blockd_factory(
        "--blockdev", f"driver=file,node-name=w0,filename={img}",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'wt.sock'}",
        "--export", "type=nbd,id=wt,node-name=w0,name=wt,writable=on,writethrough=on")
    h = nbd.NBD()
    h.set_export_name("wt")
    await asyncio.to_thread(h.connect_unix, str(tmp_path / "wt.sock"))
    tracer = subprocess.Popen(["strace", "-f", "-e", "trace=pwritev2", "-p", str(d.proc.pid)],
                              stderr=subprocess.PIPE, text=True)
    await asyncio.sleep(1.0)
    await asyncio.to_thread(h.pwrite, b"W" * 4096, 0)  # no FUA from the client
    await asyncio.sleep(0.2)
    tracer.terminate()
    trace = tracer.communicate(timeout=10)[1]
    assert "RWF_DSYNC" in trace, trace
    await asyncio.to_thread(h.shutdown)
