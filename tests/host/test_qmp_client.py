"""qemu.qmp's QMPClient, the real client, against a running blockd process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

import pytest
from daemons import BlockdFactory, DaemonProcess
from qemu.qmp import EventListener, ExecuteError, QMPClient

ALL_COMMANDS = {
    "qmp_capabilities", "query-version", "query-commands", "quit", "blockdev-add",
    "blockdev-del", "query-named-block-nodes", "query-block", "query-blockstats",
    "block-latency-histogram-set", "device_add", "device_del",
    "stop", "cont", "query-status", "blockd-device-resume",
    "nbd-server-start", "nbd-server-stop", "block-export-add", "block-export-del",
    "query-block-exports", "nbd-server-add", "nbd-server-remove",
    "eject", "blockdev-open-tray", "blockdev-close-tray", "blockdev-remove-medium",
    "blockdev-insert-medium", "blockdev-change-medium", "blockd-lock-medium",
    "blockd-scsi-command", "blockd-query-hotplug", "blockd-hotplug-rescan",
    "blockd-query-limits", "object-add", "object-del",
}


async def expect_error(qmp: QMPClient, cmd: str, args: dict[str, object] | None,
                       error_class: str, desc: str) -> None:
    with pytest.raises(ExecuteError) as info:
        await qmp.execute(cmd, args)
    assert (info.value.error_class, str(info.value)) == (error_class, desc)


async def test_greeting_and_version(qmp: QMPClient) -> None:
    greeting = qmp.greeting
    assert greeting is not None
    version = await qmp.execute("query-version")
    assert version == dict(greeting.QMP.version)  # same shape as the greeting's
    assert version["qemu"] == {"major": 7, "minor": 2, "micro": 0}
    assert str(version["package"]).startswith("blockd ")
    assert list(greeting.QMP.capabilities) == []


async def test_query_commands_lists_every_command(qmp: QMPClient) -> None:
    names = {c["name"] for c in await qmp.execute("query-commands")}
    assert names == ALL_COMMANDS


async def test_socket_is_private(blockd: DaemonProcess) -> None:
    assert stat.S_IMODE(os.stat(blockd.qmp_path).st_mode) == 0o600


async def test_nodes_lifecycle(qmp: QMPClient, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "file0",
                                       "filename": str(img), "discard": "unmap"})
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "null0",
                                       "size": 1 << 30, "read-zeroes": True})
    nodes = await qmp.execute("query-named-block-nodes")
    assert [n["node-name"] for n in nodes] == ["null0", "file0"]  # newest first
    null0, file0 = nodes
    assert file0["drv"] == "file" and file0["file"] == str(img) and file0["ro"] is False
    assert file0["image"]["virtual-size"] == 1 << 20
    assert file0["image"]["dirty-flag"] is False
    assert null0["image"]["filename"] == (
        'json:{"read-zeroes": true, "driver": "null-co", "size": 1073741824}')
    assert "dirty-flag" not in null0["image"]

    await expect_error(qmp, "blockdev-add", {"driver": "file", "node-name": "file0",
                                             "filename": str(img)},
                       "GenericError", "Duplicate nodes with node-name='file0'")
    await expect_error(qmp, "blockdev-add", {"driver": "null-co", "node-name": "1bad"},
                       "GenericError", "Invalid node-name: '1bad'")
    await expect_error(qmp, "blockdev-add", {"driver": "null-co"},
                       "GenericError", "'node-name' must be specified for the root node")
    missing = str(tmp_path / "missing.img")
    await expect_error(qmp, "blockdev-add", {"driver": "file", "node-name": "m",
                                             "filename": missing},
                       "GenericError", f"Could not open '{missing}': No such file or directory")
    await expect_error(qmp, "blockdev-add", {"driver": "host_device", "node-name": "h",
                                             "filename": str(img)},
                       "GenericError",
                       f"'host_device' driver requires '{img}' to be either a character "
                       "or block device")
    await expect_error(qmp, "blockdev-add", {"driver": "file", "node-name": "x5",
                                             "filename": str(img), "aio": "native"},
                       "GenericError", "aio=native was specified, but it requires "
                       "cache.direct=on, which was not specified.")
    await expect_error(qmp, "blockdev-add", {"driver": "nosuchdrv", "node-name": "y"},
                       "GenericError", "Parameter 'driver' does not accept value 'nosuchdrv'")
    await expect_error(qmp, "blockdev-add", {"driver": "null-co", "node-name": "y",
                                             "size": "big"},
                       "GenericError", "Invalid parameter type for 'size', expected: integer")
    await expect_error(qmp, "blockdev-add", {"driver": "file", "node-name": "y",
                                             "filename": str(img), "cache": {"direct": "yes"}},
                       "GenericError",
                       "Invalid parameter type for 'cache.direct', expected: boolean")
    await expect_error(qmp, "blockdev-add", {"driver": "null-co", "node-name": "y",
                                             "bogus-opt": 1},
                       "GenericError", "Parameter 'bogus-opt' is unexpected")

    await qmp.execute("blockdev-del", {"node-name": "file0"})
    await expect_error(qmp, "blockdev-del", {"node-name": "file0"},
                       "GenericError", "Failed to find node with node-name='file0'")
    await expect_error(qmp, "blockdev-del", {}, "GenericError",
                       "Parameter 'node-name' is missing")
    await expect_error(qmp, "blockdev-del", {"node-name": 42}, "GenericError",
                       "Invalid parameter type for 'node-name', expected: string")


async def test_devices_and_events(blockd: DaemonProcess) -> None:
    a = await blockd.client("a")
    b = await blockd.client("b")
    await a.execute("blockdev-add", {"driver": "null-co", "node-name": "n0",
                                     "size": 1 << 20})
    await a.execute("device_add", {"driver": "hd", "id": "hd0", "drive": "n0"})
    await a.execute("device_add", {"driver": "cd", "id": "cd0"})
    blocks = await b.execute("query-block")
    assert [x["device"] for x in blocks] == ["hd0", "cd0"]
    hd0, cd0 = blocks
    assert hd0["qdev"] == "hd0" and hd0["removable"] is False and "tray_open" not in hd0
    assert hd0["io-status"] == "ok" and hd0["inserted"]["node-name"] == "n0"
    assert cd0 == {"device": "cd0", "qdev": "cd0", "type": "unknown", "removable": True,
                   "locked": False, "tray_open": False, "io-status": "ok"}

    await expect_error(a, "blockdev-del", {"node-name": "n0"}, "GenericError",
                       "Node n0 is in use")
    await expect_error(a, "device_add", {"driver": "hd", "id": "hd1", "drive": "n0"},
                       "GenericError", "Property 'hd.drive' can't take value 'n0', it's in use")
    await expect_error(a, "device_add", {"driver": "hd", "id": "hd1", "drive": "nope"},
                       "GenericError", "Property 'hd.drive' can't find value 'nope'")
    await expect_error(a, "device_add", {"driver": "floppy", "id": "f"},
                       "GenericError", "'floppy' is not a valid device model name")
    await expect_error(a, "device_add", {"driver": "cd", "id": "cd0"},
                       "GenericError", "Duplicate device ID 'cd0'")
    await expect_error(a, "device_del", {"id": "nope"}, "DeviceNotFound",
                       "Device 'nope' not found")

    listener = EventListener()
    with b.listen(listener):
        await a.execute("device_del", {"id": "hd0"})
        event = await asyncio.wait_for(listener.get(), 5)
    assert event["event"] == "DEVICE_DELETED"
    assert event["data"] == {"device": "hd0", "path": "/machine/peripheral/hd0"}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    # The node is free again once its device is gone.
    await a.execute("blockdev-del", {"node-name": "n0"})


async def test_blockstats_and_histograms(qmp: QMPClient) -> None:
    await qmp.execute("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    await qmp.execute("device_add", {"driver": "hd", "id": "hd0", "drive": "n0",
                                     "stats-intervals": [60, 3600]})
    [entry] = await qmp.execute("query-blockstats")
    assert entry["device"] == "hd0" and entry["qdev"] == "hd0" and entry["node-name"] == "n0"
    assert entry["stats"]["account_failed"] is True and entry["stats"]["rd_operations"] == 0
    assert "idle_time_ns" not in entry["stats"]
    assert [t["interval_length"] for t in entry["stats"]["timed_stats"]] == [60, 3600]
    assert entry["stats"]["timed_stats"][0]["avg_rd_queue_depth"] == 0
    [node] = await qmp.execute("query-blockstats", {"query-nodes": True})
    assert node["node-name"] == "n0" and node["stats"]["account_invalid"] is False

    await qmp.execute("block-latency-histogram-set",
                      {"id": "hd0", "boundaries": [10000, 100000, 1000000]})
    [entry] = await qmp.execute("query-blockstats")
    assert entry["stats"]["rd_latency_histogram"] == {
        "boundaries": [10000, 100000, 1000000], "bins": [0, 0, 0, 0]}
    await qmp.execute("block-latency-histogram-set", {"id": "hd0", "boundaries-write": [5]})
    [entry] = await qmp.execute("query-blockstats")
    assert entry["stats"]["wr_latency_histogram"]["boundaries"] == [5]
    assert entry["stats"]["rd_latency_histogram"]["boundaries"] == [10000, 100000, 1000000]
    await expect_error(qmp, "block-latency-histogram-set",
                       {"id": "hd0", "boundaries-write": [100, 10]},
                       "GenericError", "Device 'hd0' set write boundaries fail")
    await expect_error(qmp, "block-latency-histogram-set", {"id": "drv-hd0", "boundaries": [1]},
                       "DeviceNotFound", "Device 'drv-hd0' not found")
    await qmp.execute("block-latency-histogram-set", {"id": "hd0"})
    [entry] = await qmp.execute("query-blockstats")
    assert "rd_latency_histogram" not in entry["stats"]


async def test_unknown_command_and_arguments(qmp: QMPClient) -> None:
    await expect_error(qmp, "no-such-command", None, "CommandNotFound",
                       "The command no-such-command has not been found")
    await expect_error(qmp, "query-version", {"foo": 1}, "GenericError",
                       "Parameter 'foo' is unexpected")
    assert (await qmp.execute("query-block")) == []  # the session is still usable


async def test_concurrent_clients(blockd: DaemonProcess) -> None:
    clients = [await blockd.client(f"c{i}") for i in range(16)]

    async def work(i: int, c: QMPClient) -> list[str]:
        await c.execute("blockdev-add", {"driver": "null-co", "node-name": f"n{i}"})
        await c.execute("device_add", {"driver": "hd", "id": f"d{i}", "drive": f"n{i}"})
        return [d["device"] for d in await c.execute("query-block")]

    results = await asyncio.gather(*(work(i, c) for i, c in enumerate(clients)))
    assert all(f"d{i}" in seen for i, seen in enumerate(results))
    final = {d["device"] for d in await clients[0].execute("query-block")}
    assert final == {f"d{i}" for i in range(16)}


async def test_quit_exits_cleanly(blockd_factory: BlockdFactory) -> None:
    d = blockd_factory()
    qmp = await d.client()
    assert await qmp.execute("quit") == {}
    # The server hangs up after the reply; qemu.qmp reports that EOF on disconnect.
    with contextlib.suppress(EOFError):
        await qmp.disconnect()
    assert d.proc.wait(20) == 0
    assert not os.path.exists(d.qmp_path)
    assert not os.path.exists(d.pidfile)


async def test_sigterm_exits_cleanly(blockd_factory: BlockdFactory) -> None:
    d = blockd_factory()
    qmp = await d.client()
    await qmp.execute("query-block")
    assert d.stop() == 0
    await qmp.disconnect()
    assert not os.path.exists(d.qmp_path)
