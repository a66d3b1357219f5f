"""blockd's ``sg`` driver on the guest kernel's real SCSI generic driver.

One guest: a virtio-scsi disk (scsihd0, 8 MiB, with vendor, product, serial and WWN set
on QEMU's command line), a virtio-scsi CD-ROM drive holding disc "a" (scsicd0) and an
empty one (scsicd1).  blockd runs once for the module (starting it under TCG takes
5-30 s); each test adds the nodes, devices and exports it needs and the ``qmp`` fixture
removes whatever is left when the test ends.  The tests talk to blockd over QMP
(qemu.qmp) and NBD (libnbd), and check what the hardware did with independent views:
the kernel's (sysfs, the sd block node read with O_DIRECT, sg3-utils' sg_inq), the
image file behind the disk (read through the share), and the emulator's own QMP (the
witness: query-block's ``locked``/``tray_open``, query-blockstats' counters).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import DaemonProcess, blockd_argv, start_daemon
from guest import (
    HD_SIZE,
    HD_VENDOR,
    SECTOR,
    VM,
    GuestDevice,
    Witness,
    disc_sector,
    udev_settle,
)
from nbdclients import libnbd, uri
from qemu.qmp import ExecuteError, QMPClient

from blockd.devices._ioctl import CDROM_LOCKDOOR, ioctl_value

VM_HARDWARE = ["scsi-hd", "scsi-cd", "scsi-cd-empty"]

BLOCK = 512  # the scsi-hd's logical block size
HD_BLOCKS = HD_SIZE // BLOCK


# ----------------------------------------------------------------------------- blockd


class Blockd:
    """The module's blockd: its process, QMP and NBD sockets."""

    def __init__(self, daemon: DaemonProcess, tmp: Path) -> None:
        self.daemon = daemon
        self.nbd_sock = str(tmp / "nbd.sock")


@pytest.fixture(scope="module")
def blockd(vm: VM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blockd]:
    """One blockd for the group, with QMP and an NBD server and nothing else."""
    tmp = tmp_path_factory.mktemp("blockd-sg")
    daemon = start_daemon(blockd_argv(
        "--qmp", str(tmp / "qmp.sock"),
        "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
    ), tmp, "blockd", timeout=120)
    try:
        yield Blockd(daemon, tmp)
    finally:
        assert daemon.stop() == 0, daemon.stderr()


@pytest.fixture
async def qmp(blockd: Blockd) -> AsyncIterator[QMPClient]:
    """A QMP session with the module's blockd; what the test added goes afterwards."""
    client = await blockd.daemon.client()
    try:
        yield client
        await _reset(client)
    finally:
        await client.disconnect()


async def _reset(qmp: QMPClient) -> None:
    """Remove every export, device and node, so the next test starts from nothing."""
    for export in await run(qmp, "query-block-exports"):
        await run(qmp, "block-export-del", {"id": export["id"], "mode": "hard"})
    for _ in range(50):
        if not await run(qmp, "query-block-exports"):
            break
        await asyncio.sleep(0.1)
    for block in await run(qmp, "query-block"):
        await run(qmp, "device_del", {"id": block.get("qdev") or block["device"]})
    for node in await run(qmp, "query-named-block-nodes"):
        await run(qmp, "blockdev-del", {"node-name": node["node-name"]})


