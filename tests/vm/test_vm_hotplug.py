"""Hotplug on real hardware: the emulator plugs and unplugs a disk and swaps a disc.

One guest: a virtio-scsi controller with a CD-ROM drive holding disc "a" (scsicd0) and
an empty one (scsicd1); udevd runs in the guest.  blockd runs once for the module with
``[[hotplug.rule]]`` rules (see :data:`RULES`): the empty drive is ignored, the drive
with the disc is attached as ``cd`` (host_cdrom, exported read-only as "cd"), and any
disk whose unit serial number (VPD page 0x80, udev's ID_SCSI_SERIAL) starts with
``HOT`` is attached read-write under its serial number and exported writable under its
kernel name.

The emulator's own QMP (the witness) is the hand at the machine: ``blockdev-add`` of an
image in the shared directory (a host path the emulator opens) and ``device_add`` of a
``scsi-hd`` on the virtio-scsi bus plug a disk in; the guest kernel finds it (virtio-scsi
rescan), udev names it, and blockd attaches it by the rules.  ``device_del`` pulls it out
again.  What blockd did is checked through its QMP (qemu.qmp: events, query-block,
blockd-query-hotplug), through NBD (libnbd), and against the image file itself (read
through the share).

Seen with this kernel: pulling the disk out makes the emulator raise a unit attention
(REPORTED LUNS DATA HAS CHANGED) on the CD drive too; the kernel fails the read that
gets it and sr then refuses I/O on the drive until its next media check (the kernel's
2 s event poll, or an open), so blockd's reads of ``cd`` may fail with EIO for up to
about 2 s after an unplug.  The unplug test allows that, explained by the kernel's log.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import DaemonProcess, blockd_argv, start_daemon
from guest import (
    HD_SIZE,
    SECTOR,
    VM,
    QMPError,
    Witness,
    disc_sector,
    find_node_by_serial,
    make_image,
    udev_settle,
)
from nbdclients import libnbd, uri
from qemu.qmp import EventListener, QMPClient

VM_HARDWARE = ["scsi-cd", "scsi-cd-empty"]

HOT_SERIAL = "HOT0001"  # the plugged disk's serial number: blockd's device id
HOT_NODE = "hotnode"  # the emulator's node of the plugged disk's image
HOT_QDEV = "hotdisk"  # the emulator's device id of the plugged disk
HOT_LABEL = "hot"  # the image is made of disc_sector("hot", n)
CD = "cd"  # blockd's device id of the drive with a disc
# Under TCG the guest kernel's SCSI scan, udev's rules and blockd's open take a while.
ATTACH_TIMEOUT = 30.0
DETACH_TIMEOUT = 30.0
RECOVERY_WINDOW = 30.0  # seconds a test keeps reading a drive that returns EIO
# The kernel polls a drive for media events every 2 s (block's events_dfl_poll_msecs,
# set by udev's 60-block.rules); that poll clears sr's "changed" flag.
RECOVERY_BOUND = 5.0

RULES = f"""
[[hotplug.rule]]
name = "empty-cd"
match = {{ SUBSYSTEM = "block", ID_CDROM = "1", ID_SCSI_SERIAL = "BLOCKD-scsicd1" }}
action = "ignore"

[[hotplug.rule]]
name = "cd"
match = {{ SUBSYSTEM = "block", ID_CDROM = "1" }}
id = "{CD}"
export = {{ name = "{CD}" }}

