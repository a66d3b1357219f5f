"""Awaitable forms of a Device's callback-style requests, for tests.

The daemon itself only uses ``Device.submit_*`` (the NBD server's hot path);
tests want to ``await`` a read or a write.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from blockd.block.device import Device
from blockd.devices.base import Buffer


async def _wait(submit: Callable[..., None], *args: object) -> Any:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(result: object, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)

    submit(*args, done)
    return await future


async def pread(device: Device, offset: int, length: int) -> bytearray:
    """Read ``length`` bytes at ``offset``."""
    buf: bytearray = await _wait(device.submit_read, offset, length)
    return buf


async def pwrite(device: Device, offset: int, data: Buffer, fua: bool = False) -> None:
    """Write ``data`` at ``offset`` (``fua``: on stable storage before returning)."""
    await _wait(device.submit_write, offset, data, fua)


async def write_zeroes(device: Device, offset: int, length: int, may_unmap: bool = False) -> None:
    """Zero a range (accounted as a write)."""
    await _wait(device.submit_write_zeroes, offset, length, may_unmap)


async def discard(device: Device, offset: int, length: int) -> None:
    """Discard a range."""
    await _wait(device.submit_discard, offset, length)


async def flush(device: Device) -> None:
    """Make completed writes durable."""
    await _wait(device.submit_flush)