async def run(qmp: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """``qmp.execute`` typed for the tests (qemu.qmp's result is an ``object``)."""
    return await qmp.execute(command, arguments)


async def device_stats(qmp: QMPClient, device: str) -> dict[str, Any]:
    """blockd's query-blockstats counters of one device."""
    for entry in await run(qmp, "query-blockstats"):
        if entry["device"] == device:
            stats: dict[str, Any] = entry["stats"]
            return stats
    raise KeyError(f"no blockstats for {device}")


async def named_node(qmp: QMPClient, name: str) -> dict[str, Any]:
    nodes = await run(qmp, "query-named-block-nodes")
    found = [n for n in nodes if n["node-name"] == name]
    assert len(found) == 1, nodes
    node: dict[str, Any] = found[0]
    return node


async def scsi_command(qmp: QMPClient, cdb: str, *, node: str | None = None,
                       id: str | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"cdb": cdb, **{k.replace("_", "-"): v for k, v in kw.items()}}
    if node is not None:
        args["node-name"] = node
    if id is not None:
        args["id"] = id
    reply: dict[str, Any] = await run(qmp, "blockd-scsi-command", args)
    return reply


def read10(lba: int, blocks: int) -> str:
    """A READ(10) CDB in hex."""
    return f"28 00 {lba:08x} 00 {blocks:04x} 00".replace(" ", "")


# ----------------------------------------------------------------------------- views


def hd_image_bytes(dev: GuestDevice, offset: int, length: int) -> bytes:
    """What the disk held at boot: its image is made of ``disc_sector(id, n)``."""
    first, last = offset // SECTOR, (offset + length - 1) // SECTOR
    data = b"".join(disc_sector(dev.id, n) for n in range(first, last + 1))
    start = offset - first * SECTOR
    return data[start:start + length]


def read_direct(node: str, offset: int, length: int) -> bytes:
    """Read the guest's block node with O_DIRECT: the disk, not the page cache."""
    start = offset // BLOCK * BLOCK
    size = (offset + length - start + BLOCK - 1) // BLOCK * BLOCK
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    fd = os.open(node, os.O_RDONLY | os.O_DIRECT)
    try:
        got = os.preadv(fd, [buf], start)
        assert got == size, f"short O_DIRECT read of {node}: {got} of {size}"
        return bytes(buf[offset - start:offset - start + length])
    finally:
        os.close(fd)
        buf.close()


def read_image(dev: GuestDevice, offset: int, length: int) -> bytes:
    """Read the image file behind the disk (the host's file, through the share)."""
    assert dev.image is not None
    Path("/proc/sys/vm/drop_caches").write_text("3\n")  # no stale 9p pages
    with open(dev.image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def emulator_stats(witness: Witness, dev: GuestDevice) -> dict[str, Any]:
    """The emulator's own I/O counters of the drive (query-blockstats)."""
    for entry in witness.execute("query-blockstats"):
        if entry.get("device") == dev.drive or dev.id in str(entry.get("qdev", "")):
            stats: dict[str, Any] = entry["stats"]
            return stats
    raise KeyError(f"no blockstats for {dev.drive}")


def sysfs_scsi(dev: GuestDevice) -> dict[str, str]:
    """What the kernel read from the unit (sysfs of its SCSI device)."""
    assert dev.sg is not None
    base = Path("/sys/class/scsi_generic", Path(dev.sg).name, "device")
    return {name: (base / name).read_text().strip()
            for name in ("vendor", "model", "rev", "type", "wwid")
            if (base / name).exists()}


def expected_hd_identity(dev: GuestDevice) -> dict[str, Any]:
    hw = dev.hardware
    return {
        "peripheral-type": 0,
        "peripheral-type-name": "disk",
        "removable": False,
        "vendor": HD_VENDOR,
        "product": hw.product,
        "revision": sysfs_scsi(dev)["rev"],  # QEMU's version, as the kernel read it
        "serial": hw.serial,
        "wwn": hw.wwn_text,
    }


def until(probe: Callable[[], Any], want: Callable[[Any], bool], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if want(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


# ----------------------------------------------------------------------------- the disk


@pytest.fixture
def hd(vm: VM) -> GuestDevice:
    dev = vm.device("scsihd0")
    assert dev.sg is not None, f"{dev.node} has no SCSI generic node (is sg loaded?)"
    return dev


async def test_sg_node_identifies_the_scsi_disk(qmp: QMPClient, hd: GuestDevice) -> None:
    """INQUIRY and VPD data as QEMU's command line set them, read by blockd itself."""
    kernel = sysfs_scsi(hd)
    # The kernel's own reading agrees with the command line (the reference is sound).
    assert (kernel["vendor"], kernel["model"], kernel["type"]) == (
        HD_VENDOR, hd.hardware.product, "0"), kernel
    assert kernel.get("wwid") == f"naa.{hd.hardware.wwn:016x}", kernel

    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "sg0",
                                       "filename": hd.sg})
    node = await named_node(qmp, "sg0")
    assert node["drv"] == "sg"
    assert node["file"] == hd.sg
    assert node["ro"] is False
    assert node["image"]["virtual-size"] == HD_SIZE
    assert node["blockd-scsi"] == expected_hd_identity(hd)


async def test_host_device_on_sg_opens_the_sg_driver(qmp: QMPClient, hd: GuestDevice) -> None:
    await run(qmp, "blockdev-add", {"driver": "host_device", "node-name": "hd0",
                                       "filename": hd.sg})
    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "sg0",
                                       "filename": hd.sg})
    node = await named_node(qmp, "hd0")
    assert node["drv"] == "host_device"
    assert node["image"]["virtual-size"] == HD_SIZE
    assert node["blockd-scsi"] == expected_hd_identity(hd)
    assert node["blockd-scsi"] == (await named_node(qmp, "sg0"))["blockd-scsi"]


