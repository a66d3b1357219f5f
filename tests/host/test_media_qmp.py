"""Tray and medium commands through qemu.qmp on a blockd process: a virtual tray.

A ``cd`` device with a file medium behaves like QEMU's emulated drive; exported
over NBD it is a disc changer whose discs real clients read.  (Real drives are
tested in tests/vm/.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from daemons import DaemonProcess
from nbdclients import libnbd, uri
from qemu.qmp import EventListener, ExecuteError, QMPClient


async def expect_error(qmp: QMPClient, cmd: str, args: dict[str, object],
                       error_class: str, desc: str) -> None:
    with pytest.raises(ExecuteError) as info:
        await qmp.execute(cmd, args)
    assert (info.value.error_class, str(info.value)) == (error_class, desc)


async def tray_events(listener: EventListener) -> list[dict[str, object]]:
    """The DEVICE_TRAY_MOVED data received so far (replies come after their events)."""
    seen = []
    while not listener.empty():
        event = await listener.get()
        seen.append(event["data"])
    return seen


def disc(tmp_path: Path, name: str, fill: bytes, size: int = 1 << 16) -> str:
    path = tmp_path / name
    path.write_bytes(fill * size)
    return str(path)


def cd0(blocks: list[dict[str, object]]) -> dict[str, object]:
    return next(b for b in blocks if b["device"] == "cd0")


async def test_virtual_tray_commands(blockd: DaemonProcess, tmp_path: Path) -> None:
    qmp = await blockd.client()
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "iso0", "read-only": True,
                                       "filename": disc(tmp_path, "a.iso", b"A")})
    await qmp.execute("device_add", {"driver": "cd", "id": "cd0", "drive": "iso0"})
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    await qmp.execute("device_add", {"driver": "hd", "id": "hd0", "drive": "n0"})
    listener = EventListener("DEVICE_TRAY_MOVED")
    with qmp.listen(listener):
        await qmp.execute("blockd-lock-medium", {"id": "cd0", "locked": True})
        assert cd0(await qmp.execute("query-block"))["locked"] is True
        await expect_error(qmp, "eject", {"id": "cd0"}, "GenericError",
                           "Device 'cd0' is locked and force was not specified, "
                           "wait for tray to open and try again")
        assert await qmp.execute("blockdev-open-tray", {"device": "cd0"}) == {}
        assert await tray_events(listener) == []
        await qmp.execute("eject", {"id": "/machine/peripheral/cd0", "force": True})
        assert await tray_events(listener) == [{"device": "cd0", "id": "cd0", "tray-open": True}]
        info = cd0(await qmp.execute("query-block"))
        assert info["tray_open"] is True and info["locked"] is False and "inserted" not in info

        await expect_error(qmp, "eject", {}, "GenericError",
                           "Need exactly one of 'device' and 'id'")
        await expect_error(qmp, "eject", {"id": "nope"}, "DeviceNotFound",
                           "Device 'nope' not found")
        await expect_error(qmp, "eject", {"device": "hd0"}, "GenericError",
                           "Device 'hd0' is not removable")
        await expect_error(qmp, "blockdev-insert-medium", {"id": "cd0", "node-name": "n0"},
                           "GenericError", "Node 'n0' is already in use")
        await expect_error(qmp, "blockdev-insert-medium", {"id": "hd0", "node-name": "iso0"},
                           "GenericError", "Device is not removable")
        await expect_error(qmp, "blockd-lock-medium", {"id": "cd0", "locked": "yes"},
                           "GenericError", "Invalid parameter type for 'locked', expected: boolean")

        await qmp.execute("blockdev-insert-medium", {"id": "cd0", "node-name": "iso0"})
        await qmp.execute("blockdev-close-tray", {"id": "cd0"})
        await qmp.execute("blockdev-close-tray", {"id": "cd0"})  # no-op: no event
        assert await tray_events(listener) == [{"device": "cd0", "id": "cd0", "tray-open": False}]
        await expect_error(qmp, "blockdev-remove-medium", {"id": "cd0"}, "GenericError",
                           "Tray of device 'cd0' is not open")
        missing = tmp_path / "missing.iso"
        await expect_error(qmp, "blockdev-change-medium", {"id": "cd0", "filename": str(missing)},
                           "GenericError", f"Could not open '{missing}': No such file or directory")
        assert await tray_events(listener) == []
        assert cd0(await qmp.execute("query-block"))["inserted"]["node-name"] == "iso0"


async def test_disc_changer_over_nbd(blockd: DaemonProcess, tmp_path: Path) -> None:
    """Swap discs under an NBD export: clients connecting afterwards read the new disc."""
    nbd = libnbd()
    qmp = await blockd.client()
    sock = str(tmp_path / "nbd.sock")
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "iso0", "read-only": True,
                                       "filename": disc(tmp_path, "a.iso", b"A")})
    await qmp.execute("device_add", {"driver": "cd", "id": "cd0", "drive": "iso0"})
    await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    await qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "iso0",
                                           "name": "cd"})

    def read_first(n: int = 4) -> tuple[int, bytes]:
        h = nbd.NBD()
        h.connect_uri(uri(sock, "cd"))
        try:
            return h.get_size(), h.pread(n, 0)
        finally:
            h.shutdown()

    assert await asyncio.to_thread(read_first) == (1 << 16, b"AAAA")

    listener = EventListener("DEVICE_TRAY_MOVED")
    with qmp.listen(listener):
        await qmp.execute("blockdev-change-medium", {
            "id": "cd0", "filename": disc(tmp_path, "b.iso", b"B", 1 << 17), "format": "raw",
            "read-only-mode": "read-only"})
        assert [e["tray-open"] for e in await tray_events(listener)] == [True, False]
    blocks = await qmp.execute("query-block")
    inserted = cd0(blocks)["inserted"]
    assert inserted["node-name"].startswith("#block") and inserted["ro"] is True
    assert await asyncio.to_thread(read_first) == (1 << 17, b"BBBB")

    # With the tray open a connected client's reads fail, counted as failed, and a
    # new client finds no export (nothing to open).
    h = nbd.NBD()
    await asyncio.to_thread(h.connect_uri, uri(sock, "cd"))
    await qmp.execute("blockdev-open-tray", {"id": "cd0"})
    with pytest.raises(nbd.Error, match="server has no export named 'cd'"):
        await asyncio.to_thread(read_first)
    with pytest.raises(nbd.Error) as info:
        await asyncio.to_thread(h.pread, 512, 0)
    assert info.value.errno == "EIO"  # ENOMEDIUM has no NBD code: EIO
    await asyncio.to_thread(h.shutdown)
    stats = next(s for s in await qmp.execute("query-blockstats") if s["device"] == "cd0")
    assert stats["stats"]["failed_rd_operations"] == 1
    await qmp.execute("blockdev-close-tray", {"id": "cd0"})
    assert await asyncio.to_thread(read_first) == (1 << 17, b"BBBB")
