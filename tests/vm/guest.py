"""The VM test tier: run a test module inside a real Linux guest and report back.

Used on both sides of the guest boundary:

* On the host (the *outer* pytest run), :func:`run_group` boots the Debian kernel under
  QEMU (TCG) with virtme-ng once per test module ("group"), with the emulated hardware
  the module declares (``VM_HARDWARE``), and a :class:`WitnessRelay` that bridges the
  emulator's QMP monitor to a virtio-serial port of the guest.  The guest runs this file
  as a script (:func:`main`), which prepares udev and the kernel modules and runs the
  module's tests with the project's own venv; every test report is written as one JSON
  line into a directory shared read-write with the guest.  :func:`aggregate` and
  :func:`replay` turn those lines into the outer tests' outcomes.
* In the guest (the *inner* run, ``BLOCKD_IN_VM=1``), :class:`VM` describes the
  hardware (device nodes found by their serial numbers) and :class:`Witness` is a small
  synchronous QMP client for the emulator, reached through ``/dev/virtio-ports``.

Only the standard library is used, so the guest side needs nothing beyond the venv.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GUEST_SETUP = Path(__file__).resolve().parent / "guest_setup.sh"

IN_VM_ENV = "BLOCKD_IN_VM"  # "1" in the guest: tests run for real
REQUIRE_ENV = "BLOCKD_REQUIRE_VM"  # "1" (CI): a missing VM tool fails instead of skipping
MANIFEST_ENV = "BLOCKD_VM_MANIFEST"  # the guest's hardware description (JSON)
REPORT_ENV = "BLOCKD_VM_REPORT"  # where the inner run writes its JSON-lines report
KERNEL_ENV = "BLOCKD_VM_KERNEL"  # a kernel image to boot instead of the newest in /boot
TIMEOUT_ENV = "BLOCKD_VM_TIMEOUT"  # seconds for one group's boot and run (default 900)
VERBOSE_ENV = "BLOCKD_VM_VERBOSE"  # "1": the guest kernel's console goes to the log too
STRICT_ENV = "BLOCKD_STRICT_SKIPS"  # tests/allowed_skips.py; never set in the guest's run

# pytest-timeout limits (the default for other tests is pyproject's ``timeout``).  A
# replay item on the host may boot and run its whole group: the group's own limit
# (``BLOCKD_VM_TIMEOUT``) ends that first, this margin is for a runner that hangs.
REPLAY_TIMEOUT_MARGIN = 120
# One test inside the guest: TCG makes everything slow (starting blockd alone takes
# 5-30 s), so the guest's pytest gets this instead of pyproject's default.
INNER_TEST_TIMEOUT = 240

WITNESS_PORT = "org.blockd.witness"
WITNESS_DEV = f"/dev/virtio-ports/{WITNESS_PORT}"
WITNESS_QDEV = "witness"  # the virtserialport's QEMU id, named in VSERPORT_CHANGE

SECTOR = 2048  # a CD sector
DISC_SIZE = 1 << 20  # discs "a", "b", "c": 512 CD sectors each
HD_SIZE = 8 << 20  # scsi-hd images
HD_VENDOR = "BLOCKD"  # scsi-hd INQUIRY vendor (QEMU pads it to 8 characters)
HD_WWN_PREFIX = 0x5000C500  # NAA 5: the upper 32 bits of a scsi-hd's WWN
DISC_LABELS = ("a", "b", "c")

# linux/cdrom.h, CDROM_DRIVE_STATUS results and its "current slot" argument.
CDS_NO_INFO, CDS_NO_DISC, CDS_TRAY_OPEN, CDS_DRIVE_NOT_READY, CDS_DISC_OK = range(5)
CDSL_CURRENT = (1 << 31) - 1


def in_vm() -> bool:
    return os.environ.get(IN_VM_ENV) == "1"


# ------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class Hardware:
    """One emulated device of a group.

    ``kind`` is the QEMU device: ``ide-cd`` (an ATAPI drive on the q35 AHCI controller),
    ``scsi-cd`` or ``scsi-hd`` (on a virtio-scsi controller).  ``id`` is its QEMU device
    id (the ``id`` of ``eject``, ``blockdev-change-medium`` and DEVICE_TRAY_MOVED),
    ``drive`` the ``-drive`` id (BlockInfo's ``device``).  ``disc`` is the label of the
    disc in a CD drive (``None``: an empty drive); a scsi-hd always gets its own image.
    """

    kind: str
    id: str
    disc: str | None = "a"
    drive: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("ide-cd", "scsi-cd", "scsi-hd"):
            raise ValueError(f"unknown VM hardware kind {self.kind!r}")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,15}", self.id):
            raise ValueError(f"bad device id {self.id!r}: a letter, then up to 15 of "
                             "letters, digits, '_' and '-'")
        if self.disc is not None and self.kind != "scsi-hd" and self.disc not in DISC_LABELS:
            raise ValueError(f"unknown disc {self.disc!r}; discs are {DISC_LABELS}")
        if not self.drive:
            object.__setattr__(self, "drive", f"{self.id}-drive")

    @property
    def serial(self) -> str:
        """The serial number the guest sees: VPD page 0x80 (udev's ID_SCSI_SERIAL) of a
        SCSI device, ID_SERIAL_SHORT of the others (see :func:`find_node_by_serial`)."""
        return f"BLOCKD-{self.id}"

    # Identification of a scsi-hd (INQUIRY and its VPD 0x83 NAA designator), so that
    # tests can check what a driver reads from the unit; None for the CD drives.
    @property
    def vendor(self) -> str | None:
        return HD_VENDOR if self.kind == "scsi-hd" else None

    @property
    def product(self) -> str | None:
        """``SG-<id>``, cut to INQUIRY's 16 characters."""
        return f"SG-{self.id}"[:16] if self.kind == "scsi-hd" else None

    @property
    def wwn(self) -> int | None:
        """A stable 64-bit NAA 5 WWN: 0x5000c500, then 32 bits of sha256 of the id."""
        if self.kind != "scsi-hd":
            return None
        low = int(hashlib.sha256(self.id.encode()).hexdigest()[:8], 16)
        return (HD_WWN_PREFIX << 32) | low

    @property
    def wwn_text(self) -> str | None:
        """The WWN as udev's ID_WWN and blockd show it: ``0x`` and 16 hex digits."""
        return None if self.wwn is None else f"0x{self.wwn:016x}"

    @property
    def is_cd(self) -> bool:
        return self.kind != "scsi-hd"


PRESETS: dict[str, Hardware] = {
    "atapi-cd": Hardware("ide-cd", "cdrom0", "a", drive="cd0"),
    "atapi-cd-empty": Hardware("ide-cd", "cdrom1", None, drive="cd1"),
    "scsi-cd": Hardware("scsi-cd", "scsicd0", "a", drive="scd0"),
    "scsi-cd-empty": Hardware("scsi-cd", "scsicd1", None, drive="scd1"),
    "scsi-hd": Hardware("scsi-hd", "scsihd0", drive="shd0"),
}


def resolve_hardware(spec: Iterable[str | Hardware]) -> list[Hardware]:
    """Preset names and :class:`Hardware` objects to a list of distinct devices."""
    out: list[Hardware] = []
    for item in spec:
        if isinstance(item, str):
            if item not in PRESETS:
                raise ValueError(f"unknown VM hardware preset {item!r}; presets: {sorted(PRESETS)}")
            item = PRESETS[item]
        out.append(item)
    ids = [h.id for h in out] + [h.drive for h in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"VM hardware ids and drive ids must be distinct: {ids}")
    if sum(h.kind == "ide-cd" for h in out) > 6:
        raise ValueError("the q35 AHCI controller has 6 ports: at most 6 ide-cd devices")
    return out


def disc_sector(label: str, n: int) -> bytes:
    """Sector ``n`` (2048 bytes) of disc or image ``label``: recognizable from its first line."""
    head = f"BLOCKD-DISC {label} sector {n:08d}\n".encode()
    return (head * (SECTOR // len(head) + 1))[:SECTOR]


def make_image(path: Path, label: str, size: int) -> Path:
    with open(path, "wb") as f:
        for n in range(size // SECTOR):
            f.write(disc_sector(label, n))
    return path


def _qemu_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in ", \t\n'\""):
        raise ValueError(f"path unusable on a QEMU command line: {text!r}")
    return text


def qemu_args(hardware: Sequence[Hardware], images: Mapping[str, Path],
              sockets: WitnessSockets) -> list[str]:
    """QEMU arguments for the devices, the witness port and the two QMP monitors.

    ``images`` maps disc labels and scsi-hd ids to their image files.
    """
    args: list[str] = []
    ide = 0
    if any(h.kind.startswith("scsi-") for h in hardware):
        args += ["-device", "virtio-scsi-pci,id=vscsi0"]
    for h in hardware:
        if h.kind == "scsi-hd":
            drive = f"if=none,id={h.drive},file={_qemu_path(images[h.id])},format=raw"
        elif h.disc is None:
            drive = f"if=none,id={h.drive},media=cdrom"
        else:
            drive = (f"if=none,id={h.drive},media=cdrom,file={_qemu_path(images[h.disc])},"
                     "format=raw,readonly=on")
        if h.kind == "ide-cd":
            bus = f"bus=ide.{ide}"
            ide += 1
        else:
            bus = "bus=vscsi0.0"
        device = f"{h.kind},{bus},drive={h.drive},id={h.id},serial={h.serial}"
        if h.kind == "scsi-hd":
            device += f",vendor={h.vendor},product={h.product},wwn={h.wwn_text}"
        args += ["-drive", drive, "-device", device]
    args += [
        "-device", "virtio-serial-pci,id=witness-serial",
        "-chardev", f"socket,id=witness-chr,path={_qemu_path(sockets.serial)},server=on,wait=off",
        "-device", (f"virtserialport,bus=witness-serial.0,chardev=witness-chr,"
                    f"name={WITNESS_PORT},id={WITNESS_QDEV}"),
        "-qmp", f"unix:{_qemu_path(sockets.control)},server=on,wait=off",
        "-qmp", f"unix:{_qemu_path(sockets.qmp)},server=on,wait=off",
    ]
    return args


# ----------------------------------------------------------------------- QMP over a byte stream


class QMPError(RuntimeError):
    """An error reply from the emulator (``desc`` and ``cls`` from QMP's ``error``)."""

    def __init__(self, command: str, error: Mapping[str, Any]) -> None:
        self.cls = str(error.get("class", ""))
        self.desc = str(error.get("desc", ""))
        super().__init__(f"{command}: {self.cls}: {self.desc}")


class QMPStream:
    """QMP's JSON lines over a file descriptor (a socket or a virtio-serial port).

    A serial port has no connection boundaries: bytes of an earlier session may still
    arrive before the greeting.  :meth:`negotiate` therefore skips everything up to a
    greeting, and :meth:`execute` waits for the reply carrying its own ``id``; lines that
    do not parse are dropped (a partial line of an old session glued to a new one).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buf = b""
        self._ids = 0
        self.events: list[dict[str, Any]] = []  # every event received, in order
        self._taken = 0  # events before this index were returned by wait_event
        self._replies: dict[str, dict[str, Any]] = {}

    # -- reading
    def _parse(self, line: bytes) -> dict[str, Any] | None:
        line = line.strip()
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            start = line.rfind(b'{"QMP"')
            if start <= 0:
                return None
            try:
                msg = json.loads(line[start:])
            except ValueError:
                return None
        return msg if isinstance(msg, dict) else None

    def read_available(self, timeout: float | None) -> list[dict[str, Any]]:
        """Wait up to ``timeout`` for bytes, read once, return the whole messages read.

        Raises EOFError when the peer is gone.
        """
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.fd, 65536)
        if not data:
            raise EOFError("QMP stream closed")
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        out = []
        for line in lines:
            msg = self._parse(line)
            if msg is None:
                continue
            if "event" in msg:
                self.events.append(msg)
            elif "id" in msg and ("return" in msg or "error" in msg):
                self._replies[str(msg["id"])] = msg
            out.append(msg)
        return out

    def _write(self, msg: Mapping[str, Any]) -> None:
        data = json.dumps(msg).encode() + b"\n"
        while data:
            data = data[os.write(self.fd, data):]

    # -- protocol
    def negotiate(self, timeout: float = 30) -> dict[str, Any]:
        """Wait for a greeting, then enter command mode; return the greeting."""
        deadline = time.monotonic() + timeout
        greeting: dict[str, Any] | None = None
        while greeting is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no QMP greeting from the emulator")
            for msg in self.read_available(left):
                if "QMP" in msg:
                    greeting = msg
        # Whatever came before the greeting belonged to an earlier session.
        self.events.clear()
        self._replies.clear()
        self.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))
        return greeting

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None,
                timeout: float = 30) -> Any:
        """Run a command; return its ``return`` value or raise :class:`QMPError`."""
        self._ids += 1
        token = f"blockd-vm-{os.getpid()}-{self._ids}-{time.monotonic_ns()}"
        msg: dict[str, Any] = {"execute": command, "id": token}
        if arguments:
            msg["arguments"] = dict(arguments)
        self._write(msg)
        deadline = time.monotonic() + timeout
        while token not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {command} within {timeout} s")
            self.read_available(left)
        reply = self._replies.pop(token)
        if "error" in reply:
            raise QMPError(command, reply["error"])
        return reply["return"]

    def wait_event(self, name: str, timeout: float = 10,
                   match: Mapping[str, Any] | Callable[[dict[str, Any]], bool] | None = None,
                   ) -> dict[str, Any]:
        """The first event ``name`` (whose ``data`` contains ``match``, or for which
        ``match(event)`` is true) not yet returned by an earlier call; waits up to
        ``timeout`` s for it.  Every event since the session started counts."""

        def fits(ev: dict[str, Any]) -> bool:
            if ev.get("event") != name:
                return False
            if match is None:
                return True
            if callable(match):
                return bool(match(ev))
            data = ev.get("data", {})
            return all(data.get(k) == v for k, v in match.items())

        deadline = time.monotonic() + timeout
        while True:
            for i in range(self._taken, len(self.events)):
                if fits(self.events[i]):
                    ev = self.events.pop(i)
                    self.events.insert(self._taken, ev)
                    self._taken += 1
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [e.get("event") for e in self.events]
                raise TimeoutError(f"no {name} event matching {match!r} within {timeout} s; "
                                   f"events so far: {seen}")
            self.read_available(left)


class Witness(QMPStream):
    """The emulator itself, asked from inside the guest: an independent witness of what
    the guest's drivers did to the hardware, and the hand of a user at the drive.

    Each instance is a fresh QMP session (the host relay connects one per open of the
    port), so :attr:`events` holds exactly the events since it was created.
    """

    def __init__(self, path: str = WITNESS_DEV, timeout: float = 30) -> None:
        super().__init__(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
        try:
            self.greeting = self.negotiate(timeout)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def query_block(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.execute("query-block")
        return result

    def device(self, id: str) -> dict[str, Any]:
        """The BlockInfo of device ``id`` (QEMU device id or drive id): ``locked``,
        ``tray_open``, ``inserted`` (absent for an empty drive), ``removable``, ..."""
        blocks = self.query_block()
        for info in blocks:
            if id in (info.get("qdev"), info.get("device")):
                return info
        raise KeyError(f"no block device {id!r}; have {[b.get('qdev') for b in blocks]}")

    def press_button(self, id: str) -> None:
        """What a user's finger on the eject button does: the tray opens, locked or not."""
        self.execute("eject", {"id": id, "force": True})

    def change_medium(self, id: str, filename: str | os.PathLike[str],
                      force: bool = True) -> None:
        """Swap the disc: open the tray, put ``filename`` in (read-only), close it."""
        self.execute("blockdev-change-medium", {
            "id": id, "filename": os.fspath(filename), "format": "raw",
            "read-only-mode": "read-only", "force": force})


# ----------------------------------------------------------------------------- the guest's view


@dataclass(frozen=True)
class GuestDevice:
    """An emulated device as the guest sees it."""

    hardware: Hardware
    node: str  # /dev/sr0, /dev/sda
    sg: str | None  # /dev/sg0
    image: str | None  # the host file behind it (readable in the guest through the share)

    @property
    def id(self) -> str:
        return self.hardware.id

    @property
    def drive(self) -> str:
        return self.hardware.drive

    @property
    def disc(self) -> str | None:
        return self.hardware.disc


@dataclass
class VM:
    """The guest's hardware, read from the manifest the host wrote."""

    hardware: list[Hardware]
    images: dict[str, str]
    shared: Path
    _devices: dict[str, GuestDevice] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, path: str | os.PathLike[str]) -> VM:
        data = json.loads(Path(path).read_text())
        return cls([Hardware(**h) for h in data["hardware"]], data["images"],
                   Path(data["shared"]))

    def disc(self, label: str) -> Path:
        """The image file of disc ``label`` (a host path QEMU can open, e.g. for
        :meth:`Witness.change_medium`; the guest can read it too)."""
        return Path(self.images[label])

    def device(self, id: str, timeout: float = 30) -> GuestDevice:
        """Device ``id``'s nodes, found by its serial number in udev's database."""
        if id not in self._devices:
            hw = next((h for h in self.hardware if h.id == id), None)
            if hw is None:
                raise KeyError(f"no VM hardware {id!r}; have {[h.id for h in self.hardware]}")
            node = find_node_by_serial(hw.serial, timeout)
            image = self.images.get(hw.id if hw.kind == "scsi-hd" else (hw.disc or ""))
            self._devices[id] = GuestDevice(hw, node, sg_of(node), image)
        return self._devices[id]

    @property
    def devices(self) -> dict[str, GuestDevice]:
        return {h.id: self.device(h.id) for h in self.hardware}


def udev_settle(timeout: float = 30) -> None:
    """Wait until udevd has handled every event so far (e.g. after a media change
    udev's cdrom_id opens the drive and locks its tray)."""
    subprocess.run(["udevadm", "settle", f"--timeout={int(timeout)}"], check=False)


def vpd_unit_serial(sysdir: Path) -> str | None:
    """The unit serial number in a SCSI device's VPD page 0x80 as the kernel read it
    (``device/vpd_pg80``), or None."""
    try:
        page = (sysdir / "device" / "vpd_pg80").read_bytes()
    except OSError:
        return None
    if len(page) < 4 or page[1] != 0x80:
        return None
    length = int.from_bytes(page[2:4], "big")
    return page[4:4 + length].decode("ascii", "replace").strip(" \0")


def find_node_by_serial(serial: str, timeout: float = 30) -> str:
    """The whole-disk node whose serial number is ``serial``.

    udev's ID_SERIAL_SHORT is the serial of an ATA(PI) device, but for a SCSI unit
    with a WWN (VPD 0x83 NAA, the scsi-hd presets) scsi_id puts the WWN there and the
    serial (VPD 0x80) in ID_SCSI_SERIAL; the kernel's copy of VPD 0x80 in sysfs counts
    as well.
    """
    wanted = (f"E:ID_SERIAL_SHORT={serial}\n", f"E:ID_SCSI_SERIAL={serial}\n")
    deadline = time.monotonic() + timeout
    while True:
        for sysdir in sorted(Path("/sys/class/block").glob("*")):
            if not (sysdir / "device").exists():
                continue  # partitions, loop devices without a backing device
            try:
                majmin = (sysdir / "dev").read_text().strip()
                data = Path(f"/run/udev/data/b{majmin}").read_text()
            except OSError:
                data = ""
            if any(w in data for w in wanted) or vpd_unit_serial(sysdir) == serial:
                return f"/dev/{sysdir.name}"
        if time.monotonic() > deadline:
            raise LookupError(f"no block device with serial {serial} (udev, sysfs VPD 0x80)")
        time.sleep(0.2)


def sg_of(node: str) -> str | None:
    """The SCSI generic node (/dev/sgN) of a block device node, if sg is loaded."""
    found = list((Path("/sys/class/block") / Path(node).name / "device/scsi_generic").glob("sg*"))
    return f"/dev/{found[0].name}" if found else None


# --------------------------------------------------------------------- the witness relay (host)


@dataclass(frozen=True)
class WitnessSockets:
    control: Path  # a QMP monitor for the relay itself (VSERPORT_CHANGE)
    qmp: Path  # the QMP monitor the guest's sessions are relayed to
    serial: Path  # the host end of the witness virtio-serial port

    @classmethod
    def in_dir(cls, d: Path) -> WitnessSockets:
        return cls(d / "ctl.sock", d / "qmp.sock", d / "wit.sock")


def _connect_unix(path: Path, deadline: float, alive: Callable[[], bool]) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline or not alive():
                raise
            time.sleep(0.1)


class WitnessRelay(threading.Thread):
    """Bridge the emulator's QMP monitor to the guest's witness port, one session per open.

    QEMU reports the guest opening and closing the port (VSERPORT_CHANGE) on the
    relay's own control monitor.  On each open the relay connects a fresh session to the
    second monitor, so the guest gets a new greeting; on close it disconnects it.  Bytes
    go both ways unchanged.  One thread does everything, so the bytes of a closed
    session can never follow the greeting of the next one.
    """

    def __init__(self, sockets: WitnessSockets, alive: Callable[[], bool],
                 connect_timeout: float = 120) -> None:
        super().__init__(name="blockd-vm-witness-relay", daemon=True)
        self.sockets = sockets
        self.alive = alive
        self.connect_timeout = connect_timeout
        self.log: list[str] = []
        self.sessions = 0
        self._stop_r, self._stop_w = os.pipe()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self.join(10)
        for fd in (self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _note(self, text: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} relay: {text}")

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:
            self._note(f"stopped by {e!r}")

    def _run(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        ctl_sock = _connect_unix(self.sockets.control, deadline, self.alive)
        serial = _connect_unix(self.sockets.serial, deadline, self.alive)
        serial.settimeout(10)
        ctl = QMPStream(ctl_sock.fileno())
        ctl.negotiate()  # events read along with its reply stay in ctl.events
        self._note("connected to the emulator")
        session: socket.socket | None = None
        pending = b""  # guest bytes that arrived while no session was connected
        try:
            while True:
                fds: list[Any] = [self._stop_r, ctl_sock, serial]
                if session is not None:
                    fds.append(session)
                ready, _, _ = select.select(fds, [], [])
                if self._stop_r in ready:
                    return
                if ctl_sock in ready:
                    ctl.read_available(0)
                    events, ctl.events = ctl.events, []
                    for ev in events:
                        data = ev.get("data", {})
                        if ev.get("event") != "VSERPORT_CHANGE" or data.get("id") != WITNESS_QDEV:
                            continue
                        if session is not None:
                            session.close()
                            session = None
                        if data.get("open"):
                            session = _connect_unix(self.sockets.qmp, time.monotonic() + 10,
                                                    self.alive)
                            self.sessions += 1
                            self._note(f"guest opened the witness: session {self.sessions}")
                            if pending:
                                session.sendall(pending)
                                pending = b""
                        else:
                            pending = b""
                            self._note("guest closed the witness")
                if serial in ready:
                    data = serial.recv(65536)
                    if not data:
                        return
                    if session is not None:
                        session.sendall(data)
                    else:
                        pending += data
                if session is not None and session in ready:
                    data = session.recv(65536)
                    if data:
                        serial.sendall(data)
                    else:
                        session.close()
                        session = None
        finally:
            for s in (session, serial, ctl_sock):
                if s is not None:
                    s.close()


# -------------------------------------------------------------------------------- inner results


@dataclass
class InnerResult:
    """The outcome of one inner test, all its phases (setup, call, teardown) combined."""

    nodeid: str
    outcome: str  # passed, failed, skipped, xfailed
    message: str = ""
    duration: float = 0.0


class ReportWriter:
    """A pytest plugin for the inner run: every test report as one JSON line, flushed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def pytest_runtest_logreport(self, report: Any) -> None:
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        self._write({
            "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
            "longrepr": "" if report.skipped else report.longreprtext,
            "reason": reason, "wasxfail": getattr(report, "wasxfail", None),
            "sections": [list(s) for s in report.sections if report.failed],
            "duration": report.duration,
        })

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._write({"nodeid": report.nodeid, "when": "collect", "outcome": "failed",
                         "longrepr": report.longreprtext})

    def pytest_sessionfinish(self, session: Any, exitstatus: int) -> None:
        self._write({"nodeid": "", "when": "session", "outcome": "finished",
                     "exitstatus": int(exitstatus)})


def read_report(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def aggregate(records: Iterable[Mapping[str, Any]]) -> dict[str, InnerResult]:
    """Combine the inner reports per test node id (see :class:`ReportWriter`)."""
    results: dict[str, InnerResult] = {}
    for rec in records:
        nodeid, when, outcome = rec.get("nodeid", ""), rec.get("when"), rec.get("outcome")
        if when not in ("setup", "call", "teardown"):
            continue
        res = results.setdefault(nodeid, InnerResult(nodeid, "passed"))
        res.duration += float(rec.get("duration") or 0)
        if outcome == "failed":
            text = rec.get("longrepr", "")
            for title, content in rec.get("sections", []):
                text += f"\n{'-' * 20} {title} {'-' * 20}\n{content}"
            verb = "failed" if when == "call" else f"error in {when}"
            part = f"[guest] {nodeid} {verb}:\n{text}"
            res.message = f"{res.message}\n\n{part}" if res.outcome == "failed" else part
            res.outcome = "failed"
        elif outcome == "skipped" and res.outcome != "failed":
            if rec.get("wasxfail") is not None:
                res.outcome, res.message = "xfailed", str(rec.get("wasxfail") or "")
            else:
                res.outcome, res.message = "skipped", str(rec.get("reason", ""))
    return results


def replay(result: InnerResult | None, context: str = "") -> None:
    """Give the outer test the inner test's outcome (raise pytest's outcome exceptions)."""
    import pytest

    if result is None:
        pytest.fail(f"the guest run reported nothing for this test\n{context}", pytrace=False)
    if result.outcome == "failed":
        pytest.fail(result.message, pytrace=False)
    if result.outcome == "skipped":
        pytest.skip(f"[guest] {result.message}")
    if result.outcome == "xfailed":
        pytest.xfail(f"[guest] {result.message}")


# ----------------------------------------------------------------------- booting a group (host)


class VMUnavailable(Exception):
    """Something the VM tier needs is missing on this host (the message says what)."""


def newest_kernel() -> Path:
    override = os.environ.get(KERNEL_ENV)
    if override:
        return Path(override)
    found = sorted(Path("/boot").glob("vmlinuz-*"),
                   key=lambda p: [int(x) if x.isdigit() else -1
                                  for x in re.split(r"[.-]", p.name[len("vmlinuz-"):])])
    if not found:
        raise VMUnavailable("no kernel in /boot (Debian package linux-image-amd64)")
    return found[-1]


def requirements() -> tuple[str, Path]:
    """The ``vng`` command and the kernel to boot, or :class:`VMUnavailable` saying why."""
    bindir = str(Path(sys.executable).parent)
    path = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    vng = shutil.which("vng", path=path)
    if vng is None or shutil.which("virtme-run", path=path) is None:
        raise VMUnavailable("virtme-ng is not installed (pip install virtme-ng; the test extra)")
    if shutil.which("qemu-system-x86_64") is None:
        raise VMUnavailable("qemu-system-x86_64 is missing (Debian package qemu-system-x86)")
    kernel = newest_kernel()
    if not os.access(kernel, os.R_OK):
        raise VMUnavailable(f"cannot read the kernel {kernel} (the VM tier runs as root)")
    version = kernel.name[len("vmlinuz-"):]
    if not Path("/lib/modules", version).is_dir():
        raise VMUnavailable(f"no modules for {kernel} in /lib/modules/{version}")
    return vng, kernel


@dataclass
class GroupRun:
    """One boot of one group: its results, or why there are none."""

    module: str
    results: dict[str, InnerResult] = field(default_factory=dict)
    error: str = ""  # set when the guest run as a whole failed
    returncode: int | None = None
    boot_seconds: float | None = None  # host start to the guest's runner starting
    total_seconds: float = 0.0
    log: Path | None = None
    log_tail: str = ""

    def result(self, nodeid: str) -> InnerResult | None:
        return self.results.get(nodeid)


def _copy_to_log(stream: Any, log: Path, t0: float) -> None:
    """Append the guest's output to ``log``, each line stamped with seconds since boot."""
    with stream, open(log, "a") as out:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            out.write(f"[host +{time.monotonic() - t0:6.1f}s] {line}\n")
            out.flush()


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def group_timeout() -> float:
    """Seconds one group's boot and run may take (``BLOCKD_VM_TIMEOUT``, default 900).

    test_vm_blockd_cdrom's boot and 9 tests took 385 s on a loaded 2-core machine."""
    return float(os.environ.get(TIMEOUT_ENV, "900"))


def run_group(module: str, nodeids: Sequence[str], hardware: Sequence[Hardware],
              workdir: Path, timeout: float | None = None) -> GroupRun:
    """Boot a guest with ``hardware``, run ``nodeids`` in it, collect their results.

    Raises :class:`VMUnavailable` if the host lacks a tool; every other failure is
    recorded in :attr:`GroupRun.error` with the tail of the boot log.
    """
    vng, kernel = requirements()
    if timeout is None:
        timeout = group_timeout()
    shared = workdir / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {lbl: make_image(shared / f"disc-{lbl}.img", lbl, DISC_SIZE)
                               for lbl in DISC_LABELS}
    for h in hardware:
        if h.kind == "scsi-hd":
            images[h.id] = make_image(shared / f"{h.id}.img", h.id, HD_SIZE)
    manifest = shared / "manifest.json"
    manifest.write_text(json.dumps({
        "hardware": [asdict(h) for h in hardware],
        "images": {k: str(v) for k, v in images.items()},
        "shared": str(shared),
    }, indent=1))
    report = shared / "report.jsonl"
    report.unlink(missing_ok=True)
    started_marker = shared / "guest-started"
    started_marker.unlink(missing_ok=True)
    (shared / "job.json").write_text(json.dumps({
        "nodeids": list(nodeids), "manifest": str(manifest), "report": str(report),
        "started": str(started_marker),
    }))
    # UNIX socket paths are limited to 108 bytes: keep them short, outside pytest's tmp.
    sockdir = Path(tempfile.mkdtemp(prefix="blockd-vm-", dir="/tmp"))
    sockets = WitnessSockets.in_dir(sockdir)
    log = workdir / "guest.log"
    run = GroupRun(module, log=log)
    guest_cmd = shlex.join([sys.executable, str(Path(__file__).resolve()), str(shared)])
    # TCG only: nested KVM hangs the guest.  The kernel's console is off unless asked
    # for: every character through the emulated UART costs time under TCG.
    verbose = ["--verbose"] if os.environ.get(VERBOSE_ENV) == "1" else []
    cmd = [vng, "--run", str(kernel), "--disable-kvm", "--memory", "1G", "--user", "root",
           *verbose, "--rwdir", str(shared), "--cwd", str(ROOT),
           "--qemu-opts=" + " ".join(qemu_args(hardware, images, sockets)),
           "--exec", guest_cmd]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
               f"{os.environ.get('PATH', '')}")
    for var in (IN_VM_ENV, MANIFEST_ENV, REPORT_ENV):
        env.pop(var, None)
    t0 = time.monotonic()
    log.write_text(f"$ {shlex.join(cmd)}\n")
    # Through a pipe: QEMU reopens its stdout by /proc/self/fd/1 for the guest's output,
    # which on a plain file would get its own offset and overwrite vng's lines.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    assert proc.stdout is not None
    copier = threading.Thread(target=_copy_to_log, args=(proc.stdout, log, t0),
                              name="blockd-vm-log", daemon=True)
    copier.start()
    relay = WitnessRelay(sockets, alive=lambda: proc.poll() is None)
    relay.start()
    timed_out = False
    try:
        while proc.poll() is None:
            if run.boot_seconds is None and started_marker.exists():
                run.boot_seconds = time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait()
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
        relay.stop()
        copier.join(10)
        shutil.rmtree(sockdir, ignore_errors=True)
    run.total_seconds = time.monotonic() - t0
    run.returncode = proc.returncode
    if run.boot_seconds is None and started_marker.exists():
        run.boot_seconds = run.total_seconds
    with open(log, "a") as out:
        out.write("\n".join(relay.log) + "\n")
    run.log_tail = _tail(log)
    records = read_report(report)
    run.results = aggregate(records)
    finished = any(r.get("when") == "session" for r in records)
    collect_errors = [r for r in records if r.get("when") == "collect"]
    if collect_errors:
        run.error = "the guest could not collect the tests:\n" + "\n".join(
            str(r.get("longrepr", "")) for r in collect_errors)
    elif timed_out:
        run.error = f"the guest run did not finish within {timeout:.0f} s"
    elif not finished:
        what = "boot" if run.boot_seconds is None else "run"
        run.error = f"the guest {what} failed (vng exited {proc.returncode}) before reporting"
    if run.error:
        run.error += f"\n\n---- tail of {log} ----\n{run.log_tail}"
    return run


# ------------------------------------------------------------ a guest for a host-side test


@dataclass
class BootedGuest:
    """A guest booted by :func:`boot_guest`, driven by a test on the host.

    Unlike a group, the test holds the emulator itself: :attr:`monitor` is a QMP
    monitor of its own (beside the witness relay's two), so it sees the guest's
    ``stop`` as a STOP event and can snapshot, ``cont`` or kill the emulator.
    """

    proc: subprocess.Popen[bytes]
    shared: Path
    images: dict[str, Path]
    log: Path
    monitor: Path
    relay: WitnessRelay
    sockdir: Path
    copier: threading.Thread
    t0: float

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect_monitor(self, timeout: float = 120) -> tuple[socket.socket, QMPStream]:
        """A negotiated session with the test's own monitor (the socket and its stream)."""
        sock = _connect_unix(self.monitor, time.monotonic() + timeout, self.alive)
        stream = QMPStream(sock.fileno())
        stream.negotiate(timeout)
        return sock, stream

    def emulator_pid(self) -> int:
        """The emulator's pid, from the credentials of a connection to its monitor."""
        sock = _connect_unix(self.monitor, time.monotonic() + 10, self.alive)
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
        finally:
            sock.close()
        pid: int = struct.unpack("3i", creds)[0]
        return pid

    def wait(self, timeout: float) -> int | None:
        """The exit code of vng, or None if it is still running after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, lines: int = 60) -> str:
        return f"---- tail of {self.log} ----\n{_tail(self.log, lines)}"

    def close(self) -> None:
        """End the guest if it still runs; keep the log (with the relay's notes)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
        self.proc.wait()
        self.relay.stop()
        self.copier.join(10)
        shutil.rmtree(self.sockdir, ignore_errors=True)
        with open(self.log, "a") as out:
            out.write("\n".join(self.relay.log) + "\n")


def boot_guest(hardware: Sequence[Hardware], workdir: Path,
               argv: Callable[[Path], Sequence[str]],
               extra_qemu_args: Sequence[str] = ()) -> BootedGuest:
    """Boot a guest with ``hardware`` that runs ``argv(shared)`` and return at once.

    For a test that must outlive the guest (a power cut): the command runs as root in
    the guest, with ``shared`` (``workdir/shared``, holding the images and
    ``manifest.json`` as :func:`run_group` writes them) shared read-write.  The caller
    must :meth:`BootedGuest.close` it.  Raises :class:`VMUnavailable`.
    """
    vng, kernel = requirements()
    shared = workdir / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {lbl: make_image(shared / f"disc-{lbl}.img", lbl, DISC_SIZE)
                               for lbl in DISC_LABELS}
    for h in hardware:
        if h.kind == "scsi-hd":
            images[h.id] = make_image(shared / f"{h.id}.img", h.id, HD_SIZE)
    (shared / "manifest.json").write_text(json.dumps({
        "hardware": [asdict(h) for h in hardware],
        "images": {k: str(v) for k, v in images.items()},
        "shared": str(shared),
    }, indent=1))
    sockdir = Path(tempfile.mkdtemp(prefix="blockd-vm-", dir="/tmp"))
    sockets = WitnessSockets.in_dir(sockdir)
    monitor = sockdir / "test.sock"
    log = workdir / "guest.log"
    verbose = ["--verbose"] if os.environ.get(VERBOSE_ENV) == "1" else []
    qemu = [*qemu_args(hardware, images, sockets),
            "-qmp", f"unix:{_qemu_path(monitor)},server=on,wait=off", *extra_qemu_args]
    cmd = [vng, "--run", str(kernel), "--disable-kvm", "--memory", "1G", "--user", "root",
           *verbose, "--rwdir", str(shared), "--cwd", str(ROOT),
           "--qemu-opts=" + " ".join(qemu), "--exec", shlex.join(argv(shared))]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}"
               f"{os.environ.get('PATH', '')}")
    for var in (IN_VM_ENV, MANIFEST_ENV, REPORT_ENV, REQUIRE_ENV, STRICT_ENV):
        env.pop(var, None)
    t0 = time.monotonic()
    log.write_text(f"$ {shlex.join(cmd)}\n")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    assert proc.stdout is not None
    copier = threading.Thread(target=_copy_to_log, args=(proc.stdout, log, t0),
                              name="blockd-vm-log", daemon=True)
    copier.start()
    relay = WitnessRelay(sockets, alive=lambda: proc.poll() is None)
    relay.start()
    return BootedGuest(proc, shared, images, log, monitor, relay, sockdir, copier, t0)


# --------------------------------------------------------------------------- the guest's runner


def main(argv: Sequence[str]) -> int:
    """In the guest: prepare udev and the modules, then run the group's tests."""
    shared = Path(argv[0])
    job = json.loads((shared / "job.json").read_text())
    Path(job["started"]).write_text(f"{time.time()}\n")
    print(f"blockd-vm: guest runner up at uptime {_uptime()}, kernel {os.uname().release}",
          flush=True)
    setup = subprocess.run(["sh", str(GUEST_SETUP), str(ROOT)], check=False)
    if setup.returncode:
        print(f"blockd-vm: guest setup exited {setup.returncode}", flush=True)
    env = dict(os.environ, **{IN_VM_ENV: "1", MANIFEST_ENV: job["manifest"],
                              REPORT_ENV: job["report"], "PYTHONDONTWRITEBYTECODE": "1"})
    # Skips come back as skips: the outer run judges them against tests/allowed_skips.py.
    for var in (REQUIRE_ENV, STRICT_ENV):
        env.pop(var, None)
    # No cache (the shared root is read-only) and no hypothesis plugin: importing it
    # costs ~10 s under TCG, and @given works without it.
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
           "-v", "-rA", "--durations=0", f"--timeout={INNER_TEST_TIMEOUT}",
           "--rootdir", str(ROOT), *job["nodeids"]]
    print(f"blockd-vm: setup done at uptime {_uptime()}; {shlex.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
    print(f"blockd-vm: pytest exited {rc} at uptime {_uptime()}", flush=True)
    return rc


def _uptime() -> str:
    try:
        return Path("/proc/uptime").read_text().split()[0] + " s"
    except OSError:
        return "?"


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except OSError as e:
        print(f"blockd-vm: guest runner failed: {e}", file=sys.stderr)
        sys.exit(errno.EIO)
