"""Large reads leave blockd through pipes (splice): right bytes, accounted, no leaks."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from daemons import BlockdFactory, DaemonProcess
from nbdclients import libnbd, need

MiB = 1 << 20
SIZE = 64 * MiB


def start(blockd_factory: BlockdFactory, tmp_path: Path,
          tcp: bool = False) -> tuple[DaemonProcess, bytes, str]:
    """blockd exporting 64 MiB of random data; the address is a socket path or a TCP port."""
    # On the disk's file system (not tmpfs) the pipes are filled by I/O workers;
    # test_nbd_clients covers the memory-backed route through tmp_path too.
    img = Path("/var/tmp") / f"blockd-splice-{os.getpid()}-{tmp_path.name}.img"
    data = os.urandom(SIZE)
    img.write_bytes(data)
    if tcp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            address = str(s.getsockname()[1])
        server = f"addr.type=inet,addr.host=127.0.0.1,addr.port={address}"
    else:
        address = str(tmp_path / "nbd.sock")
        server = f"addr.type=unix,addr.path={address}"
    d = blockd_factory(
        "--blockdev", f"driver=file,node-name=f0,filename={img}",
        "--nbd-server", server,
        "--export", "type=nbd,id=e0,node-name=f0,name=disk")
    img.unlink()  # blockd holds it open
    return d, data, address


def connect(address: str) -> Any:
    nbd = libnbd()
    h = nbd.NBD()
    h.set_export_name("disk")
    if address.isdigit():
        h.connect_tcp("127.0.0.1", address)
    else:
        h.connect_unix(address)
    return h


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_many(h: Any, ranges: list[tuple[int, int]], pause: float = 0.0) -> list[bytes]:
    """Issue every read at once; with ``pause``, leave the replies unread for a while."""
    nbd = libnbd()
    bufs = [nbd.Buffer(length) for _, length in ranges]
    cookies = [h.aio_pread(buf, offset) for buf, (offset, _) in zip(bufs, ranges, strict=True)]
    time.sleep(pause)
    pending = set(cookies)
    while pending:
        for cookie in list(pending):
            if h.aio_command_completed(cookie):
                pending.discard(cookie)
        if pending:
            h.poll(-1)
    return [bytes(buf.to_bytearray()) for buf in bufs]


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
async def test_large_reads_are_spliced_and_exact(blockd_factory: BlockdFactory,
                                                 tmp_path: Path, tcp: bool) -> None:
    need("strace")
    d, data, sock = start(blockd_factory, tmp_path, tcp)
    h = await asyncio.to_thread(connect, sock)
    tracer = subprocess.Popen(["strace", "-f", "-e", "trace=splice,io_uring_enter", "-p",
                               str(d.proc.pid)], stderr=subprocess.PIPE, text=True)
    await asyncio.sleep(1.0)
    ranges = [(0, MiB), (5 * MiB + 12345, 300_000), (SIZE - 65536, 65536),
              (7 * MiB, 4096), (9 * MiB + 1, MiB - 4096), (20 * MiB, 2 * MiB)]
    got = await asyncio.to_thread(read_many, h, ranges)
    tracer.terminate()
    trace = tracer.communicate(timeout=10)[1]
    for (offset, length), chunk in zip(ranges, got, strict=True):
        assert chunk == data[offset:offset + length], (offset, length)
    # pipe -> socket for the reads of 64 KiB up to a pipe's size; file -> pipe is queued
    # on io_uring (the kernel's io-wq splices it: no system call of blockd's shows it).
    to_socket = [line for line in trace.splitlines()
                 if line.startswith(("splice(", "[pid")) and "SPLICE_F_NONBLOCK" in line]
    assert len(to_socket) >= 4, trace
    from_file = [line for line in trace.splitlines()
                 if "splice(" in line and "SPLICE_F_NONBLOCK" not in line]
    assert from_file == [] and "io_uring_enter(" in trace, trace
    qmp = await d.client()
    stats = next(e["stats"] for e in await qmp.execute("query-blockstats")
                 if e["device"] == "e0")
    assert stats["rd_operations"] == len(ranges)
    assert stats["rd_bytes"] == sum(length for _, length in ranges)
    await asyncio.to_thread(h.shutdown)


async def test_a_client_that_does_not_read_gets_every_byte(blockd_factory: BlockdFactory,
                                                           tmp_path: Path) -> None:
    # 48 MiB of replies cannot fit in the socket: a pipe can find it full
    # (its rest is copied to the transport), the others wait for it to drain.
    _, data, sock = start(blockd_factory, tmp_path)
    h = await asyncio.to_thread(connect, sock)
    ranges = [((i * 7919 * 4096) % (SIZE - MiB), MiB) for i in range(48)]
    got = await asyncio.to_thread(read_many, h, ranges, 1.0)
    for (offset, length), chunk in zip(ranges, got, strict=True):
        assert chunk == data[offset:offset + length], offset
    # Meanwhile blockd served other clients.
    other = await asyncio.to_thread(connect, sock)
    assert await asyncio.to_thread(other.pread, MiB, 3 * MiB) == data[3 * MiB:4 * MiB]
    await asyncio.to_thread(other.shutdown)
    await asyncio.to_thread(h.shutdown)


async def test_clients_that_vanish_mid_reply_leak_nothing(blockd_factory: BlockdFactory,
                                                          tmp_path: Path) -> None:
    d, data, sock = start(blockd_factory, tmp_path)
    warm = await asyncio.to_thread(connect, sock)
    await asyncio.to_thread(read_many, warm, [(i * MiB, MiB) for i in range(16)])
    await asyncio.to_thread(warm.shutdown)
    await asyncio.sleep(0.5)
    baseline = open_fds(d.proc.pid)

    def vanish() -> None:
        nbd = libnbd()
        h = connect(sock)
        bufs = [nbd.Buffer(MiB) for _ in range(40)]
        for i, buf in enumerate(bufs):
            h.aio_pread(buf, i * MiB)
        h.poll(0)
        del h  # closes the socket with replies half sent

    for _ in range(5):
        await asyncio.to_thread(vanish)
    await asyncio.sleep(1.0)
    assert d.proc.poll() is None
    h = await asyncio.to_thread(connect, sock)
    assert await asyncio.to_thread(h.pread, MiB, 2 * MiB) == data[2 * MiB:3 * MiB]
    await asyncio.to_thread(h.shutdown)
    await asyncio.sleep(0.5)
    # Pipes are pooled: more may exist now than after the warm-up, never more than the pool.
    assert open_fds(d.proc.pid) <= baseline + 2 * 64


@pytest.fixture(autouse=True)
def _no_stray_images() -> Any:
    yield
    for leftover in Path("/var/tmp").glob(f"blockd-splice-{os.getpid()}-*.img"):
        leftover.unlink()
