#!/usr/bin/env python3
"""Metrics benchmark: what serving Prometheus metrics costs blockd.

(a) Scrape cost: blockd with many devices (1,000 null-co hard disks by default) and
    its /metrics endpoint scraped N times, plain and gzip: time per scrape (median,
    min, max), size of the exposition (plain and gzip) and blockd's CPU per scrape.
(b) Scrape load: NBD throughput of a tmpfs-backed export (fio's nbd engine, 4 KiB
    random reads at QD32) with and without a 1 Hz scrape loop, in interleaved rounds
    (off/on, then on/off), on a blockd that also holds the many devices, so every
    scrape renders all of them.  The table shows the per-round on/off ratio.

Reuses bench/nbd_bench.py's peer, backing, client and statistics helpers.  Stdlib only.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbd_bench as nb

METRICS_LINE = re.compile(r"metrics on (http://\S+/metrics)")
# Loopback only: never through an HTTP proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _log(msg: str) -> None:
    print(f"[metrics_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# blockd with many devices and metrics on
# --------------------------------------------------------------------------------------


def devices_toml(count: int, size: int = nb.GiB) -> str:
    """A --config file with ``count`` null-co nodes (nullK), each under a device hdK."""
    parts = [f"# metrics_bench: {count} null-co devices\n"]
    for i in range(count):
        parts.append(f'[[blockdev]]\ndriver = "null-co"\nnode-name = "null{i}"\nsize = {size}\n'
                     f'\n[[device]]\ndriver = "hd"\nid = "hd{i}"\ndrive = "null{i}"\n\n')
    return "".join(parts)


class MetricsPeer(nb.Peer):
    """nbd_bench's blockd peer (node n0 exported as e0), plus extra devices from a
    --config file and metrics on a free loopback port."""

    def __init__(self, blockdev: str, workdir: Path, tag: str, devices: int) -> None:
        argv, env = nb.builtin_peer("blockd") or ((), {})
        super().__init__(nb.PeerSpec("blockd", "blockd", argv, env), blockdev, workdir, tag)
        self.devices = devices
        if devices:
            config = workdir / f"{tag}-devices.toml"
            config.write_text(devices_toml(devices))
            self.argv += ["--config", str(config)]
        self.argv += ["--metrics", "127.0.0.1:0"]
        self.metrics_url = ""

    def start(self, timeout: float = 120) -> None:
        super().start(timeout)
        deadline = time.monotonic() + 10
        while not (m := METRICS_LINE.search(self.log_tail(100_000))):
            self.check_alive()
            if time.monotonic() > deadline:
                raise nb.BenchError(f"blockd printed no 'metrics on' line:\n{self.log_tail()}")
            time.sleep(0.02)
        self.metrics_url = m.group(1)
        _log(f"blockd with {self.devices} extra devices ready, metrics on "
             f"{self.metrics_url}")


# --------------------------------------------------------------------------------------
# Scraping
# --------------------------------------------------------------------------------------


@dataclass
class Scrape:
    seconds: float  # request sent to last byte received
    wire_bytes: int  # body as sent (gzip-compressed if the server compressed it)
    plain_bytes: int
    gzip_served: bool
    body: bytes = field(repr=False, default=b"")


def scrape(url: str, accept_gzip: bool, timeout: float = 30) -> Scrape:
    """GET the exposition as Prometheus does (it sends Accept-Encoding: gzip)."""
    headers = {"Accept-Encoding": "gzip"} if accept_gzip else {}
    req = urllib.request.Request(url, headers=headers)
    t0 = time.perf_counter()
    with _opener.open(req, timeout=timeout) as r:
        data = r.read()
        encoding = r.headers.get("Content-Encoding", "")
    secs = time.perf_counter() - t0
    served = encoding == "gzip"
    plain = gzip.decompress(data) if served else data
    return Scrape(secs, len(data), len(plain), served, plain)


def exposition_summary(body: bytes) -> dict[str, float]:
    """Sample count and the values of a few daemon gauges from a text exposition."""
    samples = 0
    found: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        if not line or line.startswith("#"):
            continue
        samples += 1
        name, _, rest = line.partition(" ")
        if name in ("blockd_devices", "blockd_nbd_exports"):
            found[name] = float(rest.split()[0])
    return {"samples": samples, **found}


class ScrapeLoop:
    """Scrape ``url`` every ``interval`` seconds in a thread (gzip, like Prometheus)."""

    def __init__(self, url: str, interval: float) -> None:
        self.url = url
        self.interval = interval
        self.times: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scrape-loop", daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.times.append(scrape(self.url, True).seconds)
            except OSError as err:
                self.errors.append(repr(err))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> ScrapeLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


# --------------------------------------------------------------------------------------
# (a) scrape cost
# --------------------------------------------------------------------------------------


@dataclass
class ScrapeResult:
    devices: int  # blockd_devices as scraped
    samples: int
    plain_bytes: int
    gzip_bytes: int  # as served with Accept-Encoding: gzip
    gzip_served: bool
    plain_s: list[float]
    gzip_s: list[float]
    server_cpu_s_per_scrape: float | None
    startup_s: float


def measure_scrapes(peer: MetricsPeer, count: int, startup_s: float) -> ScrapeResult:
    for _ in range(3):  # warm-up: first renders, connection setup paths
        scrape(peer.metrics_url, True)
    plain_s: list[float] = []
    gzip_s: list[float] = []
    plain = zipped = None
    cpu0 = peer.cpu_seconds()
    for _ in range(count):  # interleaved, so drift hits both alike
        plain = scrape(peer.metrics_url, False)
        plain_s.append(plain.seconds)
        zipped = scrape(peer.metrics_url, True)
        gzip_s.append(zipped.seconds)
    cpu1 = peer.cpu_seconds()
    assert plain is not None and zipped is not None
    summary = exposition_summary(plain.body)
    gzip_bytes = zipped.wire_bytes if zipped.gzip_served else len(gzip.compress(plain.body, 6))
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / (2 * count)
    return ScrapeResult(int(summary.get("blockd_devices", -1)), int(summary["samples"]),
                        plain.plain_bytes, gzip_bytes, zipped.gzip_served, plain_s, gzip_s,
                        cpu, startup_s)


def ms(values: Sequence[float]) -> str:
    s = nb.spread(values)
    if s is None:
        return "-"
    return f"{s.median * 1e3:.1f} ({s.lo * 1e3:.1f}-{s.hi * 1e3:.1f})"


def size(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n >= 10 * 1024 else f"{n:,} B"


def format_scrape_table(results: Sequence[ScrapeResult]) -> str:
    head = ["devices", "samples", "plain", "gzip", "scrape ms plain", "scrape ms gzip",
            "blockd CPU ms/scrape", "startup s"]
    rows = [[str(r.devices), f"{r.samples:,}", size(r.plain_bytes),
             size(r.gzip_bytes) + ("" if r.gzip_served else " *"),
             ms(r.plain_s), ms(r.gzip_s),
             "-" if r.server_cpu_s_per_scrape is None
             else f"{r.server_cpu_s_per_scrape * 1e3:.1f}", f"{r.startup_s:.1f}"]
            for r in results]
    return _table(head, rows)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# (b) throughput with and without scraping
# --------------------------------------------------------------------------------------


@dataclass
class LoadSample:
    round: int
    scraping: bool
    iops: float
    mbps: float
    seconds: float
    server_cpu_s: float | None
    scrapes: int
    scrape_s: list[float]
    scrape_errors: list[str]


def run_workload(peer: MetricsPeer, wl: nb.Workload, param: float, size_bytes: int,
                 workdir: Path) -> nb.Result:
    peer.check_alive()
    if wl.tool == "fio":
        return nb.run_fio(peer.uri, wl, param, size_bytes, workdir)
    return nb.run_qemu_img(peer.uri, wl, int(param), size_bytes)


def calibrate(peer: MetricsPeer, wl: nb.Workload, target_s: float, size_bytes: int,
              workdir: Path) -> float:
    """fio: a 1 s warm-up, then time-based runs; qemu-img: a count for about target_s."""
    if wl.tool == "fio":
        run_workload(peer, wl, min(1.0, target_s), size_bytes, workdir)
        return target_s
    count = float(wl.start_count)
    for _ in range(8):
        res = run_workload(peer, wl, count, size_bytes, workdir)
        if res.seconds >= 0.3:
            break
        count *= min(10.0, 0.5 / res.seconds)
    return float(max(100, round(count * target_s / res.seconds)))


def measure_load(peer: MetricsPeer, wl: nb.Workload, rounds: int, target_s: float,
                 interval: float, size_bytes: int, workdir: Path) -> list[LoadSample]:
    param = calibrate(peer, wl, target_s, size_bytes, workdir)
    _log(f"load: {wl.key}, {'runtime (s)' if wl.tool == 'fio' else 'count'} {param:g}")
    samples: list[LoadSample] = []
    for rnd in range(rounds):
        order = (False, True) if rnd % 2 == 0 else (True, False)
        for scraping in order:
            cpu0 = peer.cpu_seconds()
            loop = ScrapeLoop(peer.metrics_url, interval)
            with loop if scraping else contextlib.nullcontext():
                res = run_workload(peer, wl, param, size_bytes, workdir)
            cpu1 = peer.cpu_seconds()
            cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
            s = LoadSample(rnd, scraping, res.iops or 0.0, res.mbps, res.seconds, cpu,
                           len(loop.times), loop.times, loop.errors)
            samples.append(s)
            _log(f"round {rnd + 1}/{rounds} scrape {'on ' if scraping else 'off'}: "
                 f"{nb.fmt_quantity(s.iops, 'IOPS')} IOPS in {res.seconds:.2f} s"
                 + (f", {s.scrapes} scrapes, median {ms(s.scrape_s)} ms"
                    if scraping else ""))
    return samples


def format_load_table(samples: Sequence[LoadSample], rounds: int, label: str,
                      interval: float) -> str:
    off: list[float | None] = [None] * rounds
    on: list[float | None] = [None] * rounds
    for s in samples:
        (on if s.scraping else off)[s.round] = s.iops
    ratio = nb.spread(nb.round_ratios(on, off))
    cpu_off = [s.server_cpu_s / s.seconds for s in samples
               if not s.scraping and s.server_cpu_s is not None]
    cpu_on = [s.server_cpu_s / s.seconds for s in samples
              if s.scraping and s.server_cpu_s is not None]
    scrape_s = [t for s in samples for t in s.scrape_s]
    errors = sum(len(s.scrape_errors) for s in samples)
    head = ["workload", "no scrapes", f"scrapes every {interval:g} s", "on/off",
            "blockd CPU off/on",
            "scrape ms under load"]
    row = [label, nb.fmt_spread(nb.spread(off), "IOPS"), nb.fmt_spread(nb.spread(on), "IOPS"),
           nb.fmt_spread(ratio, "ratio"),
           f"{_mean(cpu_off):.2f}/{_mean(cpu_on):.2f}" if cpu_off and cpu_on else "-",
           ms(scrape_s) + (f", {errors} failed" if errors else "")]
    return _table(head, [row])


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--devices", default="1000",
                    help="comma-separated extra null-co device counts for (a); the largest "
                         "is also used for (b) (default 1000)")
    ap.add_argument("--scrapes", type=int, default=30,
                    help="scrapes of each kind (plain, gzip) per device count (default 30)")
    ap.add_argument("--workload", default="fio-rr4k-qd32",
                    choices=["fio-rr4k-qd32", "rr4k-qd32", "fio-rr4k-qd1", "rr4k-qd1"],
                    help="NBD workload for (b) (nbd_bench.py's keys; default fio-rr4k-qd32)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="(b): rounds, each one run without and one with scraping "
                         "(default 5)")
    ap.add_argument("--seconds", type=float, default=5.0,
                    help="(b): length of one run (default 5)")
    ap.add_argument("--interval", type=float, default=1.0,
                    help="(b): seconds between scrapes (default 1)")
    ap.add_argument("--size-mib", type=int, default=1024,
                    help="(b): tmpfs backing size in MiB, a power of two (default 1024)")
    ap.add_argument("--skip", choices=["scrape", "load"], action="append", default=[],
                    help="leave out part (a) 'scrape' or part (b) 'load'")
    ap.add_argument("--quick", action="store_true",
                    help="10 scrapes, 3 rounds of 2 s, 256 MiB: a smoke test")
    ap.add_argument("--json", metavar="FILE", help="write options, samples and results")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.quick:
        ns.scrapes, ns.rounds, ns.seconds, ns.size_mib = 10, 3, 2.0, 256
    try:
        counts = [int(c) for c in ns.devices.split(",") if c]
    except ValueError:
        print(f"metrics_bench: bad --devices {ns.devices!r}", file=sys.stderr)
        return 2
    size_mib = ns.size_mib
    if not counts or min(counts) < 0 or size_mib < 16 or size_mib & (size_mib - 1):
        print("metrics_bench: --devices needs counts >= 0, --size-mib a power of two >= 16",
              file=sys.stderr)
        return 2
    wl = nb.WORKLOADS[ns.workload]
    missing = [t for t in (wl.tool,) if "load" not in ns.skip and shutil.which(t) is None]
    if missing:
        print(f"metrics_bench: missing {', '.join(missing)} (Debian: fio, qemu-utils)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, nb._raise_interrupt)
    signal.signal(signal.SIGHUP, nb._raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="metrics-bench-"))
    scrape_results: list[ScrapeResult] = []
    load_samples: list[LoadSample] = []
    failed: str | None = None
    size_bytes = size_mib * nb.MiB
    started = time.time()
    try:
        if "scrape" not in ns.skip:
            for count in counts:
                with contextlib.ExitStack() as stack:
                    clean = nb.Shielded(stack)
                    peer = MetricsPeer(f"driver=null-co,size={nb.GiB}", workdir,
                                       f"scrape{count}", count)
                    clean.callback(peer.stop)
                    t0 = time.perf_counter()
                    peer.start()
                    startup = time.perf_counter() - t0
                    _log(f"scrape: {count} devices, {ns.scrapes} scrapes plain and gzip")
                    scrape_results.append(measure_scrapes(peer, ns.scrapes, startup))
        if "load" not in ns.skip:
            with contextlib.ExitStack() as stack:
                blockdev = stack.enter_context(nb.backing("tmpfs", size_bytes))
                clean = nb.Shielded(stack)
                peer = MetricsPeer(blockdev, workdir, "load", max(counts))
                clean.callback(peer.stop)
                peer.start()
                load_samples = measure_load(peer, wl, ns.rounds, ns.seconds, ns.interval,
                                            size_bytes, workdir)
    except nb.BenchError as err:
        failed = str(err)
        print(f"metrics_bench: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = "interrupted"
        print("metrics_bench: interrupted; cleaned up", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    if scrape_results:
        print(f"\n(a) GET /metrics, {ns.scrapes} scrapes each plain and gzip, interleaved; "
              "ms = median (min-max), client side; devices = blockd_devices "
              "(the extra null-co devices + the export's)\n")
        print(format_scrape_table(scrape_results))
        if any(not r.gzip_served for r in scrape_results):
            print("* the server did not compress; gzip size is the body compressed here")
    if load_samples:
        print(f"\n(b) {wl.label} on a {size_mib} MiB tmpfs file, blockd holding "
              f"{max(counts) + 1} devices, {ns.rounds} rounds of ~{ns.seconds:g} s; "
              f"scrapes every {ns.interval:g} s with gzip; IOPS median (min-max); on/off = "
              "per-round ratios; CPU in cores\n")
        print(format_load_table(load_samples, ns.rounds, wl.key, ns.interval))
    if ns.json:
        doc = {
            "started": started, "finished": time.time(), "failed": failed,
            "options": vars(ns),
            "environment": {"python": sys.version, "nproc": os.cpu_count(),
                            "fio": nb._version(["fio", "--version"]),
                            "uvloop": nb._module_version("uvloop")},
            "scrape": [asdict(r) for r in scrape_results],
            "load": [asdict(s) for s in load_samples],
        }
        Path(ns.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
