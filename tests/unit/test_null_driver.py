"""The ``null-co`` driver: sizes, read-zeroes, latency and QEMU's pseudo-filename."""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Any, cast

import pytest

from blockd.devices import DRIVERS, open_driver
from blockd.devices.base import BlockDriver, NodeOptions
from blockd.devices.null import NullDriver, null_pseudo_filename
from blockd.errors import InvalidArgument, ReadOnly


def null(**kw: Any) -> NullDriver:
    driver = open_driver(NodeOptions(driver="null-co", node_name="null0", **kw))
    assert isinstance(driver, NullDriver)
    return driver


def test_registered_and_protocol_conformant() -> None:
    assert list(DRIVERS) == ["file", "host_cdrom", "host_device", "null-co", "sg"]
    assert cast(object, DRIVERS["null-co"]) is NullDriver
    assert isinstance(null(), BlockDriver)


def test_filename_shows_only_given_options() -> None:
    assert null(size=4096).filename == "null-co://"
    assert null(size=4096, given=frozenset({"driver", "size"})).filename == (
        'json:{"driver": "null-co", "size": 4096}')


def test_default_size_is_one_gib() -> None:
    assert null().getlength() == 1 << 30
    assert null(size=12345).getlength() == 12345


def test_filename_matches_qsd_transcript() -> None:
    # query-named-block-nodes in QSD 7.2 for {"size": 1073741824, "read-zeroes": true}.
    driver = null(size=1073741824, read_zeroes=True, given=frozenset({"size", "read-zeroes"}))
    expected = 'json:{"read-zeroes": true, "driver": "null-co", "size": 1073741824}'
    assert driver.filename == expected
    assert driver.get_info().filename == expected


def test_pseudo_filename_follows_qemu_rules() -> None:
    assert null_pseudo_filename() == "null-co://"
    assert null_pseudo_filename(size=4096) == 'json:{"driver": "null-co", "size": 4096}'
    assert null_pseudo_filename(read_zeroes=False) == (
        'json:{"read-zeroes": false, "driver": "null-co"}'
    )
    assert null_pseudo_filename(size=1, driver="null-aio") == (
        'json:{"driver": "null-aio", "size": 1}'
    )


def test_read_zeroes_fills_buffers() -> None:
    driver = null(size=1 << 20, read_zeroes=True)
    a, b = bytearray(b"\xff" * 100), bytearray(b"\xff" * 50)
    assert driver.preadv(0, [memoryview(a), memoryview(b)]) == 150
    assert a == bytes(100) and b == bytes(50)


def test_without_read_zeroes_nothing_is_read() -> None:
    driver = null(size=1 << 20)
    buf = bytearray(b"\xab" * 64)
    assert driver.preadv(0, [memoryview(buf)]) == 0  # the device layer zero-fills the rest
    assert buf == b"\xab" * 64


async def test_device_never_returns_stale_memory() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from blockd.aio.buffers import BufferPool
    from blockd.block.registry import Registry
    from blockd.events import EventBus

    registry = Registry(executor=ThreadPoolExecutor(1), bus=EventBus())
    await registry.add_node(NodeOptions(driver="null-co", node_name="n", size=1 << 20))
    device = registry.add_device("hd", "hd0", "n")
    pool = BufferPool()
    stale = pool.get(100_000)
    stale[:] = b"\xab" * len(stale)
    pool.put(stale)
    got: list[object] = []
    device.submit_read(0, 100_000, lambda buf, exc: got.append(buf), pool)
    while not got:
        await asyncio.sleep(0.01)
    assert got[0] is stale  # the recycled buffer, now holding zeroes, not old data
    assert bytes(memoryview(stale)[:100_000]) == bytes(100_000)


def test_reads_stop_at_the_end() -> None:
    driver = null(size=1000, read_zeroes=True)
    buf = bytearray(b"\xff" * 100)
    assert driver.preadv(950, [memoryview(buf)]) == 50
    assert buf[:50] == bytes(50) and buf[50:] == b"\xff" * 50
    assert driver.preadv(2000, [memoryview(buf)]) == 0


def test_writes_discards_and_zeroes_are_accepted() -> None:
    driver = null(size=1 << 20, read_zeroes=True)
    assert driver.pwritev(0, [b"abc", bytearray(b"de")], fua=True) == 5
    driver.discard(0, 4096)
    driver.write_zeroes(0, 4096, may_unmap=True)
    driver.flush()
    buf = bytearray(b"\xff" * 5)
    driver.preadv(0, [memoryview(buf)])
    assert buf == bytes(5)  # nothing was stored
    info = driver.get_info()
    assert info.actual_size == 0 and info.can_discard


def test_read_only_refuses_writes() -> None:
    driver = null(read_only=True)
    for call in (
        lambda: driver.pwritev(0, [b"x"]),
        lambda: driver.discard(0, 512),
        lambda: driver.write_zeroes(0, 512),
    ):
        with pytest.raises(ReadOnly) as info:
            call()
        assert info.value.errno == errno.EROFS


def test_latency_ns_delays_requests() -> None:
    driver = null(latency_ns=30_000_000)
    start = time.monotonic()
    driver.preadv(0, [memoryview(bytearray(1))])
    driver.pwritev(0, [b"x"])
    driver.flush()
    assert time.monotonic() - start >= 0.09
    fast = null()
    start = time.monotonic()
    fast.preadv(0, [memoryview(bytearray(1))])
    assert time.monotonic() - start < 0.03


def test_invalid_options() -> None:
    with pytest.raises(InvalidArgument):
        null(size=-1)
    with pytest.raises(InvalidArgument):
        null(latency_ns=-5)
    with pytest.raises(InvalidArgument, match="force-share=on can only be used"):
        null(force_share=True)


def test_probe_device() -> None:
    assert NullDriver.probe_device("null-co://") == 100
    assert NullDriver.probe_device("/dev/null") == 0
