"""A real Prometheus server scraping a live blockd with contrib/'s configuration and rules.

One Prometheus (scrape and rule evaluation every second, storage in a temporary
directory, a free loopback port) is started per module with a configuration derived
from contrib/prometheus.yml, pointed at a blockd that exports a disk image, a CD and two
more disks over NBD.  qemu-io and qemu-img move real data through the exports; a file
size limit on blockd then makes the kernel fail writes past 8 MiB (EFBIG), which one
disk reports (werror=report) and the other stops on (werror=stop).  Every query of
contrib/grafana-dashboard.json returns data through Prometheus's HTTP API, the counters
Prometheus stored equal query-blockstats, the rule groups of contrib/blockd-alerts.yml
are loaded and healthy, and exactly the alerts for the failed writes and the stopped
device are active.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from daemons import DaemonProcess, blockd_argv, start_daemon
from nbdclients import need, uri
from prometheus_support import (
    ALERT_RULES,
    ALL_SELECTED,
    PrometheusServer,
    Query,
    dashboard_queries,
    derived_config,
    load_dashboard,
    metric_names,
    need_tool,
    parse_label_values,
    substitute,
    values,
)
from qemu.qmp import ExecuteError, QMPClient

MiB = 1 << 20
QUERIES = dashboard_queries()


def qmp_execute(sock: str, *commands: tuple[str, dict[str, Any]]) -> list[Any]:
    """Run QMP commands in one session; an error reply is returned, not raised."""
    async def run() -> list[Any]:
        qmp = QMPClient("prometheus-test")
        await qmp.connect(sock)
        try:
            replies: list[Any] = []
            for name, args in commands:
                try:
                    replies.append(await qmp.execute(name, args))
                except ExecuteError as err:
                    replies.append(err)
            return replies
        finally:
            await qmp.disconnect()
    return asyncio.run(run())


def blockstats(sock: str) -> dict[str, dict[str, Any]]:
    (entries,) = qmp_execute(sock, ("query-blockstats", {}))
    return {e["device"]: e["stats"] for e in entries}


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@dataclass
class Setup:
    blockd: DaemonProcess
    metrics_url: str
    qmp: str
    nbd: str
    prometheus: PrometheusServer
    stats: dict[str, dict[str, Any]]  # query-blockstats once all I/O was done


def io_status(sock: str, device: str) -> str:
    (blocks,) = qmp_execute(sock, ("query-block", {}))
    return next(str(b.get("io-status", "ok")) for b in blocks if b["device"] == device)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    need_tool("prometheus")
    need("qemu-io", "qemu-img")
    tmp = tmp_path_factory.mktemp("prometheus")
    images = {name: tmp / f"{name}.img" for name in ("disk", "bad", "stop")}
    for image in images.values():
        with open(image, "wb") as f:
            f.truncate(16 * MiB)
    cd = tmp / "cd.iso"
    cd.write_bytes(os.urandom(4 * MiB))
    qmp, nbd = str(tmp / "qmp.sock"), str(tmp / "nbd.sock")
    # e0: a disk image (implicit device e0); e1: a CD (device cd0); e2, e3: disks whose
    # writes will fail (hd1, werror=report) and stop their device (hd2, werror=stop).
    d = start_daemon(blockd_argv(
        "--qmp", qmp,
        "--blockdev", f"driver=file,node-name=f0,filename={images['disk']},discard=unmap",
        "--blockdev", f"driver=file,node-name=iso0,filename={cd},read-only=on",
        "--blockdev", f"driver=file,node-name=f1,filename={images['bad']}",
        "--blockdev", f"driver=file,node-name=f2,filename={images['stop']}",
        "--device", "cd,id=cd0,drive=iso0",
        "--device", "hd,id=hd1,drive=f1,werror=report",
        "--device", "hd,id=hd2,drive=f2,werror=stop",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on",
        "--export", "type=nbd,id=e1,node-name=iso0,name=cd",
        "--export", "type=nbd,id=e2,node-name=f1,name=bad,writable=on",
        "--export", "type=nbd,id=e3,node-name=f2,name=stop,writable=on",
        metrics="127.0.0.1:0"), tmp, "blockd")
    prom: PrometheusServer | None = None
    held: subprocess.Popen[str] | None = None
    try:
        url = d.metrics_url
        m = re.fullmatch(r"http://([^/]+)(/.*)", url)
        assert m is not None, url
        promdir = tmp / "prometheus"
        promdir.mkdir()
        prom = PrometheusServer(derived_config(m.group(1), m.group(2), ALERT_RULES), promdir)
        prom.start()
        # A first sample of every device before any I/O, so that rates see the I/O.
        prom.wait_for('up{job="blockd"} == 1')
        prom.wait_for("count(blockd_device_failed_operations_total) == 16",
                      what="the first scrape of the 4 devices")

        io = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush",
                 "-c", "read -P 0x5a 0 1M", "-c", "discard 1M 1M",
                 "-c", "write -z 2M 64k", uri(nbd, "disk"))
        assert io.returncode == 0 and "failed" not in io.stdout, io
        bench = run("qemu-img", "bench", "-f", "raw", "-c", "2000", "-d", "32", "-s", "4096",
                    uri(nbd, "disk"))
        assert bench.returncode == 0, bench
        cd_read = run("qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", uri(nbd, "cd"))
        assert cd_read.returncode == 0 and "failed" not in cd_read.stdout, cd_read

        # Real write errors: a file size limit on blockd (soft, so it can be lifted
        # again) makes the kernel fail writes past 8 MiB with EFBIG (Python ignores
        # SIGXFSZ).  hd1 reports them; hd2 stops and holds the request.
        hard = resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (8 * MiB, hard))
        bad = run("qemu-io", "-f", "raw", "-c", "write 12M 64k", "-c", "write 13M 4k",
                  uri(nbd, "bad"))
        assert bad.stdout.count("write failed") == 2, bad  # (NBD has no EFBIG: ENOSPC)
        held = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write 12M 4k",
                                 uri(nbd, "stop")], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 10
        while io_status(qmp, "hd2") != "failed":
            assert time.monotonic() < deadline and held.poll() is None, "hd2 did not stop"
            time.sleep(0.05)
        replies = qmp_execute(qmp, ("device_del", {"id": "no-such-device"}))
        assert isinstance(replies[0], ExecuteError), replies
        stats = blockstats(qmp)
        assert stats["hd1"]["failed_wr_operations"] == 2, stats["hd1"]
        yield Setup(d, url, qmp, nbd, prom, stats)
        # Lift the limit and resume hd2: its held write completes.
        resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (hard, hard))
        qmp_execute(qmp, ("cont", {}))
        out, _ = held.communicate(timeout=20)
        assert held.returncode == 0 and "failed" not in out, out
    finally:
        if held is not None and held.poll() is None:
            held.kill()
            held.wait()
        if prom is not None:
            prom.stop()
        code = d.stop()
    assert code == 0, f"blockd exited {code}:\n{d.stderr()}"


def test_prometheus_scrapes_blockd_with_contrib_config(setup: Setup) -> None:
    targets = setup.prometheus.api("targets")["activeTargets"]
    assert [(t["labels"]["job"], t["scrapeUrl"], t["health"]) for t in targets] == [
        ("blockd", setup.metrics_url, "up")]
    config = setup.prometheus.api("status/config")["yaml"]
    assert "job_name: blockd" in config and str(ALERT_RULES) in config


def test_rule_groups_loaded_and_healthy(setup: Setup) -> None:
    deadline = time.monotonic() + 15
    while True:
        groups = setup.prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r["health"] == "ok" for r in rules):
            break
        assert time.monotonic() < deadline, groups
        time.sleep(0.1)
    assert {g["name"]: g["file"] for g in groups} == {
        "blockd-daemon": str(ALERT_RULES), "blockd-devices": str(ALERT_RULES)}
    assert {r["name"] for r in rules} == {
        "BlockdDown", "BlockdDeviceIOStatusNotOk", "BlockdDeviceTrayOpenWhileExported",
        "BlockdDeviceIOErrors", "BlockdDeviceHighIOErrorRatio"}
    assert all(r["type"] == "alerting" and not r.get("lastError") for r in rules)


def export_info_or_skip(prom: PrometheusServer) -> list[dict[str, Any]]:
    exports = prom.query("blockd_nbd_export_info")
    if not exports:
        pytest.skip("blockd does not export blockd_nbd_export_info{export,name,device,node,"
                    "writable} yet (BlockdDeviceTrayOpenWhileExported needs it)")
    return exports


def test_alert_expressions_and_their_series(setup: Setup) -> None:
    """Every rule's expression evaluates, and every series it uses has data."""
    prom = setup.prometheus
    missing = []
    for group in prom.api("rules")["groups"]:
        for rule in group["rules"]:
            prom.query(rule["query"])  # raises on a bad expression
            for name in metric_names(rule["query"]):
                selector = 'up{job="blockd"}' if name == "up" else name
                if not prom.query(selector):
                    missing.append(f"{rule['name']}: {name}")
    if missing and all(m.endswith(": blockd_nbd_export_info") for m in missing):
        export_info_or_skip(prom)
    assert not missing


