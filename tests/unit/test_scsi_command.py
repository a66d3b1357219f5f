"""blockd-scsi-command through the dispatcher, on the sg driver over a SCSI unit model.

The dispatcher, the registry and the sg driver are the real ones; only the
kernel below the driver is the model (tests/scsi_target.py).  The VM tier sends
the same commands to the kernel's sg driver.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from scsi_target import ScsiUnit

from blockd.block.node import Node
from blockd.block.registry import Registry
from blockd.devices import scsi
from blockd.devices.base import NodeOptions, ScsiResult
from blockd.devices.sg import SgDriver
from blockd.events import EventBus
from blockd.qmp.commands import CommandContext, build_table
from blockd.qmp.commands.scsi import scsi_reply
from blockd.qmp.dispatch import CommandError, Dispatcher


class NoExports:
    """The export service: not used by these commands."""


def make(unit: ScsiUnit, *, read_only: bool = False,
         allowed: Any = None) -> tuple[Dispatcher, Registry]:
    registry = Registry(executor=ThreadPoolExecutor(2), bus=EventBus())
    options = NodeOptions(driver="sg", node_name="sg0", filename="/dev/sg9", read_only=read_only)
    driver = SgDriver.open(options, kernel=unit)  # type: ignore[arg-type]
    registry.nodes["sg0"] = Node("sg0", driver, options, driver.getlength(), driver.get_info())
    context = CommandContext(registry=registry, nbd=NoExports(),  # type: ignore[arg-type]
                             version={}, request_quit=lambda: None,
                             scsi_allowed_opcodes=allowed)
    return Dispatcher(build_table(), context), registry


async def run(dispatcher: Dispatcher, **args: object) -> Any:
    return await dispatcher.execute("blockd-scsi-command", dict(args))


async def test_inquiry_returns_the_data_in_base64() -> None:
    unit = ScsiUnit()
    dispatcher, _ = make(unit)
    reply = await run(dispatcher, **{"node-name": "sg0", "cdb": "120000006000",
                                     "direction": "from-device", "transfer-length": 96})
    data = base64.b64decode(reply["data"])
    assert len(data) == 96 and data[8:16] == b"BLOCKD  " and data[16:23] == b"MODEL-T"
    assert reply["status"] == 0 and reply["status-name"] == "GOOD" and reply["resid"] == 0
    assert reply["duration-ns"] > 0
    assert "sense" not in reply


@pytest.mark.parametrize("cdb", ["0x120000006000", "12:00:00:00:60:00", "12 00 00 00 60 00",
                                 "12-00-00-00-60-00", "0X12000000600_0"])
async def test_cdb_spellings_qmp_shell_can_send(cdb: str) -> None:
    unit = ScsiUnit()
    dispatcher, _ = make(unit)
    unit.sent.clear()
    reply = await run(dispatcher, **{"node-name": "sg0", "cdb": cdb,
                                     "direction": "from-device", "transfer-length": 96})
    assert reply["status"] == 0
    assert unit.sent[0].cdb == bytes.fromhex("120000006000")


async def test_check_condition_is_an_answer_with_decoded_sense() -> None:
    unit = ScsiUnit(blocks=16)
    dispatcher, registry = make(unit)
    registry.add_device("hd", "disk0", "sg0")
    cdb = scsi.read_write(False, 100, 1).hex()
    reply = await run(dispatcher, id="disk0", cdb=cdb, direction="from-device",
                      **{"transfer-length": 512})
    assert reply["status"] == 2 and reply["status-name"] == "CHECK CONDITION"
    assert reply["resid"] == 512
    assert reply["sense"] == {
        "raw": "700005000000000a00000000210000000000",
        "key": 5,
        "key-name": "ILLEGAL REQUEST",
        "asc": 0x21,
        "ascq": 0,
        "description": "ILLEGAL REQUEST: logical block address out of range",
        "deferred": False,
    }
    device = registry.devices["disk0"]
    assert device.scsi_commands == {"READ(10)": 1}
    assert device.scsi_check_conditions == {"ILLEGAL REQUEST": 1}


async def test_default_allowlist_refuses_writes_and_names_the_setting() -> None:
    unit = ScsiUnit()
    dispatcher, _ = make(unit)
    unit.sent.clear()
    with pytest.raises(CommandError) as caught:
        await run(dispatcher, **{"node-name": "sg0", "cdb": scsi.read_write(True, 0, 1).hex(),
                                 "direction": "to-device",
                                 "data": base64.b64encode(b"x" * 512).decode()})
    assert caught.value.error_class == "GenericError"
    assert "WRITE(10) (0x2a) is not allowed" in caught.value.desc
    assert "[scsi-passthrough] allowed-opcodes" in caught.value.desc
    assert unit.sent == []


async def test_configured_allowlist_sends_writes_but_never_to_a_read_only_node() -> None:
    unit = ScsiUnit()
    dispatcher, _ = make(unit, allowed="all")
    payload = b"\xab" * 512
    reply = await run(dispatcher, **{"node-name": "sg0", "cdb": scsi.read_write(True, 3, 1).hex(),
                                     "direction": "to-device",
                                     "data": base64.b64encode(payload).decode()})
    assert reply["status"] == 0 and "data" not in reply
    assert unit.data[3 * 512 : 4 * 512] == payload
    ro_unit = ScsiUnit()
    ro_dispatcher, _ = make(ro_unit, read_only=True, allowed="all")
    with pytest.raises(CommandError, match="read-only"):
        await run(ro_dispatcher, **{"node-name": "sg0",
                                    "cdb": scsi.read_write(True, 3, 1).hex(),
                                    "direction": "to-device",
                                    "data": base64.b64encode(payload).decode()})
    only_inquiry, _ = make(ScsiUnit(), allowed=frozenset({0x12}))
    with pytest.raises(CommandError, match="TEST UNIT READY"):
        await run(only_inquiry, **{"node-name": "sg0", "cdb": "000000000000"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"cdb": "1200"}, "expects 6 to 16 bytes, not 2"),
        ({"cdb": "12" * 17}, "expects 6 to 16 bytes, not 17"),
        ({"cdb": "zz0000006000"}, "hexadecimal"),
        ({"cdb": "120000006000", "direction": "from-device"}, "'transfer-length' is missing"),
        ({"cdb": "120000006000", "direction": "from-device", "transfer-length": 0},
         "expects 1 to 16777216"),
        ({"cdb": "120000006000", "direction": "from-device",
          "transfer-length": (16 << 20) + 1}, "expects 1 to 16777216"),
        ({"cdb": "120000006000", "transfer-length": 96}, "for direction 'from-device'"),
        ({"cdb": "120000006000", "data": "AAAA"}, "for direction 'to-device'"),
        ({"cdb": "2a0000000000000001 00", "direction": "to-device"}, "'data' is missing"),
        ({"cdb": "2a0000000000000001 00", "direction": "to-device", "data": "!!"}, "base64"),
        ({"cdb": "000000000000", "timeout-ms": 0}, "'timeout-ms' expects 1 to 3600000"),
        ({"cdb": "000000000000", "direction": "sideways"}, "direction"),
        ({"cdb": 12}, "Invalid parameter type for 'cdb', expected: string"),
    ],
)
async def test_bad_arguments_get_precise_errors(args: dict[str, object], message: str) -> None:
    unit = ScsiUnit()
    dispatcher, _ = make(unit, allowed="all")
    unit.sent.clear()
    args = {k: v.replace(" ", "") if isinstance(v, str) and k == "cdb" else v
            for k, v in args.items()}
    with pytest.raises(CommandError, match=message):
        await run(dispatcher, **{"node-name": "sg0", **args})
    assert unit.sent == []


async def test_the_unit_must_be_named_once_and_exist() -> None:
    dispatcher, _registry = make(ScsiUnit())
    with pytest.raises(CommandError, match="Exactly one of 'node-name' and 'id'"):
        await run(dispatcher, cdb="000000000000")
    with pytest.raises(CommandError, match="Exactly one of"):
        await run(dispatcher, id="x", cdb="000000000000", **{"node-name": "sg0"})
    with pytest.raises(CommandError, match="Cannot find node 'nope'"):
        await run(dispatcher, cdb="000000000000", **{"node-name": "nope"})
    with pytest.raises(CommandError) as caught:
        await run(dispatcher, id="nope", cdb="000000000000")
    assert caught.value.error_class == "DeviceNotFound"


async def test_a_node_without_scsi_is_refused(tmp_path: Any) -> None:
    dispatcher, registry = make(ScsiUnit())
    image = tmp_path / "f.img"
    image.write_bytes(bytes(4096))
    await registry.add_node(NodeOptions(driver="file", node_name="f0", filename=str(image)))
    with pytest.raises(CommandError, match="driver file\\) cannot send SCSI commands"):
        await run(dispatcher, cdb="000000000000", **{"node-name": "f0"})


async def test_node_info_carries_the_identification() -> None:
    _, registry = make(ScsiUnit())
    info = registry.nodes["sg0"].device_info()
    assert info["drv"] == "sg"
    assert info["blockd-scsi"] == {
        "peripheral-type": 0,
        "peripheral-type-name": "disk",
        "removable": False,
        "vendor": "BLOCKD",
        "product": "MODEL-T",
        "revision": "0.1",
        "serial": "SER123",
        "wwn": "0x6001405abcdef012",
    }


def test_data_of_a_failed_command_is_not_passed_on() -> None:
    """The guest kernel's sg driver handed back the previous command's bytes with a CHECK
    CONDITION and no residual (seen in tests/vm/test_vm_sg.py): they are not the answer."""
    illegal = bytes.fromhex("700005000000000a00000000210000000000")
    stale = ScsiResult(2, illegal, b"BLOCKD-DISC sector 4095", 0, 5)
    assert scsi_reply(stale, "from-device")["data"] == ""
    recovered = bytes.fromhex("700001000000000a00000000170100000000")
    fine = ScsiResult(2, recovered, b"\x01\x02", 0, 5)
    assert scsi_reply(fine, "from-device")["data"] == "AQI="
    assert scsi_reply(ScsiResult(0, b"", b"\x01\x02", 0, 5), "from-device")["data"] == "AQI="