[[hotplug.rule]]
name = "hot-disk"
match = {{ SUBSYSTEM = "block", DEVTYPE = "disk", ID_SCSI_SERIAL = "HOT*" }}
id = "{{ID_SCSI_SERIAL}}"
read-only = false
export = {{ name = "{{kernel}}", writable = true }}
"""

EVENTS = ("BLOCKD_DEVICE_ADDED", "DEVICE_DELETED", "BLOCK_EXPORT_DELETED",
          "DEVICE_TRAY_MOVED")


# ----------------------------------------------------------------------------- blockd


class Blockd:
    def __init__(self, daemon: DaemonProcess, tmp: Path) -> None:
        self.daemon = daemon
        self.nbd_sock = str(tmp / "nbd.sock")


@pytest.fixture(scope="module")
def hot_image(vm: VM) -> Path:
    """The plugged disk's image, in the shared directory: the emulator opens it by the
    same path (the guest sees the host's file there)."""
    return make_image(vm.shared / "hot.img", HOT_LABEL, HD_SIZE)


@pytest.fixture(scope="module")
def blockd(vm: VM, hot_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blockd]:
    """One blockd for the group with the hotplug rules and an NBD server."""
    tmp = tmp_path_factory.mktemp("blockd-hotplug")
    conf = tmp / "blockd.toml"
    conf.write_text(RULES)
    udev_settle()
    daemon = start_daemon(blockd_argv(
        "--config", str(conf), "--qmp", str(tmp / "qmp.sock"),
        "--nbd-server", f"addr.type=unix,addr.path={tmp / 'nbd.sock'}",
    ), tmp, "blockd", timeout=120)
    try:
        yield Blockd(daemon, tmp)
    finally:
        assert daemon.stop() == 0, daemon.stderr()
        print(f"---- blockd's stderr ----\n{daemon.stderr()}")


class Session:
    """A QMP session with the module's blockd, listening for the hotplug events."""

    def __init__(self, qmp: QMPClient, blockd: Blockd) -> None:
        self.qmp = qmp
        self.blockd = blockd
        self.events = EventListener(EVENTS)
        qmp.register_listener(self.events)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(command, arguments)

    async def blocks(self) -> dict[str, Any]:
        return {b["device"]: b for b in await self.execute("query-block")}

    async def event(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        """The next event ``name`` whose data holds ``match`` (others are dropped)."""
        deadline = time.monotonic() + timeout
        seen: list[Any] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {name} {match} from blockd within {timeout} s; got {seen}\n"
                    f"---- blockd's stderr ----\n{self.blockd.daemon.stderr()}")
            try:
                event: Any = await asyncio.wait_for(self.events.get(), left)
            except TimeoutError:
                continue
            seen.append(event)
            data = event.get("data", {})
            if event["event"] == name and all(data.get(k) == v for k, v in match.items()):
                found: dict[str, Any] = event
                return found


@pytest.fixture
async def qmp(blockd: Blockd) -> AsyncIterator[Session]:
    client = await blockd.daemon.client()
    try:
        yield Session(client, blockd)
    finally:
        await client.disconnect()


# ------------------------------------------------------------------- the emulator's hand


def emulator_has_disk(witness: Witness) -> bool:
    return any(b.get("qdev") == HOT_QDEV or HOT_QDEV in str(b.get("qdev", ""))
               for b in witness.query_block())


def plug(witness: Witness, image: Path) -> None:
    """Plug the disk in: its image as a node of the emulator, then a scsi-hd on it."""
    nodes = {n["node-name"] for n in witness.execute("query-named-block-nodes")}
    if HOT_NODE not in nodes:
        witness.execute("blockdev-add", {
            "driver": "raw", "node-name": HOT_NODE,
            "file": {"driver": "file", "filename": str(image)}})
    witness.execute("device_add", {"driver": "scsi-hd", "bus": "vscsi0.0", "drive": HOT_NODE,
                                   "id": HOT_QDEV, "serial": HOT_SERIAL})


def unplug(witness: Witness) -> None:
    """Pull the disk out; returns once the emulator says the device is gone."""
    witness.execute("device_del", {"id": HOT_QDEV})
    witness.wait_event("DEVICE_DELETED", 30, {"device": HOT_QDEV})


def udev_info(node: str) -> str:
    done = subprocess.run(["udevadm", "info", node], capture_output=True, text=True,
                          check=False)
    return done.stdout + done.stderr


async def ensure_plugged(qmp: Session, witness: Witness, image: Path) -> None:
    """The disk plugged in and attached by blockd, whatever an earlier test left."""
    if HOT_SERIAL in await qmp.blocks():
        return
    if not emulator_has_disk(witness):
        plug(witness, image)
    for _ in range(int(ATTACH_TIMEOUT * 5)):
        if HOT_SERIAL in await qmp.blocks():
            break
        await asyncio.sleep(0.2)
    assert HOT_SERIAL in await qmp.blocks(), "blockd did not attach the plugged disk"
    qmp.events.clear()


async def ensure_unplugged(qmp: Session, witness: Witness) -> None:
    """The disk out of the machine and out of blockd."""
    if emulator_has_disk(witness):
        unplug(witness)
    for _ in range(int(DETACH_TIMEOUT * 5)):
        if HOT_SERIAL not in await qmp.blocks():
            break
        await asyncio.sleep(0.2)
    assert HOT_SERIAL not in await qmp.blocks(), "blockd still holds the unplugged disk"
    qmp.events.clear()


def read_image(image: Path, offset: int, length: int) -> bytes:
    """The image file behind the disk (the host's file, through the share)."""
    Path("/proc/sys/vm/drop_caches").write_text("3\n")  # no stale 9p pages
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length)