async def test_nbd_writes_reach_the_disk(qmp: QMPClient, blockd: Blockd, hd: GuestDevice,
                                         witness: Witness) -> None:
    """Writes through NBD (one with FUA, one of a few blocks, then a flush) land on the disk:
    blockd, the guest's sd node (O_DIRECT) and the image file all read them back, and
    the emulator counted the writes and the flushes."""
    nbd = libnbd()
    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "sg0",
                                       "filename": hd.sg})
    await run(qmp, "block-export-add", {"type": "nbd", "id": "e0", "node-name": "sg0",
                                           "name": "hd", "writable": True})
    rng = random.Random(0x5C5)
    writes = [(1 << 20, rng.randbytes(64 << 10)),  # aligned, with FUA
              # Three blocks across a 4 KiB boundary.  Requests must be whole 512-byte
              # blocks: the export advertises that minimum and refuses others (EINVAL).
              ((3 << 20) + 3 * BLOCK, rng.randbytes(3 * BLOCK))]
    h = nbd.NBD()
    await asyncio.to_thread(h.connect_uri, uri(blockd.nbd_sock, "hd"))
    try:
        assert h.get_size() == HD_SIZE
        assert h.can_fua() and h.can_flush() and not h.is_read_only()
        assert h.get_block_size(nbd.SIZE_MINIMUM) == BLOCK

        before = emulator_stats(witness, hd)
        (off_a, a), (off_b, b) = writes
        await asyncio.to_thread(h.pwrite, a, off_a, nbd.CMD_FLAG_FUA)
        after_fua = emulator_stats(witness, hd)
        assert after_fua["wr_bytes"] - before["wr_bytes"] >= len(a)
        # QEMU's scsi-hd emulates FUA with a flush of its image: FUA reached the disk.
        assert after_fua["flush_operations"] > before["flush_operations"], (before, after_fua)

        await asyncio.to_thread(h.pwrite, b, off_b)
        before_flush = emulator_stats(witness, hd)
        # Without FUA, no flush (so the count above did come from FUA).
        assert before_flush["flush_operations"] == after_fua["flush_operations"]
        assert before_flush["wr_bytes"] - after_fua["wr_bytes"] >= len(b)
        await asyncio.to_thread(h.flush)
        after_flush = emulator_stats(witness, hd)
        # SYNCHRONIZE CACHE reached the disk.
        assert after_flush["flush_operations"] > before_flush["flush_operations"]
        # And blockd accounted all of it on the export's device, as for any driver.
        ours = await device_stats(qmp, "e0")
        assert (ours["wr_operations"], ours["wr_bytes"]) == (2, len(a) + len(b)), ours
        assert ours["flush_operations"] == 1, ours
        assert ours["failed_wr_operations"] == ours["failed_flush_operations"] == 0, ours

        for off, data in writes:
            assert await asyncio.to_thread(h.pread, len(data), off) == data, "through blockd"
            assert read_direct(hd.node, off, len(data)) == data, f"through {hd.node}"
            assert read_image(hd, off, len(data)) == data, f"in the image {hd.image}"
        # Around the small write, the disk kept what it had.
        assert read_direct(hd.node, off_b - 100, 100) == hd_image_bytes(hd, off_b - 100, 100)
        end = off_b + len(b)
        assert read_direct(hd.node, end, 100) == hd_image_bytes(hd, end, 100)
    finally:
        # Give the disk back as it was.
        for off, data in writes:
            await asyncio.to_thread(h.pwrite, hd_image_bytes(hd, off, len(data)), off,
                                    nbd.CMD_FLAG_FUA)
        await asyncio.to_thread(h.shutdown)
    for off, data in writes:
        assert read_direct(hd.node, off, len(data)) == hd_image_bytes(hd, off, len(data))


