"""The Prometheus collector (blockd/monitoring/) against a real Registry of null-co devices.

No HTTP here: the collector is driven as the HTTP thread drives it (``collect()`` from
another thread while the event loop runs) and as the loop itself may (``sample()``).
Latencies are exact because each device's statistics run on a clock that moves by a
chosen step on every reading.
"""

from __future__ import annotations

import asyncio
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import devio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from blockd.block.registry import Registry
from blockd.block.stats import DEFAULT_LATENCY_BOUNDARIES_NS, BlockAcctStats, IoKind
from blockd.devices.base import NodeOptions, ScsiResult
from blockd.errors import InvalidArgument, NoMedium
from blockd.events import EventBus
from blockd.monitoring.collector import BlockdCollector, ScrapeError, make_registry, render
from blockd.monitoring.daemon_stats import HOTPLUG_ACTIONS, DaemonStats
from blockd.monitoring.http import MetricsServer
from blockd.monitoring.samples import MetricsSource

US = 1_000  # ns
MS = 1_000_000  # ns
NS = 1e9

DEVICE_LABELS = {"device", "node"}
OPERATION_LABELS = {"device", "node", "operation"}

# name -> (type, unit, labels) for every per-device family.
DEVICE_FAMILIES: dict[str, tuple[str, str, set[str]]] = {
    "blockd_device_read_bytes_total": ("counter", "bytes", DEVICE_LABELS),
    "blockd_device_written_bytes_total": ("counter", "bytes", DEVICE_LABELS),
    "blockd_device_discarded_bytes_total": ("counter", "bytes", DEVICE_LABELS),
    "blockd_device_reads_completed_total": ("counter", "", DEVICE_LABELS),
    "blockd_device_writes_completed_total": ("counter", "", DEVICE_LABELS),
    "blockd_device_flush_requests_total": ("counter", "", DEVICE_LABELS),
    "blockd_device_discards_completed_total": ("counter", "", DEVICE_LABELS),
    "blockd_device_failed_operations_total": ("counter", "", OPERATION_LABELS),
    "blockd_device_invalid_operations_total": ("counter", "", OPERATION_LABELS),
    "blockd_device_read_time_seconds_total": ("counter", "seconds", DEVICE_LABELS),
    "blockd_device_write_time_seconds_total": ("counter", "seconds", DEVICE_LABELS),
    "blockd_device_flush_time_seconds_total": ("counter", "seconds", DEVICE_LABELS),
    "blockd_device_discard_time_seconds_total": ("counter", "seconds", DEVICE_LABELS),
    "blockd_device_read_latency_seconds": ("histogram", "seconds", DEVICE_LABELS | {"le"}),
    "blockd_device_write_latency_seconds": ("histogram", "seconds", DEVICE_LABELS | {"le"}),
    "blockd_device_flush_latency_seconds": ("histogram", "seconds", DEVICE_LABELS | {"le"}),
    "blockd_device_io_now": ("gauge", "", DEVICE_LABELS),
    "blockd_device_write_highest_offset_bytes": ("gauge", "bytes", DEVICE_LABELS),
    "blockd_device_idle_seconds": ("gauge", "seconds", DEVICE_LABELS),
    "blockd_device_tray_open": ("gauge", "", DEVICE_LABELS),
    "blockd_device_locked": ("gauge", "", DEVICE_LABELS),
    "blockd_device_medium_inserted": ("gauge", "", DEVICE_LABELS),
    "blockd_device_removable": ("gauge", "", DEVICE_LABELS),
    "blockd_device_size_bytes": ("gauge", "bytes", DEVICE_LABELS),
    "blockd_device_io_status": ("stateset", "", DEVICE_LABELS | {"blockd_device_io_status"}),
    "blockd_device_info": ("info", "", DEVICE_LABELS | {"driver", "filename", "serial", "vendor",
                                                   "product", "revision", "wwn"}),
    "blockd_device_scsi_commands_total": ("counter", "", DEVICE_LABELS | {"opcode"}),
    "blockd_device_scsi_check_conditions_total": ("counter", "", DEVICE_LABELS | {"sense_key"}),
}
DAEMON_FAMILIES: dict[str, tuple[str, set[str]]] = {
    "blockd_build_info": ("info", {"version", "qemu_version", "python_version"}),
    "blockd_start_time_seconds": ("gauge", set()),
    "blockd_uptime_seconds": ("gauge", set()),
    "blockd_qmp_sessions": ("gauge", set()),
    "blockd_qmp_sessions_accepted_total": ("counter", set()),
    "blockd_qmp_commands_total": ("counter", {"command", "result"}),
    "blockd_nbd_connections": ("gauge", set()),
    "blockd_nbd_connections_accepted_total": ("counter", set()),
    "blockd_nbd_poll_hits_total": ("counter", set()),
    "blockd_nbd_poll_seconds_total": ("counter", set()),
    "blockd_nbd_poll_paused_total": ("counter", set()),
    "blockd_nbd_exports": ("gauge", set()),
    "blockd_hotplug_events_total": ("counter", {"action"}),
    "blockd_devices": ("gauge", set()),
}


