"""blockd-scsi-command: one raw SCSI command to a node's unit (a blockd extension).

QEMU has no such command (its guests send SCSI through scsi-generic devices);
operators otherwise reach a unit with sg3_utils, outside any daemon that holds
it.  The command names a node (``node-name``) or a device (``id``), carries the
CDB as hex and data to send as base64, and answers with what the unit
said: status, residual count, duration, data in base64 and, on CHECK
CONDITION, the decoded sense.  A CHECK CONDITION is an answer, not an error;
errors are for requests that never reached the unit.

Only operation codes on an allowlist are sent.  By default it holds commands
that read (identification, capacity, status, data, TOC) and none that change
the medium or the unit's settings; the ``[scsi-passthrough] allowed-opcodes``
setting replaces it (or ``"all"``).  Whatever the list, a read-only node never
gets a command that writes its medium.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

from blockd.block.device import Device, run_scsi_command
from blockd.block.node import Node
from blockd.devices import scsi
from blockd.devices.base import ScsiResult
from blockd.errors import BlockdError, InvalidArgument, ReadOnly
from blockd.qmp.commands.base import CommandContext, CommandTable

__all__ = [
    "DEFAULT_ALLOWED_OPCODES",
    "MAX_TIMEOUT_MS",
    "MAX_TRANSFER_LENGTH",
    "MEDIUM_WRITE_OPCODES",
    "ScsiCommandArgs",
    "register",
    "scsi_reply",
]

MAX_TRANSFER_LENGTH = 16 << 20  # bytes in or out per command (memory a client can pin)
MAX_TIMEOUT_MS = 3_600_000  # an hour: a FORMAT UNIT or a long self-test, no more
DEFAULT_TIMEOUT_MS = 30_000

DEFAULT_ALLOWED_OPCODES = frozenset({
    0x00,  # TEST UNIT READY
    0x03,  # REQUEST SENSE
    0x12,  # INQUIRY
    0x1A,  # MODE SENSE(6)
    0x1C,  # RECEIVE DIAGNOSTIC RESULTS
    0x23,  # READ FORMAT CAPACITIES
    0x25,  # READ CAPACITY(10)
    0x28,  # READ(10)
    0x43,  # READ TOC/PMA/ATIP
    0x46,  # GET CONFIGURATION
    0x4A,  # GET EVENT STATUS NOTIFICATION
    0x4D,  # LOG SENSE
    0x51,  # READ DISC INFORMATION
    0x52,  # READ TRACK INFORMATION
    0x5A,  # MODE SENSE(10)
    0x88,  # READ(16)
    0x9E,  # SERVICE ACTION IN(16): READ CAPACITY(16), GET LBA STATUS
    0xA0,  # REPORT LUNS
    0xA3,  # MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES, ...
    0xA8,  # READ(12)
    0xAD,  # READ DVD STRUCTURE
    0xBD,  # MECHANISM STATUS
    0xBE,  # READ CD
})
"""Commands that only read: what blockd-scsi-command sends unless configured otherwise."""

MEDIUM_WRITE_OPCODES = frozenset({
    0x04,  # FORMAT UNIT
    0x0A,  # WRITE(6)
    0x2A,  # WRITE(10)
    0x2E,  # WRITE AND VERIFY(10)
    0x41,  # WRITE SAME(10)
    0x42,  # UNMAP
    0x89,  # COMPARE AND WRITE
    0x8A,  # WRITE(16)
    0x8E,  # WRITE AND VERIFY(16)
    0x93,  # WRITE SAME(16)
    0xAA,  # WRITE(12)
    0xAE,  # WRITE AND VERIFY(12)
})
"""Commands that change the medium's data: never sent to a read-only node."""