def test_alerts_for_failed_writes_and_stopped_device(setup: Setup) -> None:
    """hd1's failed writes raise both error alerts, hd2's stop the I/O status alert."""
    wanted = {("BlockdDeviceIOStatusNotOk", "hd2"), ("BlockdDeviceIOErrors", "hd1"),
              ("BlockdDeviceHighIOErrorRatio", "hd1")}
    deadline = time.monotonic() + 20
    while True:
        alerts = setup.prometheus.api("alerts")["alerts"]
        active = {(a["labels"]["alertname"], a["labels"].get("device")): a for a in alerts}
        if wanted <= set(active):
            break
        assert time.monotonic() < deadline, alerts
        time.sleep(0.1)
    assert set(active) == wanted  # nothing about the other devices; blockd is up
    for (_, device), a in active.items():
        assert a["state"] in ("pending", "firing") and a["labels"]["job"] == "blockd"
        assert device in a["annotations"]["summary"], a
        assert device in a["annotations"]["description"], a
    assert active[("BlockdDeviceIOErrors", "hd1")]["labels"]["operation"] == "write"
    assert active[("BlockdDeviceIOStatusNotOk", "hd2")]["labels"][
        "blockd_device_io_status"] == "failed"
    assert active[("BlockdDeviceHighIOErrorRatio", "hd1")]["labels"]["severity"] == "critical"


