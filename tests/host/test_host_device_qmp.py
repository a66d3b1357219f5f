"""host_device nodes on real loop devices: through QMP, and I/O accounted through a device."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import devio
import pytest
from conftest import LoopFactory
from qemu.qmp import ExecuteError, QMPClient

from blockd.block.registry import Registry
from blockd.devices.base import NodeOptions
from blockd.events import EventBus


async def test_loop_devices_through_qmp(qmp: QMPClient, loop_device: LoopFactory) -> None:
    rw = loop_device(32 << 20, sector_size=4096)
    ro = loop_device(16 << 20, read_only=True)
    await qmp.execute("blockdev-add", {"driver": "host_device", "node-name": "rw",
                                       "filename": rw.path, "cache": {"direct": True},
                                       "aio": "native"})
    await qmp.execute("blockdev-add", {"driver": "host_device", "node-name": "ro",
                                       "filename": ro.path, "auto-read-only": True})
    nodes = {n["node-name"]: n for n in await qmp.execute("query-named-block-nodes")}
    assert nodes["rw"]["image"]["virtual-size"] == 32 << 20
    assert nodes["rw"]["cache"]["direct"] is True and nodes["rw"]["ro"] is False
    assert nodes["ro"]["image"]["virtual-size"] == 16 << 20
    assert nodes["ro"]["ro"] is True  # BLKROGET saw losetup -r
    assert nodes["rw"]["drv"] == "host_device" and nodes["rw"]["file"] == rw.path
    # 'file' refuses a block device, with QEMU's text.
    try:
        await qmp.execute("blockdev-add", {"driver": "file", "node-name": "f",
                                           "filename": rw.path})
    except Exception as err:  # qemu.qmp's ExecuteError
        assert str(err) == f"'file' driver requires '{rw.path}' to be a regular file"
    else:
        raise AssertionError("file driver accepted a block device")


async def test_accounting_equals_io_on_a_loop_device(loop_device: LoopFactory) -> None:
    loop = loop_device(8 << 20, sector_size=4096)
    registry = Registry(executor=ThreadPoolExecutor(4), bus=EventBus())
    await registry.add_node(NodeOptions(driver="host_device", node_name="d0",
                                        filename=loop.path, cache_direct=True,
                                        discard="unmap"))
    dev = registry.add_device("hd", "hd0", "d0")
    payload = os.urandom(64 << 10)
    writes = [(0, payload), (1 << 20, payload[:4096]), (4 << 20, payload[:12288])]
    for offset, data in writes:
        await devio.pwrite(dev, offset, data)
    await devio.pwrite(dev, 100, b"unaligned", fua=True)  # read-modify-write path under O_DIRECT
    await devio.flush(dev)
    reads = [(0, 64 << 10), (1 << 20, 4096), ((4 << 20) + 1, 5)]
    got = [await devio.pread(dev, o, n) for o, n in reads]
    await devio.write_zeroes(dev, 1 << 20, 4096)
    await devio.discard(dev, 6 << 20, 1 << 20)

    # What the loop device itself returns, read around blockd.
    fd = os.open(loop.path, os.O_RDONLY)
    try:
        on_disk = os.pread(fd, 8 << 20, 0)
    finally:
        os.close(fd)
    assert on_disk[100:109] == b"unaligned"
    assert on_disk[:100] == payload[:100] and on_disk[109:64 << 10] == payload[109:]
    assert on_disk[1 << 20:(1 << 20) + 4096] == b"\0" * 4096
    assert on_disk[4 << 20:(4 << 20) + 12288] == payload[:12288]
    assert bytes(got[0][:100]) == payload[:100]
    assert bytes(got[2]) == payload[1:6]

    s = dev.block_stats()["stats"]
    assert isinstance(s, dict)
    assert s["wr_operations"] == 5  # 4 writes + 1 write-zeroes
    assert s["wr_bytes"] == sum(len(d) for _, d in writes) + 9 + 4096
    assert (s["rd_operations"], s["rd_bytes"]) == (3, sum(n for _, n in reads))
    assert (s["flush_operations"], s["unmap_operations"], s["unmap_bytes"]) == (1, 1, 1 << 20)
    assert s["wr_highest_offset"] == (4 << 20) + 12288
    assert s["failed_wr_operations"] == s["invalid_wr_operations"] == 0
    await registry.close_all()


async def test_sg_driver_refuses_what_is_not_scsi(
    qmp: QMPClient, loop_device: LoopFactory, tmp_path: Path
) -> None:
    """A loop device answers no SCSI: the sg driver says so, and so does blockd-scsi-command.

    The sg driver on real SCSI units (the kernel's sg driver) is proven in tests/vm.
    """
    loop = loop_device(8 << 20)
    with pytest.raises(ExecuteError) as caught:
        await qmp.execute("blockdev-add", {"driver": "sg", "node-name": "s0",
                                           "filename": loop.path})
    # The errno is the kernel's (ENOTTY or EINVAL for loop, depending on the version).
    assert str(caught.value).startswith(
        f"'{loop.path}' is not a SCSI device (SG_GET_VERSION_NUM: ")
    image = tmp_path / "plain.img"
    image.write_bytes(bytes(4096))
    with pytest.raises(ExecuteError) as caught:
        await qmp.execute("blockdev-add", {"driver": "sg", "node-name": "s1",
                                           "filename": str(image)})
    assert "to be a SCSI generic device (/dev/sgN) or a SCSI block device" in str(caught.value)
    with pytest.raises(ExecuteError) as caught:
        await qmp.execute("blockdev-add", {"driver": "sg", "node-name": "s2",
                                           "filename": loop.path, "aio": "native"})
    assert str(caught.value) == "Parameter 'aio' is unexpected"
    await qmp.execute("blockdev-add", {"driver": "host_device", "node-name": "h0",
                                       "filename": loop.path})
    with pytest.raises(ExecuteError) as caught:
        await qmp.execute("blockd-scsi-command", {"node-name": "h0", "cdb": "120000006000",
                                                  "direction": "from-device",
                                                  "transfer-length": 96})
    assert str(caught.value) == "Node 'h0' (driver host_device) cannot send SCSI commands"
    assert not [n for n in await qmp.execute("query-named-block-nodes")
                if n["node-name"].startswith("s")]
