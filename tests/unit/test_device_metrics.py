"""The direct writer of per-device families says what prometheus_client would say."""

from __future__ import annotations

from pathlib import Path

import devio
import pytest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from blockd.block.registry import Registry
from blockd.block.stats import IoKind
from blockd.devices.base import NodeOptions, ScsiResult
from blockd.events import EventBus
from blockd.monitoring import device_families as device_metrics
from blockd.monitoring.daemon_stats import DaemonStats
from blockd.monitoring.samples import MetricsSource


def samples(families: list[Metric]) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    return {(s.name, tuple(sorted(s.labels.items())), float(s.value))
            for f in families for s in f.samples}


@pytest.fixture
async def devices(tmp_path: Path) -> list[object]:
    registry = Registry(executor=None, bus=EventBus())
    img = tmp_path / "a.img"
    img.write_bytes(b"x" * 65536)
    await registry.add_node(NodeOptions(driver="null-co", node_name="n0", size=1 << 20))
    await registry.add_node(NodeOptions(driver="null-co", node_name="n1", size=1 << 20))
    hd = registry.add_device("hd", "hd0", "n0")
    odd = registry.add_device("hd", "we.ird-id", "n1")
    cd = registry.add_device("cd", "cd0", None)
    cd.tray_open, cd.locked = True, True
    odd.iostatus = "nospace"
    odd.stats.set_histogram(IoKind.READ, [10_000, 2_000_000])
    for _ in range(3):
        await devio.pwrite(hd, 0, b"a" * 4096)
        await devio.pread(odd, 512, 512)
    await devio.flush(hd)
    hd.note_scsi_command(0x12, ScsiResult(0, b"", b""))
    hd.note_scsi_command(0x28, ScsiResult(2, bytes.fromhex("700005000000000a0000000021"), b""))
    return list(MetricsSource(registry, DaemonStats()).sample_now().devices)


@pytest.mark.parametrize("openmetrics", [False, True])
def test_writer_matches_prometheus_client(devices: list[object], openmetrics: bool) -> None:
    text = device_metrics.write(devices, openmetrics=openmetrics)  # type: ignore[arg-type]
    expected = list(device_metrics.families(devices))  # type: ignore[arg-type]
    if openmetrics:
        parsed = list(parse_openmetrics(text + "# EOF\n"))
        assert [(f.name, f.type, f.documentation, f.unit) for f in parsed] == \
            [(f.name, f.type, f.documentation, f.unit) for f in expected]
    else:
        parsed = list(parse_text(text))
    got, want = samples(parsed), samples(expected)
    assert got == want
    assert len(want) > 250  # every family, every device, every bucket
    assert ("blockd_device_read_latency_seconds_bucket",
            (("device", "we.ird-id"), ("le", "0.002"), ("node", "n1")), 3.0) in got
    assert ("blockd_device_tray_open", (("device", "cd0"), ("node", "")), 1.0) in got
    check = ("blockd_device_scsi_check_conditions_total",
             (("device", "hd0"), ("node", "n0"), ("sense_key", "ILLEGAL REQUEST")), 1.0)
    assert check in got
    assert ("blockd_device_scsi_commands_total",
            (("device", "hd0"), ("node", "n0"), ("opcode", "READ(10)")), 1.0) in got


async def test_the_writer_reuses_only_unchanged_devices(tmp_path: Path) -> None:
    registry = Registry(executor=None, bus=EventBus())
    for i in range(3):
        await registry.add_node(NodeOptions(driver="null-co", node_name=f"n{i}", size=1 << 20))
        registry.add_device("hd", f"hd{i}", f"n{i}")
    source = MetricsSource(registry, DaemonStats())
    writer = device_metrics.TextWriter()

    def scrape() -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        devices = source.sample_now().devices
        text = writer.write(devices, openmetrics=False)
        assert samples(list(parse_text(text))) == samples(list(device_metrics.families(devices)))
        return samples(list(parse_text(text)))

    first = scrape()
    await devio.pwrite(registry.devices["hd1"], 0, b"z" * 512)
    second = scrape()
    assert ("blockd_device_written_bytes_total", (("device", "hd1"), ("node", "n1")), 512.0) \
        in second - first
    registry.del_device("hd2")
    third = scrape()
    assert not any(dict(labels).get("device") == "hd2" for _, labels, _ in third)
    idle = [v for name, labels, v in third if name == "blockd_device_idle_seconds"]
    assert len(idle) == 1  # only hd1 has done I/O