Direction = Literal["none", "from-device", "to-device"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ScsiCommandArgs:
    """blockd-scsi-command: the unit (node-name or id), the CDB and the data."""

    node_name: str | None = None
    id: str | None = None
    cdb: str
    direction: Direction = "none"
    transfer_length: int | None = None
    data: str | None = None
    timeout_ms: int = DEFAULT_TIMEOUT_MS


def _target(ctx: CommandContext, args: ScsiCommandArgs) -> tuple[Node, Device | None]:
    """The node named (directly or as a device's medium) and the device using it."""
    if (args.node_name is None) == (args.id is None):
        raise InvalidArgument("Exactly one of 'node-name' and 'id' must be given")
    registry = ctx.registry
    if args.id is not None:
        device = registry.find_device(id=args.id)
        if device.node is None:
            raise BlockdError(f"Device '{args.id}' has no medium")
        return device.node, device
    node = registry.nodes.get(args.node_name or "")
    if node is None:
        raise BlockdError(f"Cannot find node '{args.node_name}'")
    user = registry.devices.get(node.user or "")
    return node, user if user is not None and user.node is node else None


_SEPARATORS = str.maketrans("", "", " :-_")


def _cdb(text: str) -> bytes:
    """The CDB from hex digits, optionally ``0x``-prefixed and split by spaces, colons,
    dashes or underscores (qmp-shell turns a value of decimal digits into a number, so
    ``cdb=0x120000006000`` or ``cdb=12:00:00:00:60:00`` is how it sends INQUIRY)."""
    digits = text.strip()
    if digits[:2] in ("0x", "0X"):
        digits = digits[2:]
    try:
        cdb = bytes.fromhex(digits.translate(_SEPARATORS))
    except ValueError:
        raise InvalidArgument(
            "Parameter 'cdb' expects a CDB in hexadecimal digits") from None
    if not scsi.MIN_CDB_LEN <= len(cdb) <= scsi.MAX_CDB_LEN:
        raise InvalidArgument(
            f"Parameter 'cdb' expects {scsi.MIN_CDB_LEN} to {scsi.MAX_CDB_LEN} bytes, "
            f"not {len(cdb)}")
    return cdb


def _transfer(args: ScsiCommandArgs) -> tuple[bytes, int]:
    """(data out, length in) for the direction; raises InvalidArgument for a mismatch."""
    if args.direction == "to-device":
        if args.data is None:
            raise InvalidArgument("Parameter 'data' is missing (direction 'to-device')")
        if args.transfer_length is not None:
            raise InvalidArgument("Parameter 'transfer-length' is for direction 'from-device'")
        if len(args.data) > (MAX_TRANSFER_LENGTH + 2) // 3 * 4:
            raise InvalidArgument(f"Parameter 'data' exceeds {MAX_TRANSFER_LENGTH} bytes")
        try:
            out = base64.b64decode(args.data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument("Parameter 'data' expects base64") from None
        if not out:
            raise InvalidArgument("Parameter 'data' is empty")
        return out, 0
    if args.data is not None:
        raise InvalidArgument("Parameter 'data' is for direction 'to-device'")
    if args.direction == "from-device":
        length = args.transfer_length
        if length is None:
            raise InvalidArgument("Parameter 'transfer-length' is missing "
                                  "(direction 'from-device')")
        if not 1 <= length <= MAX_TRANSFER_LENGTH:
            raise InvalidArgument(
                f"Parameter 'transfer-length' expects 1 to {MAX_TRANSFER_LENGTH}")
        return b"", length
    if args.transfer_length is not None:
        raise InvalidArgument("Parameter 'transfer-length' is for direction 'from-device'")
    return b"", 0


def _check_allowed(ctx: CommandContext, node: Node, opcode: int) -> None:
    allowed = ctx.scsi_allowed_opcodes
    if allowed is None:
        allowed = DEFAULT_ALLOWED_OPCODES
    if allowed != "all" and opcode not in allowed:
        raise BlockdError(
            f"SCSI command {scsi.opcode_name(opcode)} (0x{opcode:02x}) is not allowed; "
            "add it to [scsi-passthrough] allowed-opcodes in the configuration to send it")
    if opcode in MEDIUM_WRITE_OPCODES and node.read_only:
        raise ReadOnly(
            f"Node '{node.name}' is read-only: {scsi.opcode_name(opcode)} would write it")


def scsi_reply(result: ScsiResult, direction: Direction) -> dict[str, object]:
    """The QMP return value for one command's result."""
    reply: dict[str, object] = {
        "status": result.status,
        "status-name": scsi.status_name(result.status),
        "resid": result.residual,
        "duration-ns": result.duration_ns,
    }
    sense = scsi.decode_sense(result.sense) if result.sense else None
    if direction == "from-device":
        # After a failed command the kernel's sg driver may still copy back its reused
        # buffer (an earlier command's data) with no residual: only data of a command
        # that worked is the unit's answer.
        worked = result.status in (scsi.GOOD, scsi.CONDITION_MET) or (
            sense is not None and sense.sense_key == scsi.RECOVERED_ERROR)
        reply["data"] = base64.b64encode(result.data if worked else b"").decode("ascii")
    if result.status == scsi.CHECK_CONDITION or sense is not None:
        if sense is None:
            reply["sense"] = {"raw": result.sense.hex()}
        else:
            decoded: dict[str, object] = {
                "raw": result.sense.hex(),
                "key": sense.sense_key,
                "key-name": sense.key_name,
                "asc": sense.asc,
                "ascq": sense.ascq,
                "description": sense.describe(),
                "deferred": sense.deferred,
            }
            if sense.information is not None:
                decoded["information"] = sense.information
            reply["sense"] = decoded
    return reply


def register(table: CommandTable) -> None:
    @table.command("blockd-scsi-command")
    async def scsi_command(ctx: CommandContext, args: ScsiCommandArgs) -> object:
        node, device = _target(ctx, args)
        cdb = _cdb(args.cdb)
        data_out, data_in_len = _transfer(args)
        if not 1 <= args.timeout_ms <= MAX_TIMEOUT_MS:
            raise InvalidArgument(f"Parameter 'timeout-ms' expects 1 to {MAX_TIMEOUT_MS}")
        _check_allowed(ctx, node, cdb[0])
        try:
            result = await run_scsi_command(
                node, device, ctx.registry.run_control, cdb, data_out, data_in_len,
                args.timeout_ms)
        except OSError as exc:
            raise BlockdError(
                f"SCSI command {scsi.opcode_name(cdb[0])} on node '{node.name}': "
                f"{exc.strerror or exc}", exc.errno) from None
        return scsi_reply(result, args.direction)