class StepClock:
    """A clock that moves ``step`` ns at every reading: each request lasts one step."""

    def __init__(self, step: int = 100 * US) -> None:
        self.now = 1_000_000_000
        self.step = step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


@pytest.fixture
def registry() -> Iterator[Registry]:
    executor = ThreadPoolExecutor(2)
    yield Registry(executor=executor, bus=EventBus())
    executor.shutdown()


async def add_disk(registry: Registry, name: str, clock: StepClock | None = None,
                   size: int = 1 << 20) -> tuple[str, StepClock]:
    clock = clock or StepClock()
    await registry.add_node(NodeOptions(driver="null-co", node_name=f"n-{name}", size=size,
                                        read_zeroes=True))
    registry.add_device("hd", name, f"n-{name}", stats=BlockAcctStats(clock=clock))
    return name, clock


def collector_for(registry: Registry, daemon_stats: DaemonStats | None = None,
                  ) -> tuple[MetricsSource, CollectorRegistry]:
    source = MetricsSource(registry, daemon_stats or DaemonStats(), qemu_version="7.2.0")
    return source, make_registry(BlockdCollector(source, asyncio.get_running_loop()))


_SUFFIX = {"counter": "_total", "info": "_info"}


async def scrape(prom: CollectorRegistry) -> dict[str, Metric]:
    """Collect as the HTTP thread does: from another thread, while the loop runs.

    Families are keyed by the name the text format gives them (a counter's with
    ``_total``, an info's with ``_info``), so that ``blockd_qmp_sessions`` (gauge) and
    ``blockd_qmp_sessions_accepted_total`` (counter) stay apart.
    """
    metrics = await asyncio.to_thread(lambda: list(prom.collect()))
    families = {m.name + _SUFFIX.get(m.type, ""): m for m in metrics}
    assert len(families) == len(metrics)
    return families


