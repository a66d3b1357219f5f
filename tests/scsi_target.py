"""A SCSI logical unit in memory, answering SG_IO like a real one (for unit tests).

:class:`ScsiUnit` replaces :class:`blockd.devices.sg.SgKernel`: it decodes the
CDBs the sg driver sends and answers with the data, status and fixed-format
sense a disk or a CD drive gives (SPC/SBC/MMC).  Tests queue unit attentions,
make a command fail with a chosen sense, open the tray, and read back the
commands that were sent.  The real device path is proven in the VM tier
(tests/vm/test_vm_sg.py) against the kernel's sg driver.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field

from blockd.devices.base import Buffer
from blockd.devices.scsi import SgIoResult

CHECK_CONDITION = 2


def fixed_sense(key: int, asc: int, ascq: int = 0) -> bytes:
    sense = bytearray(18)
    sense[0], sense[2], sense[7] = 0x70, key, 10
    sense[12], sense[13] = asc, ascq
    return bytes(sense)


@dataclass
class Sent:
    cdb: bytes
    data_out: bytes
    timeout_ms: int


@dataclass
class ScsiUnit:
    """One unit: a disk by default; ``peripheral_type=5`` makes a CD drive."""

    blocks: int = 2048
    block_length: int = 512
    peripheral_type: int = 0
    removable: bool = False
    vendor: str = "BLOCKD"
    product: str = "MODEL-T"
    revision: str = "0.1"
    serial: str = "SER123"
    naa: bytes = bytes.fromhex("6001405abcdef012")
    max_transfer_blocks: int = 0  # VPD 0xB0 (0: no page)
    kernel_max_bytes: int = 0  # BLKSECTGET
    write_protected: bool = False
    has_vpd: bool = True
    knows_sync_cache: bool = True
    knows_read_capacity_16: bool = True
    knows_gesn: bool = True
    medium: bool = True
    tray_open: bool = False
    prevent: bool = False
    sg_version: int = 30536
    unit_attentions: list[tuple[int, int]] = field(default_factory=list)
    failures: dict[int, bytes] = field(default_factory=dict)  # opcode -> sense (once)
    sent: list[Sent] = field(default_factory=list)
    data: bytearray = field(init=False)
    fds: set[int] = field(default_factory=set)
    media_event: int = 0

    def __post_init__(self) -> None:
        self.data = bytearray(self.blocks * self.block_length)

    # -- SgKernel --------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        fd = os.open("/dev/null", os.O_RDONLY)
        self.fds.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.fds.discard(fd)
        os.close(fd)

    def fstat(self, fd: int) -> os.stat_result:
        st = list(os.fstat(fd))
        st[0] = stat.S_IFCHR | 0o600
        return os.stat_result(st)

    def version(self, fd: int) -> int:
        return self.sg_version

    def max_transfer(self, fd: int) -> int:
        return self.kernel_max_bytes

    def sleep(self, seconds: float) -> None:
        pass

    def sg_io(
        self,
        fd: int,
        cdb: bytes,
        data_out: Buffer = b"",
        data_in_len: int = 0,
        timeout_ms: int = 0,
        data_in: memoryview | None = None,
    ) -> SgIoResult:
        assert fd in self.fds, "command on a closed descriptor"
        out = bytes(data_out)
        self.sent.append(Sent(bytes(cdb), out, timeout_ms))
        length = data_in.nbytes if data_in is not None else data_in_len
        status, sense, reply = self._answer(bytes(cdb), out, length)
        reply = reply[:length]
        if status:
            return SgIoResult(status=status, sense=sense, residual=length, driver_status=0x08)
        if data_in is not None:
            data_in[: len(reply)] = reply
            return SgIoResult(status=0, residual=length - len(reply),
                              transferred=len(reply), duration_ns=1000)
        return SgIoResult(status=0, data=reply, residual=length - len(reply),
                          transferred=len(reply), duration_ns=1000)

    # -- the unit ----------------------------------------------------------------

    def opcodes(self) -> list[int]:
        return [s.cdb[0] for s in self.sent]

    def _check(self, key: int, asc: int, ascq: int = 0) -> tuple[int, bytes, bytes]:
        return CHECK_CONDITION, fixed_sense(key, asc, ascq), b""

    def _answer(self, cdb: bytes, out: bytes, length: int) -> tuple[int, bytes, bytes]:
        op = cdb[0]
        if op in self.failures:
            return CHECK_CONDITION, self.failures.pop(op), b""
        if op in (0x12, 0xA0):  # INQUIRY and REPORT LUNS never report attentions
            return self._inquiry(cdb) if op == 0x12 else (0, b"", bytes(16))
        if self.unit_attentions:
            asc, ascq = self.unit_attentions.pop(0)
            return self._check(6, asc, ascq)
        if op == 0x4A:
            return self._gesn()
        if op == 0x1B:
            if cdb[4] & 0x02:
                start = bool(cdb[4] & 0x01)
                if not start and self.prevent:
                    return self._check(5, 0x53, 0x02)
                self.tray_open = not start
            return 0, b"", b""
        if op == 0x1E:
            self.prevent = bool(cdb[4] & 0x01)
            return 0, b"", b""
        if op == 0x5A:
            header = struct.pack(">HBBBBH", 6, 0, 0x80 if self.write_protected else 0, 0, 0, 0)
            return 0, b"", header
        if self.tray_open:
            return self._check(2, 0x3A, 0x02)
        if not self.medium:
            return self._check(2, 0x3A, 0x01)
        if op == 0x00:
            return 0, b"", b""
        if op == 0x25:
            last = min(self.blocks - 1, 0xFFFFFFFF)
            return 0, b"", struct.pack(">II", last, self.block_length)
        if op == 0x9E and cdb[1] & 0x1F == 0x10:
            if not self.knows_read_capacity_16:
                return self._check(5, 0x20)
            return 0, b"", struct.pack(">QIBB", self.blocks - 1, self.block_length, 0, 0) \
                + bytes(18)
        if op in (0x28, 0x2A, 0x88, 0x8A):
            return self._read_write(cdb, out)
        if op == 0x35:
            return (0, b"", b"") if self.knows_sync_cache else self._check(5, 0x20)
        return self._check(5, 0x20)

    def _inquiry(self, cdb: bytes) -> tuple[int, bytes, bytes]:
        if not cdb[1] & 1:
            data = bytearray(96)
            data[0] = self.peripheral_type
            data[1] = 0x80 if self.removable or self.peripheral_type == 5 else 0
            data[2], data[3], data[4] = 5, 2, 91
            data[8:16] = self.vendor.ljust(8).encode()
            data[16:32] = self.product.ljust(16).encode()
            data[32:36] = self.revision.ljust(4).encode()
            return 0, b"", bytes(data)
        if not self.has_vpd:
            return self._check(5, 0x24)
        page = cdb[2]
        if page == 0x00:
            pages = bytes([0x00, 0x80, 0x83] + ([0xB0] if self.max_transfer_blocks else []))
            return 0, b"", bytes([self.peripheral_type, 0, 0, len(pages)]) + pages
        if page == 0x80:
            body = self.serial.encode()
            return 0, b"", bytes([self.peripheral_type, 0x80, 0, len(body)]) + body
        if page == 0x83:
            naa = bytes([0x01, 0x03, 0, len(self.naa)]) + self.naa
            t10 = b"BLOCKD  " + self.serial.encode()
            vendor_id = bytes([0x02, 0x01, 0, len(t10)]) + t10
            body = naa + vendor_id
            return 0, b"", bytes([self.peripheral_type, 0x83]) + struct.pack(">H", len(body)) \
                + body
        if page == 0xB0:
            body = bytearray(0x3C)
            struct.pack_into(">I", body, 4, self.max_transfer_blocks)
            return 0, b"", bytes([self.peripheral_type, 0xB0]) + struct.pack(">H", 0x3C) \
                + bytes(body)
        return self._check(5, 0x24)

    def _gesn(self) -> tuple[int, bytes, bytes]:
        if not self.knows_gesn:
            return self._check(5, 0x20)
        status = (0x01 if self.tray_open else 0) | (0x02 if self.medium and not self.tray_open
                                                     else 0)
        event, self.media_event = self.media_event, 0
        return 0, b"", struct.pack(">HBB", 6, 0x04, 0x10) + bytes([event, status, 0, 0])

    def _read_write(self, cdb: bytes, out: bytes) -> tuple[int, bytes, bytes]:
        if cdb[0] in (0x28, 0x2A):
            lba, count = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        else:
            lba, count = struct.unpack_from(">QI", cdb, 2)
        if lba + count > self.blocks:
            return self._check(5, 0x21)
        start, end = lba * self.block_length, (lba + count) * self.block_length
        if cdb[0] in (0x28, 0x88):
            return 0, b"", bytes(self.data[start:end])
        if self.write_protected or self.peripheral_type == 5:
            return self._check(7, 0x27)
        assert len(out) == end - start, "WRITE length and data differ"
        self.data[start:end] = out
        return 0, b"", b""