def dmesg() -> str:
    """The guest kernel's log."""
    return subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout


async def nbd_connect(nbd: Any, sock: str, name: str) -> Any:
    h = nbd.NBD()
    await asyncio.to_thread(h.connect_uri, uri(sock, name))
    return h


# ------------------------------------------------------------------------------ tests


async def test_the_drive_with_a_disc_is_attached_at_start(qmp: Session, vm: VM) -> None:
    """Coldplug: the drive with disc "a" is ``cd`` (host_cdrom on its sr node, read-only,
    exported); the empty drive matched the ignore rule and is not attached."""
    drive = vm.device("scsicd0")
    blocks = await qmp.blocks()
    assert set(blocks) == {CD}, (blocks, udev_info(vm.device("scsicd1").node))
    cd = blocks[CD]
    assert cd["removable"] is True and cd["tray_open"] is False
    assert cd["inserted"]["file"] == drive.node
    assert cd["inserted"]["drv"] == "host_cdrom" and cd["inserted"]["ro"] is True
    assert cd["inserted"]["image"]["virtual-size"] == 1 << 20
    nbd = libnbd()
    h = await nbd_connect(nbd, qmp.blockd.nbd_sock, CD)
    try:
        assert h.is_read_only() is True
        assert await asyncio.to_thread(h.pread, SECTOR, 0) == disc_sector("a", 0)
    finally:
        h.shutdown()


