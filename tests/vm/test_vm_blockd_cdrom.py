"""blockd on the kernel's real CD-ROM drivers, with the emulator as witness.

One guest: an ATAPI drive with disc "a" (cdrom0) and an empty ATAPI drive (cdrom1),
driven by the guest kernel's sr and cdrom drivers, udevd running with
contrib/udev/61-blockd.rules installed.  Each test starts blockd in the guest on
a host_cdrom node of a drive and checks what it did through blockd's QMP (qemu.qmp)
and through the emulator's own QMP (the witness): what the hardware saw.  The witness
also plays the user at the drive (the eject button, a disc swap).

blockd follows a drive through udev (pyudev's netlink monitor: change events, with
DISK_EJECT_REQUEST for the button of a locked drive) and by polling its status every
2 s (``--media-poll``).  Polling alone would see most tray movements and hide a broken
udev path, so the tests marked ``udev-only`` run blockd with ``--media-poll 0``.  What
udev can report depends on the drive: QEMU's drives report a media event when the tray
closes and an eject request, but none while the tray is open (``event_status_media``
in hw/ide/atapi.c and hw/scsi/scsi-disk.c), so the guest kernel sends no uevent when the
button opens the tray; only polling sees that.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from daemons import DaemonProcess, blockd_argv, start_daemon
from guest import SECTOR, VM, GuestDevice, QMPError, Witness, disc_sector, make_image
from nbdclients import libnbd, uri
from qemu.qmp import EventListener, ExecuteError, QMPClient

from blockd.devices._ioctl import CDROM_LOCKDOOR, ioctl_value

VM_HARDWARE = ["atapi-cd", "atapi-cd-empty"]

TRAY_EVENT_DEADLINE = 3.0  # seconds: the bound for noticing a tray moved by hand


@pytest.fixture
def cdrom0(vm: VM, witness: Witness) -> Iterator[GuestDevice]:
    """The drive with disc "a", given back unlocked, closed, with disc "a"."""
    dev = vm.device("cdrom0")
    _events_poll(dev)
    yield dev
    witness.execute("eject", {"id": "cdrom0", "force": True})  # clears any lock too
    witness.change_medium("cdrom0", vm.disc("a"))


def _events_poll(dev: GuestDevice, msecs: int = 500) -> None:
    """Let the kernel poll the drive for media events often (udev's default is 2 s)."""
    path = Path("/sys/class/block", Path(dev.node).name, "events_poll_msecs")
    path.write_text(str(msecs))


class Blockd:
    """blockd in the guest, holding one drive as device cd0, with its QMP client."""

    def __init__(self, daemon: DaemonProcess, qmp: QMPClient) -> None:
        self.daemon, self.qmp = daemon, qmp
        self.events = EventListener("DEVICE_TRAY_MOVED")
        qmp.register_listener(self.events)

    async def cd0(self) -> dict[str, Any]:
        blocks = await self.qmp.execute("query-block")
        return next(b for b in blocks if b["device"] == "cd0")

    async def tray_event(self, timeout: float) -> dict[str, Any]:
        event = await asyncio.wait_for(self.events.get(), timeout)
        data: dict[str, Any] = event["data"]
        return data

    def no_events(self) -> bool:
        return self.events.empty()


@pytest.fixture
def media_poll() -> float | None:
    """blockd's ``--media-poll`` (None: its default); tests parametrize it to 0."""
    return None


@pytest.fixture
async def blockd(cdrom0: GuestDevice, tmp_path: Path,
                 media_poll: float | None) -> AsyncIterator[Blockd]:
    daemon = _start(cdrom0, tmp_path, media_poll=media_poll)
    qmp = await daemon.client()
    if media_poll == 0:  # then udev is all blockd has: its monitor must be up
        assert "no udev events" not in daemon.stderr(), daemon.stderr()
    yield Blockd(daemon, qmp)
    await qmp.disconnect()
    assert daemon.stop() == 0, daemon.stderr()


EXPORT = {"type": "nbd", "id": "e0", "node-name": "drive0", "name": "cd"}


def _start(dev: GuestDevice, tmp_path: Path, *, export: bool = True,
           media_poll: float | None = None, prefix: Sequence[str] = ()) -> DaemonProcess:
    """blockd on ``dev``; ``prefix`` runs it through another command (``setpriv ...``)."""
    sock = str(tmp_path / "qmp.sock")
    exporting = ["--export", "type=nbd,id=e0,node-name=drive0,name=cd"] if export else []
    polling = [] if media_poll is None else ["--media-poll", str(media_poll)]
    return start_daemon([*prefix, *blockd_argv(
        "--qmp", sock, *polling,
        "--blockdev", f"driver=host_cdrom,node-name=drive0,filename={dev.node}",
        "--device", "cd,id=cd0,drive=drive0",
        "--nbd-server", f"addr.type=unix,addr.path={tmp_path / 'nbd.sock'}",
        *exporting)], tmp_path, "blockd", timeout=120)


def until(probe: Callable[[], Any], want: Callable[[Any], bool], timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if want(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def nbd_first_sector(nbd: Any, sock: str) -> tuple[int, bytes]:
    """A new NBD client's view of the export "cd": its size and first sector."""
    h = nbd.NBD()
    h.connect_uri(uri(sock, "cd"))
    try:
        return h.get_size(), h.pread(SECTOR, 0)
    finally:
        h.shutdown()


async def witnessed(witness: Witness, key: str, value: bool, timeout: float = 15) -> bool:
    """What the emulator says of cdrom0's ``key`` once it is ``value`` (or the deadline)."""
    got = await asyncio.to_thread(
        until, lambda: witness.device("cdrom0")[key], lambda v: v == value, timeout)
    return bool(got)


# -- lock, eject, close ---------------------------------------------------------------


async def test_lock_and_unlock_reach_the_drive(blockd: Blockd, witness: Witness) -> None:
    assert witness.device("cdrom0")["locked"] is False
    await blockd.qmp.execute("blockd-lock-medium", {"id": "cd0", "locked": True})
    assert await witnessed(witness, "locked", True) is True
    assert (await blockd.cd0())["locked"] is True
    await blockd.qmp.execute("blockd-lock-medium", {"id": "cd0", "locked": False})
    assert await witnessed(witness, "locked", False) is False
    assert (await blockd.cd0())["locked"] is False


async def test_eject_and_close_move_the_real_tray(blockd: Blockd, witness: Witness) -> None:
    await blockd.qmp.execute("eject", {"id": "cd0"})
    assert await blockd.tray_event(5) == {"device": "cd0", "id": "cd0", "tray-open": True}
    seen = await asyncio.to_thread(witness.wait_event, "DEVICE_TRAY_MOVED", 15)
    assert seen["data"]["tray-open"] is True and seen["data"]["id"] == "cdrom0"
    info = await blockd.cd0()
    assert info["tray_open"] is True
    assert info["inserted"]["node-name"] == "drive0"  # the drive stays attached

    await blockd.qmp.execute("blockdev-close-tray", {"id": "cd0"})
    assert await blockd.tray_event(5) == {"device": "cd0", "id": "cd0", "tray-open": False}
    seen = await asyncio.to_thread(
        witness.wait_event, "DEVICE_TRAY_MOVED", 15, {"tray-open": False})
    assert seen["data"]["id"] == "cdrom0"
    assert await witnessed(witness, "tray_open", False) is False


async def test_locked_eject_needs_force(blockd: Blockd, witness: Witness) -> None:
    await blockd.qmp.execute("blockd-lock-medium", {"id": "cd0", "locked": True})
    with pytest.raises(ExecuteError) as info:
        await blockd.qmp.execute("eject", {"id": "cd0"})
    assert str(info.value) == ("Device 'cd0' is locked and force was not specified, "
                               "wait for tray to open and try again")
    await asyncio.sleep(1)
    hw = witness.device("cdrom0")
    assert hw["tray_open"] is False and hw["locked"] is True
    assert blockd.no_events()

    await blockd.qmp.execute("eject", {"id": "cd0", "force": True})
    assert (await blockd.tray_event(5))["tray-open"] is True
    assert await witnessed(witness, "tray_open", True) is True
    assert witness.device("cdrom0")["locked"] is False
    assert (await blockd.cd0())["locked"] is False


# -- the hardware moves by itself -----------------------------------------------------


async def test_the_button_is_seen_within_three_seconds(blockd: Blockd, witness: Witness) -> None:
    """By polling: the emulated drive gives the kernel no media event for it (see above)."""
    await asyncio.sleep(1)  # blockd settled (udev's events from its own open are over)
    started = time.monotonic()
    await asyncio.to_thread(witness.press_button, "cdrom0")
    event = await blockd.tray_event(TRAY_EVENT_DEADLINE + 1)
    took = time.monotonic() - started
    assert event == {"device": "cd0", "id": "cd0", "tray-open": True}
    assert took <= TRAY_EVENT_DEADLINE, f"DEVICE_TRAY_MOVED after {took:.1f} s"
    assert (await blockd.cd0())["tray_open"] is True


@pytest.mark.parametrize("media_poll", [0], ids=["udev-only"])
async def test_a_tray_closed_by_hand_is_seen_within_three_seconds(blockd: Blockd,
                                                                  witness: Witness) -> None:
    """The drive reports a media event when its tray closes: a DISK_MEDIA_CHANGE uevent,
    which is all blockd has with polling off."""
    await blockd.qmp.execute("eject", {"id": "cd0"})
    assert (await blockd.tray_event(5))["tray-open"] is True
    assert await witnessed(witness, "tray_open", True) is True
    await asyncio.sleep(1)
    started = time.monotonic()
    await asyncio.to_thread(witness.execute, "blockdev-close-tray", {"id": "cdrom0"})
    event = await blockd.tray_event(TRAY_EVENT_DEADLINE + 1)
    took = time.monotonic() - started
    assert event == {"device": "cd0", "id": "cd0", "tray-open": False}
    assert took <= TRAY_EVENT_DEADLINE, f"DEVICE_TRAY_MOVED after {took:.1f} s"
    assert (await blockd.cd0())["tray_open"] is False


async def test_a_new_disc_shows_through_nbd(blockd: Blockd, witness: Witness, vm: VM,
                                            tmp_path: Path) -> None:
    nbd = libnbd()
    sock = str(tmp_path / "nbd.sock")

    def first_sector() -> tuple[int, bytes]:
        return nbd_first_sector(nbd, sock)

    assert await asyncio.to_thread(first_sector) == (1 << 20, disc_sector("a", 0))
    big = make_image(vm.shared / "disc-big.img", "big", 3 << 20)
    # The emulator swaps the disc in one go: the guest sees a media change, not
    # necessarily a tray movement, and blockd learns the new size from the drive.
    await asyncio.to_thread(witness.change_medium, "cdrom0", big)

    def new_disc() -> Any:
        def attempt() -> Any:
            try:
                return first_sector()
            except nbd.Error as err:  # no medium for a moment while the drive spins up
                return err
        return until(attempt, lambda r: isinstance(r, tuple) and r[0] == 3 << 20, 20)

    assert await asyncio.to_thread(new_disc) == (3 << 20, disc_sector("big", 0))
    info = await blockd.cd0()
    assert info["inserted"]["image"]["virtual-size"] == 3 << 20


async def test_reads_without_a_disc_fail_with_no_medium(blockd: Blockd, witness: Witness,
                                                        tmp_path: Path) -> None:
    nbd = libnbd()
    h = nbd.NBD()
    sock = str(tmp_path / "nbd.sock")
    await asyncio.to_thread(h.connect_uri, uri(sock, "cd"))
    errors = EventListener("BLOCK_IO_ERROR")
    with blockd.qmp.listen(errors):
        await asyncio.to_thread(witness.press_button, "cdrom0")
        await blockd.tray_event(15)
        with pytest.raises(nbd.Error) as info:
            await asyncio.to_thread(h.pread, SECTOR, 0)
        assert info.value.errno == "EIO"  # ENOMEDIUM has no NBD code
        # The tray shut with no disc in it: the drive itself reports no medium.
        witness.execute("blockdev-remove-medium", {"id": "cdrom0"})
        witness.execute("blockdev-close-tray", {"id": "cdrom0"})
        assert (await blockd.tray_event(15))["tray-open"] is False

        async def size() -> int:
            return int((await blockd.cd0())["inserted"]["image"]["virtual-size"])

        for _ in range(100):
            if await size() == 0:
                break
            await asyncio.sleep(0.2)
        assert await size() == 0
        with pytest.raises(nbd.Error) as info:
            await asyncio.to_thread(h.pread, SECTOR, 0)
        assert info.value.errno == "EIO"
    await asyncio.to_thread(h.shutdown)
    stats = next(s for s in await blockd.qmp.execute("query-blockstats")
                 if s["device"] == "cd0")
    assert stats["stats"]["failed_rd_operations"] == 2
    reasons = set()
    while not errors.empty():
        reasons.add((await errors.get())["data"]["reason"])
    assert reasons <= {"No medium found"}


async def test_an_empty_drive_at_start(vm: VM, witness: Witness, tmp_path: Path) -> None:
    """An empty drive opens; its export has nothing to offer until a disc goes in by hand."""
    nbd = libnbd()
    dev = vm.device("cdrom1")
    _events_poll(dev)
    daemon = _start(dev, tmp_path, export=False)
    qmp = await daemon.client()
    sock = str(tmp_path / "nbd.sock")

    def first_sector() -> tuple[int, bytes]:
        return nbd_first_sector(nbd, sock)

    try:
        blocks = await qmp.execute("query-block")
        cd0 = next(b for b in blocks if b["device"] == "cd0")
        assert cd0["removable"] is True and cd0["tray_open"] is False
        assert cd0["inserted"]["node-name"] == "drive0"
        assert cd0["inserted"]["image"]["virtual-size"] == 0
        with pytest.raises(ExecuteError, match="No medium found"):  # nothing to export (QEMU)
            await qmp.execute("block-export-add", EXPORT)

        await asyncio.to_thread(witness.change_medium, "cdrom1", vm.disc("b"))

        async def exported() -> None:
            for _ in range(100):
                try:
                    await qmp.execute("block-export-add", EXPORT)
                    return
                except ExecuteError:
                    await asyncio.sleep(0.2)
            await qmp.execute("block-export-add", EXPORT)

        await exported()

        def disc_b() -> Any:
            def attempt() -> Any:
                try:
                    return first_sector()
                except nbd.Error as err:
                    return err
            return until(attempt, lambda r: isinstance(r, tuple), timeout=20)

        assert await asyncio.to_thread(disc_b) == (1 << 20, disc_sector("b", 0))
    finally:
        await qmp.disconnect()
        assert daemon.stop() == 0, daemon.stderr()
        witness.execute("eject", {"id": "cdrom1", "force": True})
        witness.execute("blockdev-remove-medium", {"id": "cdrom1"})
        witness.execute("blockdev-close-tray", {"id": "cdrom1"})


async def test_eject_while_another_program_holds_the_drive(blockd: Blockd, witness: Witness,
                                                           cdrom0: GuestDevice) -> None:
    """Another opener does not keep the tray shut.  The cdrom layer would refuse
    CDROMEJECT then (EBUSY, which host_cdrom answers with SCSI commands through SG_IO),
    but since Linux 5.18 sr sends CDROMEJECT straight to START STOP UNIT without asking
    the cdrom layer (commit bc5519c18a32), so with the guest's kernel CDROMEJECT itself
    opens the tray.  test_unlock_while_another_program_holds_the_drive makes the cdrom
    layer refuse for real."""
    holder = subprocess.Popen(["sleep", "60"], stdin=os.open(cdrom0.node, os.O_RDONLY
                                                                | os.O_NONBLOCK))
    try:
        await blockd.qmp.execute("eject", {"id": "cd0"})
        assert (await blockd.tray_event(5))["tray-open"] is True
        assert await witnessed(witness, "tray_open", True) is True
    finally:
        holder.kill()
        holder.wait()


# What setpriv leaves blockd: root without CAP_SYS_ADMIN (CAP_SYS_RAWIO stays, which
# PREVENT ALLOW MEDIUM REMOVAL through SG_IO on a read-only descriptor needs).
WITHOUT_SYS_ADMIN = ["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"]


async def test_unlock_while_another_program_holds_the_drive(cdrom0: GuestDevice,
                                                            witness: Witness,
                                                            tmp_path: Path) -> None:
    """Without CAP_SYS_ADMIN the cdrom layer refuses to unlock a drive that another
    program has open (CDROM_LOCKDOOR(0): EBUSY); blockd then sends PREVENT ALLOW MEDIUM
    REMOVAL through SG_IO, and the drive unlocks."""
    daemon = _start(cdrom0, tmp_path, prefix=WITHOUT_SYS_ADMIN)
    qmp = await daemon.client()
    holder = os.open(cdrom0.node, os.O_RDONLY | os.O_NONBLOCK)
    try:
        await qmp.execute("blockd-lock-medium", {"id": "cd0", "locked": True})
        assert await witnessed(witness, "locked", True) is True
        # (blockd may have unlocked this way at start already, while udev had the drive.)
        refused = f"{cdrom0.node}: CDROM_LOCKDOOR refused (Device or resource busy), using SG_IO"
        before = daemon.stderr().count(refused)
        await qmp.execute("blockd-lock-medium", {"id": "cd0", "locked": False})
        assert await witnessed(witness, "locked", False) is False
        # The fallback happened: the kernel refused, and what blockd does after logging
        # this is the SCSI command, which raises unless the drive answers GOOD.
        assert daemon.stderr().count(refused) == before + 1, daemon.stderr()
    finally:
        os.close(holder)
        await qmp.disconnect()
        assert daemon.stop() == 0, daemon.stderr()


async def test_eject_of_a_drive_another_program_locked_and_holds(cdrom0: GuestDevice,
                                                                  witness: Witness,
                                                                  tmp_path: Path) -> None:
    """Another program locked the drive and keeps it open, and blockd runs without
    CAP_SYS_ADMIN: CDROMEJECT cannot lift the foreign lock and CDROM_LOCKDOOR(0) refuses
    with EBUSY, so blockd ejects with SCSI commands through SG_IO (ALLOW MEDIUM REMOVAL,
    START STOP UNIT), and the tray opens."""
    if witness.device("cdrom0")["tray_open"]:
        witness.execute("blockdev-close-tray", {"id": "cdrom0"})
    daemon = _start(cdrom0, tmp_path, prefix=WITHOUT_SYS_ADMIN)
    qmp = await daemon.client()
    holder = os.open(cdrom0.node, os.O_RDONLY | os.O_NONBLOCK)
    try:
        await asyncio.sleep(1)  # blockd settled (its start re-asserts its own lock)
        assert ioctl_value(holder, CDROM_LOCKDOOR, 1) == 0
        assert await witnessed(witness, "locked", True) is True
        refused = f"{cdrom0.node}: CDROM_LOCKDOOR refused (Device or resource busy), using SG_IO"
        before = daemon.stderr().count(refused)
        await qmp.execute("eject", {"id": "cd0"})
        assert await witnessed(witness, "tray_open", True) is True
        assert daemon.stderr().count(refused) == before + 1, daemon.stderr()
    finally:
        os.close(holder)
        await qmp.disconnect()
        assert daemon.stop() == 0, daemon.stderr()


async def test_the_button_on_a_drive_blockd_locked(blockd: Blockd, witness: Witness) -> None:
    """With the contrib udev rule, an eject request (the button of a locked drive) is
    blockd's to answer: its lock holds.  Unlocked, the button opens the tray."""
    await blockd.qmp.execute("blockd-lock-medium", {"id": "cd0", "locked": True})
    assert await witnessed(witness, "locked", True) is True
    with pytest.raises(QMPError):  # the emulator passes an eject request to the guest
        witness.execute("eject", {"id": "cdrom0"})
    await asyncio.sleep(4)  # the kernel polls, udev runs its rules, blockd reacts
    hw = witness.device("cdrom0")
    assert hw["tray_open"] is False and hw["locked"] is True
    assert blockd.no_events()

    await blockd.qmp.execute("blockd-lock-medium", {"id": "cd0", "locked": False})
    assert await witnessed(witness, "locked", False) is False
    witness.execute("eject", {"id": "cdrom0"})
    assert (await blockd.tray_event(TRAY_EVENT_DEADLINE + 1))["tray-open"] is True


@pytest.mark.parametrize("media_poll", [0], ids=["udev-only"])
async def test_the_button_on_a_drive_another_program_locked(blockd: Blockd, witness: Witness,
                                                            cdrom0: GuestDevice) -> None:
    """Another program locked the drive (as udev's cdrom_id does after a media change):
    the button then only sends an eject request, which reaches blockd as udev's
    DISK_EJECT_REQUEST; blockd, not holding the lock itself, opens the tray."""
    await asyncio.sleep(1)  # blockd settled (udev's events from its own open are over)
    fd = os.open(cdrom0.node, os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert ioctl_value(fd, CDROM_LOCKDOOR, 1) == 0
    finally:
        os.close(fd)  # not the last opener: the lock stays
    assert await witnessed(witness, "locked", True) is True
    started = time.monotonic()
    with pytest.raises(QMPError):  # the emulator passes an eject request to the guest
        witness.execute("eject", {"id": "cdrom0"})
    event = await blockd.tray_event(TRAY_EVENT_DEADLINE + 1)
    print(f"DEVICE_TRAY_MOVED after {time.monotonic() - started:.1f} s")
    assert event == {"device": "cd0", "id": "cd0", "tray-open": True}
    assert await witnessed(witness, "tray_open", True) is True
    assert (await blockd.cd0())["locked"] is False
