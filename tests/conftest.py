"""Fixtures shared by every tier: a real blockd process and real QMP clients."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

# The skip policy's hooks: in strict mode a skip fails unless tests/allowed_skips.py allows it.
from allowed_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401
from daemons import BlockdFactory, DaemonProcess, blockd_argv, start_daemon
from qemu.qmp import QMPClient


@pytest.fixture
def blockd_factory(tmp_path: Path) -> Iterator[BlockdFactory]:
    """Start blockd processes with extra options; all are stopped at the end."""
    started: list[DaemonProcess] = []

    def start(*args: str, qmp: str | None = None, metrics: str = "none") -> DaemonProcess:
        """``metrics="127.0.0.1:0"`` serves metrics on a free port (``d.metrics_url``)."""
        sock = qmp or str(tmp_path / f"qmp{len(started)}.sock")
        d = start_daemon(blockd_argv("--qmp", sock, *args, metrics=metrics), tmp_path,
                         f"blockd{len(started)}")
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.stop(signal.SIGKILL)


@pytest.fixture
async def blockd(blockd_factory: BlockdFactory) -> AsyncIterator[DaemonProcess]:
    """A running blockd with no devices, stopped (and checked to exit 0) afterwards."""
    d = blockd_factory()
    yield d
    for c in d.clients:
        await c.disconnect()
    assert d.stop() == 0, d.stderr()


@pytest.fixture
async def qmp(blockd: DaemonProcess) -> QMPClient:
    """A qemu.qmp client connected to ``blockd``."""
    return await blockd.client()