async def test_a_plugged_disk_is_attached_and_exported(qmp: Session, witness: Witness,
                                                      hot_image: Path) -> None:
    await ensure_unplugged(qmp, witness)
    started = time.monotonic()
    await asyncio.to_thread(plug, witness, hot_image)
    added = await qmp.event("BLOCKD_DEVICE_ADDED", ATTACH_TIMEOUT, id=HOT_SERIAL)
    latency = time.monotonic() - started
    print(f"BLOCKD_DEVICE_ADDED {latency:.2f} s after device_add")
    node = await asyncio.to_thread(find_node_by_serial, HOT_SERIAL, 10)
    info = await asyncio.to_thread(udev_info, node)
    print(f"---- udevadm info {node} ----\n{info}")
    data = added["data"]
    assert data["devname"] == node, info
    assert data["driver"] == "host_device"
    assert data["node-name"] == f"{HOT_SERIAL}-node"
    assert data["properties"]["SUBSYSTEM"] == "block"
    assert data["properties"]["DEVTYPE"] == "disk"
    assert data["properties"]["ID_BUS"] == "scsi"

    block = (await qmp.blocks())[HOT_SERIAL]
    assert block["inserted"]["file"] == node  # the kernel's node, not a by-id link
    assert block["inserted"]["ro"] is False
    assert block["inserted"]["image"]["virtual-size"] == HD_SIZE
    assert block["removable"] is False
    kernel = Path(node).name
    exports = {e["id"]: e for e in await qmp.execute("query-block-exports")}
    mine = [e for e in exports.values() if e["node-name"] == f"{HOT_SERIAL}-node"]
    assert len(mine) == 1, exports

    nbd = libnbd()
    h = await nbd_connect(nbd, qmp.blockd.nbd_sock, kernel)
    try:
        assert h.get_size() == HD_SIZE and h.is_read_only() is False
        assert await asyncio.to_thread(h.pread, SECTOR, 5 * SECTOR) == \
            disc_sector(HOT_LABEL, 5)
        fresh = b"".join(f"written through NBD {n:08d}\n".encode() for n in range(2048))
        fresh = fresh[:64 << 10]
        await asyncio.to_thread(h.pwrite, fresh, 1 << 20)
        await asyncio.to_thread(h.flush)
    finally:
        h.shutdown()
    assert await asyncio.to_thread(read_image, hot_image, 1 << 20, len(fresh)) == fresh
    assert latency <= ATTACH_TIMEOUT


async def test_an_unplugged_disk_is_detached(qmp: Session, witness: Witness,
                                             hot_image: Path, vm: VM) -> None:
    await ensure_plugged(qmp, witness, hot_image)
    export = next(e["id"] for e in await qmp.execute("query-block-exports")
                  if e["node-name"] == f"{HOT_SERIAL}-node")
    nbd = libnbd()
    kernel = Path((await qmp.blocks())[HOT_SERIAL]["inserted"]["file"]).name
    h = await nbd_connect(nbd, qmp.blockd.nbd_sock, kernel)
    before = dmesg()
    started = time.monotonic()
    await asyncio.to_thread(unplug, witness)
    deleted = await qmp.event("DEVICE_DELETED", DETACH_TIMEOUT, device=HOT_SERIAL)
    print(f"DEVICE_DELETED {time.monotonic() - started:.2f} s after device_del")
    assert deleted["data"]["path"]
    # The export went first, and its client was cut off (an error, not a hang).
    qmp.events.clear()
    exports = await qmp.execute("query-block-exports")
    assert [e for e in exports if e["id"] == export] == [], exports
    with pytest.raises(nbd.Error):
        await asyncio.to_thread(h.pread, SECTOR, 0)
    with pytest.raises(nbd.Error):  # a new client finds no such export
        await nbd_connect(nbd, qmp.blockd.nbd_sock, kernel)

    blocks = await qmp.blocks()
    assert HOT_SERIAL not in blocks
    nodes = [n["node-name"] for n in await qmp.execute("query-named-block-nodes")]
    assert f"{HOT_SERIAL}-node" not in nodes
    assert blocks[CD]["inserted"]["drv"] == "host_cdrom"
    # blockd keeps serving the drive.  The emulator tells the units on the bus that it
    # changed (UNIT ATTENTION, REPORTED LUNS DATA HAS CHANGED); for a removable unit the
    # kernel fails the command that gets it and sets the device's "changed" flag, and
    # sr then refuses I/O until a media check (an open, the kernel's event poll)
    # clears it: blockd's reads through its open descriptor fail meanwhile.
    sr = Path(vm.device("scsicd0").node).name
    poll = {p: Path(p).read_text().strip() for p in (
        f"/sys/block/{sr}/events_poll_msecs", "/sys/module/block/parameters/events_dfl_poll_msecs")}
    h2 = await nbd_connect(nbd, qmp.blockd.nbd_sock, CD)
    try:
        tries: list[tuple[float, bytes | str]] = []
        first = time.monotonic()
        while time.monotonic() - first < RECOVERY_WINDOW:
            try:
                got: bytes | str = bytes(await asyncio.to_thread(h2.pread, SECTOR, 0))
            except nbd.Error as err:
                got = f"{err.errno}: {err}"
            tries.append((round(time.monotonic() - first, 2), got))
            if isinstance(got, bytes):
                break
            await asyncio.sleep(0.1)
        kernel_log = dmesg()[len(before):]
        failed = [(t, g) for t, g in tries if isinstance(g, str)]
        detail = (f"reads: {failed[:3]}...{tries[-1:]} ({len(failed)} failed); "
                  f"event polling {poll}\n---- the guest kernel since device_del ----\n"
                  f"{kernel_log}\n---- blockd ----\n{qmp.blockd.daemon.stderr()}")
        assert tries[-1][1] == disc_sector("a", 0), detail
        if failed:
            assert all(g.startswith("EIO") for _, g in failed), detail
            assert any(f"[{sr}]" in line and "Reported luns data has changed" in line
                       for line in kernel_log.splitlines()), detail
            print(f"reads of {sr} through blockd failed with EIO for {tries[-1][0]:.2f} s "
                  "after the unplug (the drive's unit attention)")
            assert tries[-1][0] <= RECOVERY_BOUND, detail
    finally:
        h2.shutdown()


