"""The /metrics endpoint of a live blockd: promtool, content negotiation, real NBD I/O.

Every daemon here serves metrics on a free loopback port (``metrics="127.0.0.1:0"``)
and the test reads the URL blockd printed.  The numbers are checked against what the
clients did and against query-blockstats read at the same moment.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemons import ROOT, BlockdFactory, DaemonProcess, blockd_argv
from nbdclients import need, uri
from prometheus_client.parser import text_string_to_metric_families
from qemu.qmp import ExecuteError, QMPClient

MiB = 1 << 20
NS = 1e9
OPENMETRICS_ACCEPT = (  # what Prometheus 2.x sends
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
    "version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
ENV = dict(os.environ, PYTHONPATH=str(ROOT))

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(url: str, headers: dict[str, str] | None = None, method: str = "GET",
        timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP request (errors included)."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def parse(text: str) -> Samples:
    """Every sample of a text-format scrape; fails on malformed input or duplicates."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = s.value
    return samples


def scrape(d: DaemonProcess, timeout: float = 10) -> Samples:
    status, headers, body = get(d.metrics_url, timeout=timeout)
    assert status == 200, body
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body.decode())


def one(samples: Samples, name: str, **labels: str) -> float:
    found = [v for (n, lbls), v in samples.items()
             if n == name and all((k, v2) in lbls for k, v2 in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(lbls) for (n, lbls), _ in samples.items() if n == name]


def blockd_series(samples: Samples) -> Samples:
    """The blockd_* samples (not process_*)."""
    return {k: v for k, v in samples.items() if k[0].startswith("blockd_")}


def device_series(samples: Samples) -> Samples:
    """The per-device samples that only requests move (idle time moves by itself)."""
    return {k: v for k, v in samples.items()
            if k[0].startswith("blockd_device_") and k[0] != "blockd_device_idle_seconds"}


async def stats_of(qmp: QMPClient, device: str) -> dict[str, Any]:
    for entry in await qmp.execute("query-blockstats"):
        if entry["device"] == device:
            return entry["stats"]  # type: ignore[no-any-return]
    raise AssertionError(f"no stats for {device}")


def run(*cmd: str, timeout: float = 120) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{cmd}: {result.stdout}{result.stderr}"
    return result.stdout


def null_export(blockd_factory: BlockdFactory, tmp_path: Path, *extra: str,
                ) -> tuple[DaemonProcess, str]:
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory(
        "--blockdev", "driver=null-co,node-name=n0,size=1073741824,read-zeroes=on",
        "--blockdev", "driver=null-co,node-name=n1,size=1048576",
        "--device", "hd,id=hd1,drive=n1",
        "--device", "cd,id=cd0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=n0,name=null,writable=on",
        *extra, metrics="127.0.0.1:0")
    return d, sock


# -- the endpoint ------------------------------------------------------------------------


async def test_metrics_url_is_printed_and_the_helpers_turn_metrics_off(
    blockd_factory: BlockdFactory,
) -> None:
    quiet = blockd_factory()
    d = blockd_factory(metrics="127.0.0.1:0")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", d.metrics_url)
    assert "metrics on" not in quiet.stderr()
    samples = scrape(d)
    assert one(samples, "blockd_devices") == 0
    port = int(d.metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert d.stop() == 0, d.stderr()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the endpoint closed with the daemon


async def test_promtool_accepts_a_live_scrape(blockd_factory: BlockdFactory,
                                             tmp_path: Path) -> None:
    need("promtool")
    d, sock = null_export(blockd_factory, tmp_path)
    qmp = await d.client()
    await qmp.execute("block-latency-histogram-set",
                      {"id": "hd1", "boundaries": [10_000, 1_000_000], "boundaries-flush": []})
    with pytest.raises(ExecuteError):
        await qmp.execute("device_del", {"id": "nope"})
    if shutil.which("qemu-img"):
        await asyncio.to_thread(run, "qemu-img", "bench", "-f", "raw", "-c", "2000", "-d", "8",
                                "-s", "4096", "-w", uri(sock, "null"))
    status, _, body = await asyncio.to_thread(get, d.metrics_url)
    assert status == 200
    result = await asyncio.to_thread(
        subprocess.run, ["promtool", "check", "metrics"], input=body, capture_output=True,
        timeout=60, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""
    text = body.decode()
    for needle in ('blockd_device_write_latency_seconds_bucket{device="hd1",node="n1",'
                   'le="1e-05"}',
                   'blockd_device_flush_latency_seconds_bucket{device="hd1",node="n1",'
                   'le="+Inf"}',
                   "process_resident_memory_bytes", "blockd_build_info{"):
        assert needle in text, needle


async def test_content_negotiation_gzip_and_paths(blockd_factory: BlockdFactory,
                                                 tmp_path: Path) -> None:
    d, _ = null_export(blockd_factory, tmp_path)
    url = d.metrics_url
    status, headers, plain = await asyncio.to_thread(get, url)
    assert status == 200 and "Content-Encoding" not in headers
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# EOF" not in plain

    status, headers, body = await asyncio.to_thread(get, url, {"Accept": OPENMETRICS_ACCEPT})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "# UNIT blockd_device_read_bytes bytes" in text.splitlines()
    assert "# TYPE blockd_device_io_status stateset" in text.splitlines()
    assert 'blockd_device_io_status{device="e0",node="n0",blockd_device_io_status="ok"} 1' \
        in text.splitlines()

    status, headers, body = await asyncio.to_thread(get, url, {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    unzipped = gzip.decompress(body).decode()
    assert set(blockd_series(parse(unzipped))) == set(blockd_series(parse(plain.decode())))

    status, headers, body = await asyncio.to_thread(
        get, url, {"Accept": OPENMETRICS_ACCEPT, "Accept-Encoding": "deflate, gzip;q=0.9"})
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).decode().endswith("# EOF\n")

    base = url.removesuffix("/metrics")
    status, headers, body = await asyncio.to_thread(get, base + "/")
    assert status == 200 and b'href="/metrics"' in body
    for path in ("/nope", "/metrics/extra", "/favicon.ico"):
        status, _, _ = await asyncio.to_thread(get, base + path)
        assert status == 404, path
    status, _, _ = await asyncio.to_thread(get, url, method="POST")
    assert status == 405


# -- numbers against real I/O ---------------------------------------------------------------


async def test_nbd_io_counters_equal_the_work_and_query_blockstats(
    blockd_factory: BlockdFactory, tmp_path: Path, loop_device: Any,
) -> None:
    need("qemu-img")
    loop = loop_device(64 * MiB)
    sock = str(tmp_path / "nbd.sock")
    d = blockd_factory(
        "--blockdev", f"driver=host_device,node-name=disk,filename={loop.path}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e0,node-name=disk,name=disk,writable=on",
        metrics="127.0.0.1:0")
    target = uri(sock, "disk")
    writes, write_size = 1000, 4096
    reads, read_size = 300, 65536
    await asyncio.to_thread(run, "qemu-img", "bench", "-f", "raw", "-w", "-c", str(writes),
                            "-d", "4", "-s", str(write_size), target)
    await asyncio.to_thread(run, "qemu-img", "bench", "-f", "raw", "-c", str(reads),
                            "-d", "4", "-s", str(read_size), target)
    qmp = await d.client()
    # The I/O has stopped: a scrape, query-blockstats, another scrape agree.
    first = await asyncio.to_thread(scrape, d)
    stats = await stats_of(qmp, "e0")
    second = await asyncio.to_thread(scrape, d)
    assert device_series(first) == device_series(second)
    dev = {"device": "e0", "node": "disk"}

    def m(name: str, **labels: str) -> float:
        return one(second, name, **dev, **labels)

    # What the clients did ...
    assert m("blockd_device_written_bytes_total") == writes * write_size
    assert m("blockd_device_writes_completed_total") == writes
    assert m("blockd_device_read_bytes_total") == reads * read_size
    assert m("blockd_device_reads_completed_total") == reads
    assert m("blockd_device_write_highest_offset_bytes") == writes * write_size
    # ... and what query-blockstats says, field by field.
    assert m("blockd_device_read_bytes_total") == stats["rd_bytes"]
    assert m("blockd_device_written_bytes_total") == stats["wr_bytes"]
    assert m("blockd_device_discarded_bytes_total") == stats["unmap_bytes"]
    assert m("blockd_device_reads_completed_total") == stats["rd_operations"]
    assert m("blockd_device_writes_completed_total") == stats["wr_operations"]
    assert m("blockd_device_flush_requests_total") == stats["flush_operations"]
    assert m("blockd_device_discards_completed_total") == stats["unmap_operations"]
    assert m("blockd_device_write_highest_offset_bytes") == stats["wr_highest_offset"]
    for op, field in (("read", "rd"), ("write", "wr"), ("flush", "flush"), ("discard", "unmap")):
        assert m("blockd_device_failed_operations_total", operation=op) == \
            stats[f"failed_{field}_operations"]
        assert m("blockd_device_invalid_operations_total", operation=op) == \
            stats[f"invalid_{field}_operations"]
        assert m(f"blockd_device_{op}_time_seconds_total") == stats[f"{field}_total_time_ns"] / NS
    assert stats["rd_total_time_ns"] > 0 and stats["wr_total_time_ns"] > 0
    # The histograms count every completed request, their sums are the total times.
    for op, field, count in (("read", "rd", reads), ("write", "wr", writes)):
        name = f"blockd_device_{op}_latency_seconds"
        assert m(f"{name}_count") == count == m(f"{name}_bucket", le="+Inf")
        assert m(f"{name}_sum") == stats[f"{field}_total_time_ns"] / NS
        counts = [v for (n, lbls), v in second.items()
                  if n == f"{name}_bucket" and ("device", "e0") in lbls]
        assert len(counts) == 18 and max(counts) == count
    assert m("blockd_device_io_now") == 0
    assert m("blockd_device_size_bytes") == 64 * MiB
    assert m("blockd_device_medium_inserted") == 1
    assert "idle_time_ns" in stats and m("blockd_device_idle_seconds") > 0
    info = series(second, "blockd_device_info")
    assert info == [dict(dev, driver="host_device", filename=loop.path, serial="", vendor="",
                         product="", revision="", wwn="")]
    assert one(second, "blockd_nbd_exports") == 1
    assert one(second, "blockd_nbd_connections") == 0
    assert one(second, "blockd_nbd_connections_accepted_total") == 2


async def test_qmp_commands_are_counted_with_their_error_class(
    blockd_factory: BlockdFactory,
) -> None:
    d = blockd_factory(metrics="127.0.0.1:0")
    qmp = await d.client()
    await qmp.execute("query-block")
    await qmp.execute("query-block")
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("device_del", {"id": "nope"})
    assert info.value.error_class == "DeviceNotFound"
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("query-block", {"bogus": 1})
    assert info.value.error_class == "GenericError"
    with pytest.raises(ExecuteError):
        await qmp.execute("blockdev-del", {"node-name": "absent"})
    samples = await asyncio.to_thread(scrape, d)
    name = "blockd_qmp_commands_total"
    assert one(samples, name, command="query-block", result="success") == 2
    assert one(samples, name, command="query-block", result="GenericError") == 1
    assert one(samples, name, command="device_del", result="DeviceNotFound") == 1
    assert one(samples, name, command="blockdev-del", result="GenericError") == 1
    assert one(samples, "blockd_qmp_sessions") == 1
    assert one(samples, "blockd_qmp_sessions_accepted_total") == 1
    second = await d.client("second")
    await second.disconnect()
    d.clients.remove(second)
    samples = await asyncio.to_thread(scrape, d)
    assert one(samples, "blockd_qmp_sessions_accepted_total") == 2
    assert one(samples, "blockd_qmp_sessions") == 1
    assert {s["action"]: one(samples, "blockd_hotplug_events_total", **s)
            for s in series(samples, "blockd_hotplug_events_total")} == \
        {"add": 0, "remove": 0, "change": 0}


@pytest.fixture
def clients() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def test_scrape_while_32_nbd_clients_hammer_an_export(
    blockd_factory: BlockdFactory, tmp_path: Path, clients: list[subprocess.Popen[bytes]],
) -> None:
    need("qemu-img")
    d, sock = null_export(blockd_factory, tmp_path)
    for i in range(32):
        write = ["-w"] if i % 2 else []
        clients.append(subprocess.Popen(
            ["qemu-img", "bench", "-f", "raw", "-c", "100000000", "-d", "4", "-s", "4096",
             *write, uri(sock, "null")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 60
    while True:
        samples = await asyncio.to_thread(scrape, d)
        if one(samples, "blockd_nbd_connections") == 32:
            break
        assert all(p.poll() is None for p in clients), "a client exited early"
        assert time.monotonic() < deadline, "the clients did not all connect"
        await asyncio.sleep(0.2)
    dev = {"device": "e0", "node": "n0"}
    before = one(samples, "blockd_device_reads_completed_total", **dev)
    for _ in range(5):
        samples = await asyncio.to_thread(scrape, d, 10)  # parsed: well-formed
        assert one(samples, "blockd_nbd_connections") == 32
        assert one(samples, "blockd_devices") == 3
        assert one(samples, "blockd_device_io_now", **dev) >= 0
        assert one(samples, "blockd_device_read_latency_seconds_count", **dev) >= \
            one(samples, "blockd_device_reads_completed_total", **dev)
    assert one(samples, "blockd_device_reads_completed_total", **dev) > before
    assert one(samples, "blockd_device_writes_completed_total", **dev) > 0
    assert all(p.poll() is None for p in clients)


async def test_a_thousand_devices_are_all_scraped(blockd_factory: BlockdFactory,
                                                 tmp_path: Path) -> None:
    count = 1000
    config = tmp_path / "many.toml"
    with open(config, "w") as f:
        for i in range(count):
            f.write(f'[[blockdev]]\ndriver = "null-co"\nnode-name = "n{i}"\nsize = 1048576\n\n'
                    f'[[device]]\ndriver = "hd"\nid = "d{i}"\ndrive = "n{i}"\n\n')
    d = blockd_factory("--config", str(config), metrics="127.0.0.1:0")
    samples = await asyncio.to_thread(scrape, d, 60)
    assert one(samples, "blockd_devices") == count
    for name in ("blockd_device_read_bytes_total", "blockd_device_info",
                 "blockd_device_size_bytes"):
        found = series(samples, name)
        assert sorted(s["device"] for s in found) == sorted(f"d{i}" for i in range(count))
        assert all(s["node"] == "n" + s["device"][1:] for s in found)
    assert len(series(samples, "blockd_device_write_latency_seconds_bucket")) == count * 18


# -- start-up --------------------------------------------------------------------------------


def test_a_busy_port_is_a_clear_startup_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            blockd_argv("--qmp", str(tmp_path / "q.sock"), metrics=f"127.0.0.1:{port}"),
            capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=30, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"blockd: cannot serve metrics on 127.0.0.1:{port}: Address already in use "
        "(choose another address with --metrics HOST:PORT, or --metrics none)"]
    assert not (tmp_path / "q.sock").exists()


def test_help_documents_metrics(tmp_path: Path) -> None:
    result = subprocess.run(blockd_argv("--help"), capture_output=True, text=True, env=ENV,
                            cwd=tmp_path, timeout=30, check=False)
    assert result.returncode == 0
    assert "--metrics <host>:<port> | none" in result.stdout


async def test_embedded_default_serves_metrics_on_9580(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as blockd binds
        try:
            probe.bind(("127.0.0.1", 9580))
        except OSError:
            pytest.skip("port 9580 is in use on this machine")
    proc = subprocess.Popen([sys.executable, "-m", "blockd"], stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=ENV)
    try:
        assert proc.stderr is not None
        lines = []
        while not any(line.startswith("blockd: metrics on") for line in lines):
            line = await asyncio.wait_for(asyncio.to_thread(proc.stderr.readline), 20)
            assert line, lines
            lines.append(line)
        assert "blockd: metrics on http://127.0.0.1:9580/metrics\n" in lines
        status, _, body = await asyncio.to_thread(get, "http://127.0.0.1:9580/metrics")
        samples = parse(body.decode())
        assert status == 200
        assert sorted(s["device"] for s in series(samples, "blockd_device_info")) == \
            ["cd0", "hd0"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_idle_metrics_connections_cannot_exhaust_descriptors(
    blockd_factory: BlockdFactory,
) -> None:
    """200 idle connections to the metrics port (hardening issue, finding 3: each held a
    thread and a descriptor for ever, until NBD and QMP clients were locked out)."""
    from blockd.monitoring.http import MAX_CONNECTIONS

    d = blockd_factory(metrics="127.0.0.1:0")
    host, port = re.match(r"http://([\d.]+):(\d+)/", d.metrics_url).groups()  # type: ignore[union-attr]
    fds = Path(f"/proc/{d.proc.pid}/fd")
    before = len(os.listdir(fds))
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        await asyncio.sleep(1)
        held = len(os.listdir(fds)) - before
        assert held <= MAX_CONNECTIONS + 2, f"{held} descriptors held by idle connections"
        qmp = await d.client()
        assert "qemu" in await qmp.execute("query-version")  # type: ignore[operator]
    finally:
        for sock in idle:
            sock.close()
    await asyncio.sleep(0.5)  # the handlers see the idle connections end
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(d.metrics_url, timeout=10).read().decode())
    assert "blockd_build_info" in text
    assert len(os.listdir(fds)) <= before + 2