@pytest.mark.parametrize("query", QUERIES, ids=[q.id for q in QUERIES])
def test_dashboard_query_returns_data(setup: Setup, query: Query) -> None:
    expr = substitute(query.expr, ALL_SELECTED)
    result = setup.prometheus.wait_for(expr, timeout=10, what=f"{query.id}: {expr}")
    if "by (le)" in expr:  # the heatmaps: a bucket per le, some of them non-zero
        assert "+Inf" in {s["metric"].get("le") for s in result}
        assert any(v > 0 for v in values(result)), result


def test_dashboard_variables_have_values(setup: Setup) -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    found = {}
    for name in ("job", "instance", "device"):
        selector, label = parse_label_values(variables[name]["definition"])
        result = setup.prometheus.query(substitute(selector, ALL_SELECTED))
        found[name] = {s["metric"][label] for s in result}
    host_port = re.fullmatch(r"http://([^/]+)/.*", setup.metrics_url)
    assert host_port is not None
    assert found == {"job": {"blockd"}, "instance": {host_port.group(1)},
                     "device": {"e0", "cd0", "hd1", "hd2"}}


def test_io_shows_in_prometheus_as_in_qmp(setup: Setup) -> None:
    """The counters Prometheus stored equal query-blockstats; the rates see the I/O."""
    prom, want = setup.prometheus, setup.stats
    pairs = {
        "read_bytes_total": "rd_bytes", "written_bytes_total": "wr_bytes",
        "discarded_bytes_total": "unmap_bytes", "reads_completed_total": "rd_operations",
        "writes_completed_total": "wr_operations", "flush_requests_total": "flush_operations",
        "discards_completed_total": "unmap_operations",
        'failed_operations_total{operation="write"}': "failed_wr_operations",
        'failed_operations_total{operation="read"}': "failed_rd_operations",
        # Failed requests have a latency too (account_failed, on by default).
        "read_latency_seconds_count": "rd_operations+failed_rd_operations",
        "write_latency_seconds_count": "wr_operations+failed_wr_operations",
    }
    for device in want:
        for metric, keys in pairs.items():
            count = sum(want[device][key] for key in keys.split("+"))
            name, _, matcher = metric.partition("{")
            matchers = f'job="blockd", device="{device}"' + (
                f", {matcher.rstrip('}')}" if matcher else "")
            expr = f"blockd_device_{name}{{{matchers}}}"
            deadline = time.monotonic() + 10
            while values(prom.query(expr)) != [float(count)]:
                assert time.monotonic() < deadline, (expr, prom.query(expr), count)
                time.sleep(0.1)
    assert want["e0"]["rd_operations"] > 2000 and want["hd1"]["failed_wr_operations"] == 2
    for metric in ("read_bytes_total", "written_bytes_total", "discarded_bytes_total",
                   "flush_requests_total"):
        rate = values(prom.query(f'rate(blockd_device_{metric}{{device="e0"}}[1m])'))
        assert rate and rate[0] > 0, metric
    status = prom.query('blockd_device_io_status{device="hd2"} == 1')
    assert [s["metric"]["blockd_device_io_status"] for s in status] == ["failed"]
    assert values(prom.query('blockd_device_tray_open{device="cd0"}')) == [0.0]
    commands = prom.query('blockd_qmp_commands_total{command="device_del"}')
    assert {s["metric"]["result"] for s in commands} == {"DeviceNotFound"}


def test_nbd_export_info_names_each_exports_device(setup: Setup) -> None:
    exports = export_info_or_skip(setup.prometheus)
    assert {(s["metric"]["export"], s["metric"]["device"]) for s in exports} == {
        ("e0", "e0"), ("e1", "cd0"), ("e2", "hd1"), ("e3", "hd2")}
    # The tray alert's join: a tray, closed, on an exported device.
    joined = setup.prometheus.query(
        'blockd_device_tray_open and on(instance, job, device) blockd_nbd_export_info')
    assert [s["metric"]["device"] for s in joined] == ["cd0"]