async def test_export_deleted_event_on_unplug(qmp: Session, witness: Witness,
                                              hot_image: Path) -> None:
    """BLOCK_EXPORT_DELETED for the disk's export comes before its DEVICE_DELETED."""
    await ensure_plugged(qmp, witness, hot_image)
    export = next(e["id"] for e in await qmp.execute("query-block-exports")
                  if e["node-name"] == f"{HOT_SERIAL}-node")
    await asyncio.to_thread(unplug, witness)
    gone = await qmp.event("BLOCK_EXPORT_DELETED", DETACH_TIMEOUT, id=export)
    assert gone["data"] == {"id": export}
    await qmp.event("DEVICE_DELETED", DETACH_TIMEOUT, device=HOT_SERIAL)


async def test_a_replugged_disk_comes_back_under_the_same_id(qmp: Session, witness: Witness,
                                                             hot_image: Path) -> None:
    await ensure_unplugged(qmp, witness)
    started = time.monotonic()
    await asyncio.to_thread(plug, witness, hot_image)
    added = await qmp.event("BLOCKD_DEVICE_ADDED", ATTACH_TIMEOUT)
    print(f"BLOCKD_DEVICE_ADDED {time.monotonic() - started:.2f} s after device_add")
    node = await asyncio.to_thread(find_node_by_serial, HOT_SERIAL, 10)
    assert added["data"]["id"] == HOT_SERIAL  # the serial's, whatever the kernel's name
    assert added["data"]["devname"] == node
    block = (await qmp.blocks())[HOT_SERIAL]
    assert block["inserted"]["file"] == node
    # The same disk: what an earlier test wrote (or the image's own sectors) is there.
    nbd = libnbd()
    h = await nbd_connect(nbd, qmp.blockd.nbd_sock, Path(node).name)
    try:
        got = await asyncio.to_thread(h.pread, SECTOR, 5 * SECTOR)
        assert got == disc_sector(HOT_LABEL, 5)
        assert await asyncio.to_thread(h.pread, 4096, 1 << 20) == \
            await asyncio.to_thread(read_image, hot_image, 1 << 20, 4096)
    finally:
        h.shutdown()


