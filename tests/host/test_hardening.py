"""The hardening issue's findings against a running blockd, each reproduced as an attacker
or a careless operator would (the ones about NBD and QMP bounds live with their wires:
test_nbd_bad_input.py, test_qmp_raw.py, test_metrics.py)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from daemons import BlockdFactory
from qemu.qmp import ExecuteError


async def test_a_fifo_is_refused_at_once_and_never_holds_a_thread(
    blockd_factory: BlockdFactory, tmp_path: Path
) -> None:
    """Finding 6: a read-only blockdev-add of a FIFO blocked a control thread (8 of them
    blocked every later blockdev-add) and SIGTERM then hung."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = blockd_factory()
    qmp = await d.client()
    for n, driver in enumerate(["file", "host_device"] * 6):
        with pytest.raises(ExecuteError) as caught:
            await asyncio.wait_for(qmp.execute("blockdev-add", {
                "driver": driver, "node-name": f"f{n}", "filename": str(fifo),
                "read-only": True}), 5)
        assert "requires" in str(caught.value) and str(fifo) in str(caught.value)
    image = tmp_path / "ok.img"
    image.write_bytes(bytes(4096))
    await asyncio.wait_for(qmp.execute("blockdev-add", {
        "driver": "file", "node-name": "ok", "filename": str(image)}), 5)
    await qmp.disconnect()
    t0 = time.monotonic()
    assert d.stop() == 0, d.stderr()
    assert time.monotonic() - t0 < 10