async def test_inquiry_passthrough_matches_sg_inq(qmp: QMPClient, hd: GuestDevice) -> None:
    sg_inq = shutil.which("sg_inq")
    assert sg_inq is not None and hd.sg is not None, (
        "sg_inq is missing in the guest (it uses the host's root filesystem): install "
        "Debian's sg3-utils on the host (./dev does)")
    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "sg0",
                                       "filename": hd.sg})
    reply = await scsi_command(qmp, "120000006000", node="sg0", direction="from-device",
                               transfer_length=96)
    reference = subprocess.run([sg_inq, "--raw", "--len=96", hd.sg], check=True,
                               capture_output=True).stdout
    data = base64.b64decode(reply["data"])
    assert reply["status"] == 0 and reply["status-name"] == "GOOD", reply
    assert "sense" not in reply, reply
    assert reply["duration-ns"] > 0
    assert data == reference, (data.hex(), reference.hex())
    assert data[8:16].decode().rstrip() == HD_VENDOR
    assert data[16:32].decode().rstrip() == hd.hardware.product
    assert 96 - reply["resid"] >= 36  # the standard INQUIRY data at least


async def test_inquiry_from_qmp_shell(qmp: QMPClient, blockd: Blockd, hd: GuestDevice) -> None:
    """Raw SCSI from qmp-shell (qemu.qmp's shell, as an operator types it)."""
    shell = Path(sys.executable).with_name("qmp-shell")
    assert shell.exists(), f"{shell}: qemu.qmp's qmp-shell is missing from the venv"
    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "sg0",
                                       "filename": hd.sg})
    # qmp-shell makes a value of decimal digits a number: the CDB is written with 0x.
    typed = ("blockd-scsi-command node-name=sg0 cdb=0x120000006000 direction=from-device "
             "transfer-length=96\n")
    out = await asyncio.to_thread(
        subprocess.run, [str(shell), blockd.daemon.qmp_path], input=typed, text=True,
        capture_output=True, timeout=120, check=True)
    replies = [json.loads(line[line.index("{"):]) for line in out.stdout.splitlines()
               if '{"return"' in line or '{"error"' in line]
    assert len(replies) == 1, out.stdout
    reply = replies[0]["return"]
    assert reply["status"] == 0, reply
    inquiry = base64.b64decode(reply["data"])
    assert inquiry[8:16].decode().rstrip() == HD_VENDOR
    assert inquiry[16:32].decode().rstrip() == hd.hardware.product