async def test_a_swapped_disc_shows_in_blockd(qmp: Session, witness: Witness,
                                              vm: VM) -> None:
    """The button opens the tray (blockd sees it by polling), the emulator puts disc "b"
    in and closes it (a media change udev reports): blockd reports both tray movements,
    and its export reads the new disc."""
    nbd = libnbd()
    udev_settle()
    try:
        started = time.monotonic()
        await asyncio.to_thread(witness.press_button, "scsicd0")
        opened = await qmp.event("DEVICE_TRAY_MOVED", 15, id=CD)
        print(f"DEVICE_TRAY_MOVED (open) {time.monotonic() - started:.2f} s after the button")
        assert opened["data"] == {"device": CD, "id": CD, "tray-open": True}
        assert (await qmp.blocks())[CD]["tray_open"] is True

        started = time.monotonic()
        await asyncio.to_thread(witness.change_medium, "scsicd0", vm.disc("b"))
        closed = await qmp.event("DEVICE_TRAY_MOVED", 15, id=CD)
        print(f"DEVICE_TRAY_MOVED (closed) {time.monotonic() - started:.2f} s after the swap")
        assert closed["data"] == {"device": CD, "id": CD, "tray-open": False}

        async def first_sector() -> bytes | str:
            try:
                h = await nbd_connect(nbd, qmp.blockd.nbd_sock, CD)
            except nbd.Error as err:
                return str(err)
            try:
                return bytes(await asyncio.to_thread(h.pread, SECTOR, 0))
            except nbd.Error as err:  # no medium for a moment while the drive spins up
                return str(err)
            finally:
                h.shutdown()

        got: bytes | str = b""
        for _ in range(100):
            got = await first_sector()
            if got == disc_sector("b", 0):
                break
            await asyncio.sleep(0.2)
        assert got == disc_sector("b", 0)
        cd = (await qmp.blocks())[CD]
        assert cd["tray_open"] is False
        assert cd["inserted"]["image"]["virtual-size"] == 1 << 20
        # Still the same attachment: a disc change is no hotplug.
        state = await qmp.execute("blockd-query-hotplug")
        assert [d["id"] for d in state["devices"] if d["rule"] == "cd"] == [CD]
    finally:
        witness.change_medium("scsicd0", vm.disc("a"))


async def test_query_hotplug_shows_udev_and_the_rules(qmp: Session, witness: Witness,
                                                      hot_image: Path, vm: VM) -> None:
    await ensure_plugged(qmp, witness, hot_image)
    state = await qmp.execute("blockd-query-hotplug")
    assert state["enabled"] is True
    assert state["monitor"] == "udev" and state["udevd-running"] is True
    rules = {r["name"]: r for r in state["rules"]}
    assert list(rules) == ["empty-cd", "cd", "hot-disk"]
    assert rules["empty-cd"]["action"] == "ignore"
    assert rules["empty-cd"]["matched"] >= 1 and rules["empty-cd"]["attached"] == 0
    assert rules["cd"]["attached"] == 1 and rules["cd"]["failed"] == 0
    assert rules["hot-disk"]["attached"] >= 1 and rules["hot-disk"]["failed"] == 0
    assert rules["hot-disk"]["match"] == {"SUBSYSTEM": "block", "DEVTYPE": "disk",
                                          "ID_SCSI_SERIAL": "HOT*"}
    devices = {d["id"]: d for d in state["devices"]}
    node = await asyncio.to_thread(find_node_by_serial, HOT_SERIAL, 10)
    assert set(devices) == {CD, HOT_SERIAL}
    assert devices[HOT_SERIAL]["devname"] == node
    assert devices[HOT_SERIAL]["driver"] == "host_device"
    assert devices[HOT_SERIAL]["rule"] == "hot-disk" and "export" in devices[HOT_SERIAL]
    assert devices[CD]["devname"] == vm.device("scsicd0").node
    assert devices[CD]["driver"] == "host_cdrom" and devices[CD]["rule"] == "cd"
    assert state["events"]["seen"] > 0 and state["events"]["acted"] >= 2
    assert state["events"]["lost"] == 0
    # Leave the machine as it booted.
    await ensure_unplugged(qmp, witness)
    try:
        witness.execute("blockdev-del", {"node-name": HOT_NODE})
    except QMPError as err:
        pytest.fail(f"the emulator kept the disk's node busy: {err}")