def value(families: dict[str, Metric], sample: str, **labels: str) -> float:
    family = sample
    if family not in families:
        family = sample.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
    found = [s.value for s in families[family].samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def devices_in(families: dict[str, Metric]) -> set[str]:
    return {s.labels["device"] for s in families["blockd_device_read_bytes_total"].samples}


# -- names, types, units, labels ------------------------------------------------------


async def test_every_family_has_its_name_type_unit_and_labels(registry: Registry) -> None:
    await add_disk(registry, "hd0")
    await devio.pread(registry.devices["hd0"], 0, 512)  # idle time exists from the first request
    # One raw command answered with CHECK CONDITION (ILLEGAL REQUEST), as blockd-scsi-command
    # counts it: the labelled SCSI families then have a sample.
    illegal = bytes.fromhex("700005000000000a00000000200000000000")
    registry.devices["hd0"].note_scsi_command(0x12, ScsiResult(2, illegal, b""))
    registry.add_device("cd", "cd0", None)
    _, prom = collector_for(registry)
    families = await scrape(prom)
    commands = families["blockd_device_scsi_commands_total"].samples
    assert [(s.labels["opcode"], s.value) for s in commands] == [("INQUIRY", 1)]
    checks = families["blockd_device_scsi_check_conditions_total"].samples
    assert [(s.labels["sense_key"], s.value) for s in checks] == [("ILLEGAL REQUEST", 1)]
    for name, (typ, unit, labels) in DEVICE_FAMILIES.items():
        family = families[name]
        assert (family.type, family.unit) == (typ, unit), name
        assert family.documentation, name
        assert family.samples, name
        for sample in family.samples:
            expected = labels - {"le"} if not sample.name.endswith("_bucket") else labels
            assert set(sample.labels) == expected, (name, sample)
    for name, (typ, labels) in DAEMON_FAMILIES.items():
        family = families[name]
        assert family.type == typ, name
        assert all(set(s.labels) == labels for s in family.samples), name
    # The process collector is registered on the daemon's own registry.
    assert "process_cpu_seconds_total" in families
    assert "process_resident_memory_bytes" in families


async def test_text_exposition_names(registry: Registry) -> None:
    await add_disk(registry, "hd0")
    _, prom = collector_for(registry)
    text = (await asyncio.to_thread(generate_latest, prom)).decode()
    for line in (
        "# TYPE blockd_device_read_bytes_total counter",
        "# TYPE blockd_device_read_latency_seconds histogram",
        "# TYPE blockd_device_info gauge",
        "# TYPE blockd_qmp_sessions gauge",
        "# TYPE blockd_qmp_sessions_accepted_total counter",
        "# TYPE blockd_nbd_connections gauge",
        "# TYPE blockd_nbd_connections_accepted_total counter",
        'blockd_device_read_latency_seconds_bucket{device="hd0",le="5e-05",node="n-hd0"} 0.0',
        'blockd_device_read_latency_seconds_bucket{device="hd0",le="+Inf",node="n-hd0"} 0.0',
    ):
        assert line in text.splitlines(), line
    openmetrics = (await asyncio.to_thread(generate_openmetrics, prom)).decode()
    assert "# UNIT blockd_device_read_bytes bytes" in openmetrics.splitlines()
    assert "# TYPE blockd_device_io_status stateset" in openmetrics.splitlines()
    assert "# TYPE blockd_device info" in openmetrics.splitlines()
    assert openmetrics.endswith("# EOF\n")


async def test_device_gauges_and_info(registry: Registry) -> None:
    await add_disk(registry, "hd0", size=3 << 20)
    registry.add_device("cd", "cd0", None)
    _, prom = collector_for(registry)
    f = await scrape(prom)
    hd = {"device": "hd0", "node": "n-hd0"}
    cd = {"device": "cd0", "node": ""}
    assert value(f, "blockd_device_size_bytes", **hd) == 3 << 20
    assert value(f, "blockd_device_medium_inserted", **hd) == 1
    assert value(f, "blockd_device_medium_inserted", **cd) == 0
    assert value(f, "blockd_device_removable", **hd) == 0
    assert value(f, "blockd_device_removable", **cd) == 1
    assert value(f, "blockd_device_locked", **cd) == 0
    # Only devices with a tray have the tray gauge; only inserted media have a size;
    # nothing is idle before its first request.
    assert [s.labels["device"] for s in f["blockd_device_tray_open"].samples] == ["cd0"]
    assert [s.labels["device"] for s in f["blockd_device_size_bytes"].samples] == ["hd0"]
    assert f["blockd_device_idle_seconds"].samples == []
    info = {s.labels["device"]: s.labels for s in f["blockd_device_info"].samples}
    assert info["hd0"]["driver"] == "null-co"
    inserted = registry.devices["hd0"].block_info()["inserted"]
    assert isinstance(inserted, dict)
    assert info["hd0"]["filename"] == inserted["file"] == "null-co://"  # as query-block says
    assert (info["hd0"]["serial"], info["hd0"]["vendor"], info["hd0"]["product"]) == ("", "", "")
    assert info["cd0"] | {} == {"device": "cd0", "node": "", "driver": "", "filename": "",
                                "serial": "", "vendor": "", "product": "", "revision": "",
                                "wwn": ""}
    cdrom = registry.devices["cd0"]
    cdrom.tray_open = cdrom.locked = True
    f = await scrape(prom)
    assert value(f, "blockd_device_tray_open", **cd) == 1
    assert value(f, "blockd_device_locked", **cd) == 1


# -- counters against the statistics ----------------------------------------------------


async def test_counters_equal_the_statistics(registry: Registry) -> None:
    name, clock = await add_disk(registry, "hd0")
    dev = registry.devices[name]
    clock.step = 30 * US
    await devio.pwrite(dev, 0, b"A" * 4096)
    await devio.pwrite(dev, 8192, b"B" * 512)
    clock.step = 2 * MS
    await devio.pread(dev, 0, 1024)
    await devio.flush(dev)
    await devio.discard(dev, 0, 65536)
    with pytest.raises(InvalidArgument):
        await devio.pread(dev, 1 << 20, 512)  # beyond the end: invalid
    cd = registry.add_device("cd", "cd0", None)
    with pytest.raises(NoMedium):
        await devio.pread(cd, 0, 512)  # no medium: failed
    _, prom = collector_for(registry)
    f = await scrape(prom)
    qmp = dev.block_stats()["stats"]
    assert isinstance(qmp, dict)
    hd = {"device": "hd0", "node": "n-hd0"}
    assert value(f, "blockd_device_read_bytes_total", **hd) == qmp["rd_bytes"] == 1024
    assert value(f, "blockd_device_written_bytes_total", **hd) == qmp["wr_bytes"] == 4608
    assert value(f, "blockd_device_discarded_bytes_total", **hd) == qmp["unmap_bytes"] == 65536
    assert value(f, "blockd_device_reads_completed_total", **hd) == qmp["rd_operations"] == 1
    assert value(f, "blockd_device_writes_completed_total", **hd) == qmp["wr_operations"] == 2
    assert value(f, "blockd_device_flush_requests_total", **hd) == qmp["flush_operations"] == 1
    assert value(f, "blockd_device_discards_completed_total", **hd) == qmp["unmap_operations"]
    assert value(f, "blockd_device_invalid_operations_total", operation="read", **hd) == 1
    assert value(f, "blockd_device_invalid_operations_total", operation="write", **hd) == 0
    assert value(f, "blockd_device_failed_operations_total", operation="read",
                 device="cd0", node="") == 1
    for field, metric in (("rd", "read"), ("wr", "write"), ("flush", "flush"),
                          ("unmap", "discard")):
        ns = qmp[f"{field}_total_time_ns"]
        assert isinstance(ns, int)
        assert value(f, f"blockd_device_{metric}_time_seconds_total", **hd) == ns / NS
    assert value(f, "blockd_device_write_time_seconds_total", **hd) == 60 * US / NS
    assert value(f, "blockd_device_write_highest_offset_bytes", **hd) == 8192 + 512
    assert value(f, "blockd_device_io_now", **hd) == 0
    idle = qmp["idle_time_ns"]
    assert isinstance(idle, int)
    assert 0 < value(f, "blockd_device_idle_seconds", **hd) <= idle / NS + 1


async def test_counters_never_go_backwards(registry: Registry) -> None:
    name, _ = await add_disk(registry, "hd0")
    dev = registry.devices[name]
    _, prom = collector_for(registry)

    def counters(f: dict[str, Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for m in f.values() if m.type in ("counter", "histogram")
                and m.name.startswith("blockd_") for s in m.samples}

    previous = counters(await scrape(prom))
    for round_ in range(5):
        for i in range(round_ + 1):
            await devio.pwrite(dev, i * 512, b"x" * 512)
            await devio.pread(dev, 0, 512)
        await devio.flush(dev)
        now = counters(await scrape(prom))
        assert set(previous) <= set(now)
        assert all(now[k] >= v for k, v in previous.items())
        assert any(now[k] > v for k, v in previous.items())
        previous = now


# -- histograms ------------------------------------------------------------------------


def buckets(f: dict[str, Metric], family: str, device: str) -> list[tuple[str, float]]:
    return [(s.labels["le"], s.value) for s in f[family].samples
            if s.name == family + "_bucket" and s.labels["device"] == device]


async def test_default_histograms_are_cumulative_and_not_in_qmp(registry: Registry) -> None:
    name, clock = await add_disk(registry, "hd0")
    dev = registry.devices[name]
    latencies = [10 * US, 50 * US, 50 * US + 1, 3 * MS, 2 * 10**9, 11 * 10**9]
    for latency in latencies:
        clock.step = latency
        await devio.pread(dev, 0, 512)
    _, prom = collector_for(registry)
    f = await scrape(prom)
    got = buckets(f, "blockd_device_read_latency_seconds", "hd0")
    assert [le for le, _ in got] == [*(repr(b / NS) for b in DEFAULT_LATENCY_BOUNDARIES_NS),
                                     "+Inf"]
    assert got[0] == ("5e-05", 2)  # 10 µs and exactly 50 µs: le means "at most"
    assert dict(got)["0.0001"] == 3
    assert dict(got)["0.005"] == 4
    assert dict(got)["2.5"] == 5
    assert dict(got)["10.0"] == 5
    counts = [count for _, count in got]
    assert counts == sorted(counts)  # cumulative
    total = value(f, "blockd_device_read_latency_seconds_count", device="hd0")
    assert counts[-1] == total == len(latencies)
    assert value(f, "blockd_device_read_latency_seconds_sum", device="hd0") == sum(latencies) / NS
    # Writes and flushes have (empty) histograms too.
    assert buckets(f, "blockd_device_write_latency_seconds", "hd0")[-1] == ("+Inf", 0)
    # QMP still shows no histogram: none was set (as in QEMU).
    qmp = dev.block_stats()["stats"]
    assert isinstance(qmp, dict)
    assert not any(key.endswith("_latency_histogram") for key in qmp)


async def test_set_boundaries_replace_the_default_buckets(registry: Registry) -> None:
    name, clock = await add_disk(registry, "hd0")
    dev = registry.devices[name]
    dev.stats.set_histogram(IoKind.WRITE, [1_000, 2 * MS])
    for latency in (500, 1_500, 3 * MS, 3 * MS):
        clock.step = latency
        await devio.pwrite(dev, 0, b"z" * 512)
    _, prom = collector_for(registry)
    f = await scrape(prom)
    assert buckets(f, "blockd_device_write_latency_seconds", "hd0") == [
        ("1e-06", 1), ("0.002", 2), ("+Inf", 4)]
    assert value(f, "blockd_device_write_latency_seconds_count", device="hd0") == 4
    # Reads keep the default buckets.
    assert len(buckets(f, "blockd_device_read_latency_seconds", "hd0")) == \
        len(DEFAULT_LATENCY_BOUNDARIES_NS) + 1
    qmp = dev.block_stats()["stats"]
    assert isinstance(qmp, dict)
    assert qmp["wr_latency_histogram"] == {"boundaries": [1_000, 2 * MS], "bins": [1, 1, 2]}
    # Removing it brings the default buckets back, with everything they counted.
    dev.stats.set_histogram(IoKind.WRITE, None)
    f = await scrape(prom)
    assert buckets(f, "blockd_device_write_latency_seconds", "hd0")[-1] == ("+Inf", 4)


async def test_failed_requests_count_in_histograms(registry: Registry) -> None:
    registry.add_device("cd", "cd0", None, stats=BlockAcctStats(clock=StepClock()))
    with pytest.raises(NoMedium):
        await devio.pread(registry.devices["cd0"], 0, 512)
    _, prom = collector_for(registry)
    f = await scrape(prom)
    assert value(f, "blockd_device_read_latency_seconds_count", device="cd0") == 1
    assert value(f, "blockd_device_reads_completed_total", device="cd0") == 0


# -- io status, removal, daemon series ------------------------------------------------------


async def test_io_status_is_a_stateset(registry: Registry) -> None:
    name, _ = await add_disk(registry, "hd0")
    _, prom = collector_for(registry)

    def states(f: dict[str, Metric]) -> dict[str, float]:
        return {s.labels["blockd_device_io_status"]: s.value
                for s in f["blockd_device_io_status"].samples}

    assert states(await scrape(prom)) == {"ok": 1, "failed": 0, "nospace": 0}
    registry.devices[name].iostatus = "nospace"
    assert states(await scrape(prom)) == {"ok": 0, "failed": 0, "nospace": 1}
    registry.devices[name].iostatus = "failed"
    assert states(await scrape(prom)) == {"ok": 0, "failed": 1, "nospace": 0}


async def test_a_removed_device_disappears(registry: Registry) -> None:
    await add_disk(registry, "hd0")
    await add_disk(registry, "hd1")
    _, prom = collector_for(registry)
    f = await scrape(prom)
    assert devices_in(f) == {"hd0", "hd1"} and value(f, "blockd_devices") == 2
    registry.del_device("hd1")
    f = await scrape(prom)
    assert value(f, "blockd_devices") == 1
    for family in f.values():
        assert not any(s.labels.get("device") == "hd1" for s in family.samples), family.name


async def test_daemon_series(registry: Registry) -> None:
    stats = DaemonStats(wall_clock=lambda: 1_700_000_000.5)
    await add_disk(registry, "hd0")
    _, prom = collector_for(registry, stats)
    f = await scrape(prom)
    assert value(f, "blockd_start_time_seconds") == 1_700_000_000.5
    assert value(f, "blockd_uptime_seconds") >= 0
    build = f["blockd_build_info"].samples[0].labels
    assert build["qemu_version"] == "7.2.0" and build["version"] and build["python_version"]
    assert {s.labels["action"]: s.value for s in f["blockd_hotplug_events_total"].samples} == \
        dict.fromkeys(HOTPLUG_ACTIONS, 0)
    assert f["blockd_qmp_commands_total"].samples == []
    assert value(f, "blockd_qmp_sessions") == 0
    assert value(f, "blockd_qmp_sessions_accepted_total") == 0
    assert value(f, "blockd_nbd_connections") == 0 and value(f, "blockd_nbd_exports") == 0
    stats.command_done("query-block", "success")
    stats.command_done("query-block", "success")
    stats.command_done("device_del", "DeviceNotFound")
    stats.hotplug_event("add")
    with pytest.raises(ValueError):
        stats.hotplug_event("bogus")
    f = await scrape(prom)
    assert value(f, "blockd_qmp_commands_total", command="query-block", result="success") == 2
    assert value(f, "blockd_qmp_commands_total", command="device_del",
                 result="DeviceNotFound") == 1
    assert value(f, "blockd_hotplug_events_total", action="add") == 1


# -- sampling on the loop thread ------------------------------------------------------------


async def test_sampling_yields_between_chunks_and_skips_removed_devices(
    registry: Registry,
) -> None:
    for i in range(7):
        await add_disk(registry, f"d{i}")
    source, _ = collector_for(registry)
    ran: list[str] = []

    def meanwhile() -> None:  # runs on the loop while the scrape waits between chunks
        ran.append("callback")
        registry.del_device("d5")

    asyncio.get_running_loop().call_soon(meanwhile)
    sample = await source.sample(chunk=2)
    assert ran == ["callback"]
    assert [d.id for d in sample.devices] == ["d0", "d1", "d2", "d3", "d4", "d6"]
    assert [d.id for d in source.sample_now().devices] == ["d0", "d1", "d2", "d3", "d4", "d6"]


async def test_collect_on_the_loop_thread_samples_directly(registry: Registry) -> None:
    await add_disk(registry, "hd0")
    _, prom = collector_for(registry)
    names = {m.name for m in prom.collect()}  # no deadlock waiting for ourselves
    assert "blockd_device_read_bytes" in names  # the counter's family name


def test_collect_fails_cleanly_when_the_loop_does_not_answer() -> None:
    loop = asyncio.new_event_loop()  # never run
    try:
        registry = Registry(executor=None, bus=EventBus())
        source = MetricsSource(registry, DaemonStats())
        collector = BlockdCollector(source, loop, timeout=0.05)
        with pytest.raises(ScrapeError, match="did not hand over"):
            collector.take_sample()
    finally:
        loop.run_until_complete(asyncio.sleep(0))  # let the cancelled task finish
        loop.close()
    with pytest.raises(ScrapeError, match="not running"):
        collector.take_sample()


def test_render_is_pure_and_finite() -> None:
    registry = Registry(executor=None, bus=EventBus())
    registry.add_device("cd", "cd0", None)
    sample = MetricsSource(registry, DaemonStats()).sample_now()
    first, second = render(sample), render(sample)
    assert first == second
    assert all(math.isfinite(s.value) for m in first for s in m.samples)


def test_the_endpoint_answers_503_when_the_loop_does_not_answer() -> None:
    loop = asyncio.new_event_loop()  # never run: the sample never comes
    server = MetricsServer(BlockdCollector(
        MetricsSource(Registry(executor=None, bus=EventBus()), DaemonStats()), loop,
        timeout=0.05))
    server.start("127.0.0.1", 0)
    try:
        assert server.url.startswith("http://127.0.0.1:") and server.address[1] > 0
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(server.url, timeout=10)
        assert info.value.code == 503
        assert b"did not hand over the statistics" in info.value.read()
    finally:
        server.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
    server.close()  # twice is harmless