async def test_read_past_the_end_is_a_check_condition(qmp: QMPClient, hd: GuestDevice) -> None:
    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "sg0",
                                       "filename": hd.sg})
    # The last block reads.
    last = await scsi_command(qmp, read10(HD_BLOCKS - 1, 1), node="sg0",
                              direction="from-device", transfer_length=BLOCK)
    assert last["status"] == 0 and last["resid"] == 0, last
    assert base64.b64decode(last["data"]) == hd_image_bytes(hd, HD_SIZE - BLOCK, BLOCK)
    # One past it: a normal return carrying CHECK CONDITION, ILLEGAL REQUEST, LBA out of
    # range.  Seen from QEMU 7.2's scsi-hd (fixed format, 18 bytes):
    #   raw sense 700005000000000a00000000210000000000
    # The kernel reported "resid" 0 and handed back 512 bytes that were the previous
    # command's (the last block read above): the sg driver copies its reserve buffer back
    # whatever the status, and virtio-scsi reports no residual.  blockd passes on data
    # only from commands that worked.
    reply = await scsi_command(qmp, read10(HD_BLOCKS, 1), node="sg0",
                               direction="from-device", transfer_length=BLOCK)
    print("READ(10) past the end:", reply)
    assert reply["status"] == 2 and reply["status-name"] == "CHECK CONDITION", reply
    sense = reply["sense"]
    assert (sense["key"], sense["key-name"], sense["asc"], sense["ascq"]) == (
        5, "ILLEGAL REQUEST", 0x21, 0x00), sense
    assert sense["deferred"] is False
    assert reply["data"] == "", reply
    assert sense["description"].startswith("ILLEGAL REQUEST: "), sense
    assert "out of range" in sense["description"], sense
    raw = bytes.fromhex(sense["raw"])
    assert raw and raw[0] & 0x7F in (0x70, 0x72), sense  # fixed or descriptor format


async def test_write_passthrough_is_refused(qmp: QMPClient, hd: GuestDevice,
                                            witness: Witness) -> None:
    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "sg0",
                                       "filename": hd.sg})
    before = emulator_stats(witness, hd)
    garbage = base64.b64encode(b"X" * BLOCK).decode()
    with pytest.raises(ExecuteError) as info:
        await scsi_command(qmp, "2a000000000000000100", node="sg0",
                           direction="to-device", data=garbage)
    assert info.value.error_class == "GenericError"
    assert "[scsi-passthrough] allowed-opcodes" in str(info.value), str(info.value)
    assert "WRITE(10)" in str(info.value) or "0x2a" in str(info.value), str(info.value)
    # Nothing reached the disk.
    assert emulator_stats(witness, hd)["wr_operations"] == before["wr_operations"]
    assert read_direct(hd.node, 0, BLOCK) == hd_image_bytes(hd, 0, BLOCK)
    reply = await scsi_command(qmp, read10(0, 1), node="sg0", direction="from-device",
                               transfer_length=BLOCK)
    assert base64.b64decode(reply["data"]) == hd_image_bytes(hd, 0, BLOCK)


# ----------------------------------------------------------------------------- the CD drives


@pytest.fixture
def scsicd0(vm: VM, witness: Witness) -> Iterator[GuestDevice]:
    """The drive with disc "a", unlocked; given back closed, unlocked, with disc "a"."""
    dev = vm.device("scsicd0")
    assert dev.sg is not None, f"{dev.node} has no SCSI generic node (is sg loaded?)"
    udev_settle()
    if witness.device("scsicd0")["locked"]:  # udev's cdrom_id locks after a media change
        fd = os.open(dev.node, os.O_RDONLY | os.O_NONBLOCK)
        try:
            ioctl_value(fd, CDROM_LOCKDOOR, 0)
        finally:
            os.close(fd)
    yield dev
    witness.execute("eject", {"id": "scsicd0", "force": True})  # clears any lock too
    witness.change_medium("scsicd0", vm.disc("a"))


async def test_cd_drive_through_sg_moves_the_real_tray(qmp: QMPClient, blockd: Blockd,
                                                       scsicd0: GuestDevice,
                                                       witness: Witness) -> None:
    nbd = libnbd()
    started = time.monotonic()

    def step(what: str) -> None:  # the timeline, in the guest log (-rA)
        print(f"+{time.monotonic() - started:5.1f}s {what}", flush=True)

    def hw(key: str, value: bool) -> bool:
        got = until(lambda: witness.device("scsicd0")[key], lambda v: v == value)
        step(f"emulator: {key}={got}")
        return bool(got)

    async def cd0() -> dict[str, Any]:
        blocks = await run(qmp, "query-block")
        info: dict[str, Any] = next(b for b in blocks if b["device"] == "cd0")
        return info

    assert witness.device("scsicd0")["locked"] is False
    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "cdsg",
                                       "filename": scsicd0.sg})
    node = await named_node(qmp, "cdsg")
    assert node["drv"] == "sg"
    scsi = node["blockd-scsi"]
    assert (scsi["peripheral-type"], scsi["peripheral-type-name"], scsi["removable"]) == (
        5, "cd/dvd", True), scsi
    assert node["image"]["virtual-size"] == 1 << 20
    await run(qmp, "device_add", {"driver": "cd", "id": "cd0", "drive": "cdsg"})

    step("device cd0 added")
    await run(qmp, "blockd-lock-medium", {"id": "cd0", "locked": True})
    assert await asyncio.to_thread(hw, "locked", True) is True
    assert (await cd0())["locked"] is True

    await run(qmp, "eject", {"id": "cd0", "force": True})
    assert await asyncio.to_thread(hw, "tray_open", True) is True
    assert witness.device("scsicd0")["locked"] is False  # the lock went with the eject
    info = await cd0()
    assert (info["tray_open"], info["locked"]) == (True, False), info

    await run(qmp, "blockdev-close-tray", {"id": "cd0"})
    assert await asyncio.to_thread(hw, "tray_open", False) is False
    assert (await cd0())["tray_open"] is False

    await run(qmp, "block-export-add", {"type": "nbd", "id": "e-cd", "node-name": "cdsg",
                                           "name": "cd"})
    step("exported")

    def first_sector() -> Any:
        h = nbd.NBD()
        try:
            h.connect_uri(uri(blockd.nbd_sock, "cd"))
            return bytes(h.pread(SECTOR, 0))
        except nbd.Error as err:  # the drive spins the disc up after the tray closed
            step(f"NBD read: {err}")
            return err
        finally:
            with contextlib.suppress(nbd.Error):
                h.shutdown()

    got = await asyncio.to_thread(until, first_sector, lambda r: isinstance(r, bytes), 20)
    step("NBD read done")
    assert got == disc_sector("a", 0)


async def test_empty_cd_drive_is_not_ready(qmp: QMPClient, vm: VM) -> None:
    dev = vm.device("scsicd1")
    assert dev.sg is not None
    await run(qmp, "blockdev-add", {"driver": "sg", "node-name": "cdsg1",
                                       "filename": dev.sg})
    node = await named_node(qmp, "cdsg1")
    assert node["image"]["virtual-size"] == 0
    assert node["blockd-scsi"]["peripheral-type"] == 5
    await run(qmp, "device_add", {"driver": "cd", "id": "cd1", "drive": "cdsg1"})

    async def tur(**target: str) -> dict[str, Any]:
        reply: dict[str, Any] = {}
        for _ in range(3):  # a unit attention first is the drive's right
            reply = await scsi_command(qmp, "000000000000", **target)
            if reply.get("sense", {}).get("key") != 6:
                break
        return reply

    for target in ({"node": "cdsg1"}, {"id": "cd1"}):
        reply = await tur(**target)
        assert reply["status"] == 2 and reply["status-name"] == "CHECK CONDITION", reply
        sense = reply["sense"]
        assert (sense["key"], sense["key-name"], sense["asc"]) == (2, "NOT READY", 0x3A), sense
        assert "data" not in reply
