#!/usr/bin/env python3
"""NBD benchmark: blockd against qemu-storage-daemon (or any peers), side by side.

Every peer is started with the same qemu-storage-daemon-style command line
(``--blockdev``, ``--nbd-server``, ``--export``, ``--pidfile``) on its own UNIX
socket, all peers are up at once, and each round runs every workload on every
peer back to back (peer order alternates between rounds), so drift on a noisy
VM hits all peers alike.  Ratios are taken within a round; the table shows
their median, min and max.  Beside IOPS and MB/s it reports each server's CPU time
(every thread and process, from /proc) per request and per MiB.  See bench/README.md and
/work/shared/notes/perf-baseline.md for the method.

Stdlib only; the clients are qemu-img bench, fio (nbd engine) and nbdcopy.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

import folio_sizes  # a sibling: the loop backing's page cache, logged after the pre-warm

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PEER = REPO_ROOT / "bench" / "reference_peer.py"
MiB = 1 << 20
GiB = 1 << 30
# qemu-img bench has no random mode: it adds the step to the offset modulo the
# image size.  An odd number of 4 KiB blocks walks every block of a power-of-two
# sized image once, in scattered order (perf-baseline §1).
STEP_BLOCKS = 40009

Metric = Literal["IOPS", "MB/s"]
# Server CPU (user + system, every thread of every process of the peer) per unit of work.
CpuUnit = Literal["us/req", "us/MiB"]
Tool = Literal["qemu-img", "fio", "nbdcopy"]

# --------------------------------------------------------------------------------------
# Statistics and the table (pure functions; tests/unit/test_bench_table.py)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Median, minimum and maximum of a set of samples."""

    median: float
    lo: float
    hi: float


def spread(values: Sequence[float | None]) -> Spread | None:
    """The median (min, max) of the values that are present; None if there are none."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return Spread(statistics.median(present), min(present), max(present))


def round_ratios(cand: Sequence[float | None], ref: Sequence[float | None]) -> list[float]:
    """Per-round ratios cand[i] / ref[i], for rounds where both have a positive value."""
    return [c / r for c, r in zip(cand, ref, strict=True)
            if c is not None and r is not None and r > 0]


def fmt_quantity(value: float, metric: str) -> str:
    """IOPS as 8,714 / 64.3k / 1.87M; MB/s with thousands separators; ratios as 1.52x;
    CPU microseconds with one decimal below 100 (14.2), else as integers (3,640)."""
    if metric in ("us/req", "us/MiB", "us"):
        return f"{value:.1f}" if value < 99.95 else f"{value:,.0f}"
    if metric == "cores":
        return f"{value:.2f}"
    if metric == "IOPS":
        if value >= 999_500:
            return f"{value / 1e6:.2f}M"
        if value >= 9_995:
            return f"{value / 1e3:.1f}k"
        return f"{value:,.0f}"
    if metric == "ratio":
        return f"{value:.2f}x"
    if value < 10:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt_spread(value: Spread | None, metric: str) -> str:
    """``median (min-max)``, or ``-`` when there is no value."""
    if value is None:
        return "-"
    return (f"{fmt_quantity(value.median, metric)} "
            f"({fmt_quantity(value.lo, metric)}-{fmt_quantity(value.hi, metric)})")


@dataclass(frozen=True)
class TableRow:
    """One line of the result table: a backing, a workload and its headline metric."""

    backing: str
    workload: str
    metric: Metric | CpuUnit
    values: Mapping[str, Spread | None]  # by peer label
    ratios: Mapping[str, Spread | None]  # by ratio label ("blockd/qsd")
    # The target ratio column's bound on the median ratio: a minimum for throughput
    # rows, a maximum for CPU rows (less CPU per request is better).
    target: float | None = None


def target_mark(ratio: Spread | None, target: float | None, at_most: bool = False) -> str:
    """``>=1.5x ok`` / ``>=1.5x MISS`` judged on the median ratio (``<=0.55x ...`` with
    ``at_most``); ``-`` without a target."""
    if target is None:
        return "-"
    sign = "<=" if at_most else ">="
    if ratio is None:
        return f"{sign}{target:g}x ?"
    met = ratio.median <= target if at_most else ratio.median >= target
    return f"{sign}{target:g}x {'ok' if met else 'MISS'}"


def format_table(rows: Sequence[TableRow], peers: Sequence[str], ratio_labels: Sequence[str],
                 target_ratio: str | None = None, at_most: bool = False) -> str:
    """A Markdown table, padded so it also reads well in a terminal.

    Columns: backing, workload, metric, each peer's median (min-max), each ratio's
    median (min-max) over rounds and, when ``target_ratio`` names one of the ratio
    columns, whether its median meets the row's target (a maximum with ``at_most``).
    """
    header = ["backing", "workload", "metric", *peers, *ratio_labels]
    if target_ratio is not None:
        header.append(f"target ({target_ratio})")
    right = [False, False, False] + [True] * (len(peers) + len(ratio_labels))
    if target_ratio is not None:
        right.append(False)
    lines: list[list[str]] = []
    for row in rows:
        cells = [row.backing, row.workload, row.metric]
        cells += [fmt_spread(row.values.get(p), row.metric) for p in peers]
        cells += [fmt_spread(row.ratios.get(r), "ratio") for r in ratio_labels]
        if target_ratio is not None:
            cells.append(target_mark(row.ratios.get(target_ratio), row.target, at_most))
        lines.append(cells)
    return render_table(header, right, lines)


@dataclass(frozen=True)
class PeerRow:
    """Every figure of one peer on one (backing, workload): medians over the rounds."""

    backing: str
    workload: str
    peer: str
    iops: float | None
    mbps: float | None
    cpu_us_per_request: float | None
    cpu_us_per_mib: float | None
    server_cores: float | None  # server CPU seconds per second of client wall time
    client_cores: float | None = None  # the client's own CPU seconds per second of its run


PEER_COLUMNS = ["IOPS", "MB/s", "CPU us/req", "CPU us/MiB", "server cores", "client cores"]


def format_peer_table(rows: Sequence[PeerRow]) -> str:
    """One line per peer: IOPS and MB/s beside the server CPU per request and per MiB."""
    header = ["backing", "workload", "peer", *PEER_COLUMNS]
    right = [False, False, False] + [True] * len(PEER_COLUMNS)
    lines = []
    for r in rows:
        figures = [(r.iops, "IOPS"), (r.mbps, "MB/s"), (r.cpu_us_per_request, "us"),
                   (r.cpu_us_per_mib, "us"), (r.server_cores, "cores"),
                   (r.client_cores, "cores")]
        lines.append([r.backing, r.workload, r.peer,
                      *("-" if v is None else fmt_quantity(v, m) for v, m in figures)])
    return render_table(header, right, lines)


def render_table(header: Sequence[str], right: Sequence[bool],
                 lines: Sequence[Sequence[str]]) -> str:
    """Markdown with padded cells; ``right`` marks the right-aligned (numeric) columns."""
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h)
              for i, h in enumerate(header)]

    def render(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w)
                  for c, w, r in zip(cells, widths, right, strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2))
                          for w, r in zip(widths, right, strict=True)) + "|"
    return "\n".join([render(header), rule, *(render(c) for c in lines)]) + "\n"


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    tool: Tool
    metric: Metric
    bs: int = 4096
    qd: int = 1
    write: bool = False
    random: bool = False
    target: float | None = None  # blockd/qsd median ratio the issue asks for (not null-co)
    start_count: int = 1000  # qemu-img bench: first calibration count
    # Highest blockd/qsd median ratio of server CPU per request the speed issue asks for.
    cpu_target: float | None = None


WORKLOADS: dict[str, Workload] = {w.key: w for w in [
    Workload("rr4k-qd1", "4K rand read QD1 (qemu-img)", "qemu-img", "IOPS", qd=1,
             random=True, target=1.2, start_count=3000),
    Workload("rr4k-qd32", "4K rand read QD32 (qemu-img)", "qemu-img", "IOPS", qd=32,
             random=True, target=1.5, start_count=20000, cpu_target=0.55),
    Workload("rw4k-qd32", "4K rand write QD32 (qemu-img)", "qemu-img", "IOPS", qd=32,
             write=True, random=True, target=1.5, start_count=20000, cpu_target=0.55),
    Workload("sr64k-qd8", "64K seq read QD8 (qemu-img)", "qemu-img", "MB/s", bs=64 << 10,
             qd=8, start_count=5000),
    Workload("sr1m-qd4", "1M seq read QD4 (qemu-img)", "qemu-img", "MB/s", bs=MiB, qd=4,
             target=1.5, start_count=500),
    Workload("fio-rr4k-qd1", "4K rand read QD1 (fio nbd)", "fio", "IOPS", qd=1,
             random=True, target=1.2),
    Workload("fio-rr4k-qd32", "4K rand read QD32 (fio nbd)", "fio", "IOPS", qd=32,
             random=True, target=1.5),
    Workload("fio-rw4k-qd32", "4K rand write QD32 (fio nbd)", "fio", "IOPS", qd=32,
             write=True, random=True, target=1.5),
    Workload("nbdcopy", "nbdcopy -> null:", "nbdcopy", "MB/s", bs=0, target=1.5),
]}
DEFAULT_WORKLOADS = ["rr4k-qd1", "rr4k-qd32", "rw4k-qd32", "sr1m-qd4",
                     "fio-rr4k-qd32", "fio-rw4k-qd32", "nbdcopy"]
BACKINGS = ["file", "tmpfs", "loop", "null"]  # the default set
# loop4k: the loop device with its cache warmed page by page (4 KiB folios), opt-in.
EXTRA_BACKINGS = ["loop4k"]
ALL_BACKINGS = BACKINGS + EXTRA_BACKINGS
LOOP_BACKINGS = ("loop", "loop4k")
BACKING_LABELS = {"file": "file (ext4)", "tmpfs": "file (tmpfs)",
                  "loop": "loop (warm bdev cache)", "loop4k": "loop (cache of 4 KiB folios)",
                  "null": "null-co"}


@dataclass
class Result:
    """One client run: what it reports."""

    seconds: float  # the run time the rates are computed from
    iops: float | None
    mbps: float
    wall: float  # wall time of the client process(es), start to exit
    requests: int | None = None  # NBD requests of the whole run (None: not known)
    nbytes: int = 0  # bytes read or written in the whole run
    client_cpu_s: float | None = None  # CPU (user + system) of the client process(es)


class BenchError(RuntimeError):
    """Stops the run (a peer died or could not start, bad options)."""


class ClientError(BenchError):
    """One client run failed; the sample is left out and the run goes on."""


def _children_cpu() -> float:
    """CPU seconds of every child (and its descendants) this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_client(argv: Sequence[str], timeout: float = 300) -> tuple[str, float, float]:
    """Run a client to its end: its output, its wall time and its CPU seconds.

    The CPU is what the client's process and everything it waited for spent, read
    from this process's children's usage around the run (the peers, also children,
    are waited for only when they stop, so they are not in it).
    """
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as err:
        raise ClientError(f"{shlex.join(argv)} did not finish in {timeout:g} s") from err
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0
    if proc.returncode != 0:
        raise ClientError(f"{shlex.join(argv)} failed ({proc.returncode}):\n"
                          f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout, wall, cpu


_QEMU_IMG_DONE = re.compile(r"Run completed in ([0-9.]+) seconds")


def run_qemu_img(uri: str, wl: Workload, count: int, size: int) -> Result:
    argv = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(wl.qd),
            "-s", str(wl.bs)]
    if wl.random:
        argv += ["-S", str((wl.bs * STEP_BLOCKS) % size)]
    if wl.write:
        argv.append("-w")
    argv.append(uri)
    out, wall, cpu = _run_client(argv)
    m = _QEMU_IMG_DONE.search(out)
    if m is None:
        raise ClientError(f"no 'Run completed' line from {shlex.join(argv)}:\n{out[-1000:]}")
    secs = max(float(m.group(1)), 1e-3)
    return Result(secs, count / secs, count * wl.bs / secs / 1e6, wall, count, count * wl.bs,
                  cpu)


def run_fio(uri: str, wl: Workload, runtime: float, size: int, outdir: Path) -> Result:
    out_path = outdir / "fio.json"
    argv = ["fio", "--name=nbdbench", "--ioengine=nbd", f"--uri={uri}",
            f"--rw={'randwrite' if wl.write else 'randread'}", f"--bs={wl.bs}",
            f"--iodepth={wl.qd}", f"--size={size}", f"--runtime={round(runtime * 1000)}ms",
            "--time_based", "--output-format=json", f"--output={out_path}"]
    _, wall, cpu = _run_client(argv)
    try:
        data = json.loads(out_path.read_text())
        job = data["jobs"][0]["write" if wl.write else "read"]
        secs = job["runtime"] / 1e3  # ms
        requests, nbytes = int(job["total_ios"]), int(job["io_bytes"])
    except (OSError, ValueError, LookupError, TypeError) as err:
        raise ClientError(f"unreadable fio output {out_path}: {err!r}") from err
    if secs <= 0:
        raise ClientError(f"fio ran for 0 ms: {shlex.join(argv)}")
    return Result(secs, float(job["iops"]), float(job["bw_bytes"]) / 1e6, wall, requests,
                  nbytes, cpu)


def run_nbdcopy(uri: str, copies: int, size: int) -> Result:
    t0 = time.perf_counter()
    cpu = 0.0
    for _ in range(copies):
        cpu += _run_client(["nbdcopy", "--no-extents", uri, "null:"])[2]
    secs = time.perf_counter() - t0
    # nbdcopy picks its own request sizes and count: CPU is reported per MiB only.
    return Result(secs, None, copies * size / secs / 1e6, secs, None, copies * size, cpu)


# --------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerSpec:
    """How to start a peer: argv before the QSD-style options, extra environment."""

    label: str
    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


def builtin_peer(name: str) -> tuple[tuple[str, ...], dict[str, str]] | None:
    # Metrics on as by default, but each peer on a free port (two blockd peers run at once).
    blockd = (sys.executable, "-m", "blockd", "--metrics", "127.0.0.1:0")
    match name:
        case "qsd":
            return ("qemu-storage-daemon",), {}
        case "blockd":
            return blockd, {}
        case "blockd-noacct":
            return blockd, {"BLOCKD_NO_ACCOUNTING": "1"}
        case "nbdkit" | "qemu-nbd":  # C references, translated by reference_peer.py
            return (sys.executable, str(REFERENCE_PEER), name), {}
    return None


def parse_peer_definition(text: str) -> tuple[str, tuple[str, ...], dict[str, str]]:
    """``NAME=[VAR=value ...] COMMAND [ARGS...]`` -> name, argv, env."""
    name, sep, command = text.partition("=")
    if not sep or not name or not command.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=COMMAND, got {text!r}")
    words = shlex.split(command)
    env: dict[str, str] = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        var, _, value = words.pop(0).partition("=")
        env[var] = value
    if not words:
        raise argparse.ArgumentTypeError(f"no command in {text!r}")
    return name, tuple(words), env


def resolve_peers(names: Sequence[str],
                  defined: Mapping[str, tuple[tuple[str, ...], dict[str, str]]]
                  ) -> list[PeerSpec]:
    """Peer specs with unique labels (``qsd,qsd`` -> ``qsd``, ``qsd#2``)."""
    specs: list[PeerSpec] = []
    seen: dict[str, int] = {}
    for name in names:
        found = defined.get(name) or builtin_peer(name)
        if found is None:
            raise BenchError(f"unknown peer {name!r}: use qsd, blockd, blockd-noacct, nbdkit, "
                             "qemu-nbd or define it with --peer NAME=COMMAND")
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}#{seen[name]}"
        specs.append(PeerSpec(label, name, found[0], found[1]))
    return specs


def parse_stat(text: str) -> tuple[int, int]:
    """The parent pid and the CPU clock ticks from a ``/proc/PID/stat`` line.

    The ticks are utime + stime (every thread, the exited ones included) plus cutime
    + cstime (children that exited and were waited for), so a peer's worker process
    that ends during a round is still counted, through its parent.
    """
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces and ')'
    return int(fields[1]), sum(int(f) for f in fields[11:15])


def tree_ticks(stats: Mapping[int, tuple[int, int]], root: int) -> int | None:
    """The ticks of ``root`` and of all its descendants; None if root is not there."""
    if root not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


def _all_stats() -> dict[int, tuple[int, int]]:
    stats = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stats[int(entry.name)] = parse_stat(
                    Path(entry.path, "stat").read_text(errors="replace"))
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
    return stats


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads and all its descendants."""
    ticks = tree_ticks(_all_stats(), pid)
    return None if ticks is None else ticks / os.sysconf("SC_CLK_TCK")


class Peer:
    """A running peer exporting node ``n0`` as ``e0`` on its own UNIX socket."""

    def __init__(self, spec: PeerSpec, blockdev: str, workdir: Path, tag: str) -> None:
        self.spec = spec
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", spec.label)
        self.sock = workdir / f"{tag}-{safe}.sock"
        self.qmp = workdir / f"{tag}-{safe}.qmp"
        self.pidfile = workdir / f"{tag}-{safe}.pid"
        self.log = workdir / f"{tag}-{safe}.log"
        self.argv = [
            *spec.argv,
            "--blockdev", f"node-name=n0,{blockdev}",
            "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
            "--export", "type=nbd,id=e0,node-name=n0,name=e0,writable=on",
            "--chardev", f"socket,id=m0,path={self.qmp},server=on,wait=off",
            "--monitor", "chardev=m0",
            "--pidfile", str(self.pidfile),
        ]
        self.uri = f"nbd+unix:///e0?socket={self.sock}"
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        for p in (self.sock, self.qmp, self.pidfile):
            p.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.update(self.spec.env)
        with open(self.log, "wb") as log:
            # Own session: a Ctrl-C in the terminal reaches only this script, which
            # then stops the peer itself.
            # In the work directory: ``python -m`` puts the current directory first on
            # sys.path, so from a checkout every peer would run that checkout's blockd
            # whatever its PYTHONPATH says (a --peer of another tree would measure this one).
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env=env,
                                         cwd=self.workdir, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (self.pidfile.exists() and self.sock.exists()):
            if self.proc.poll() is not None:
                raise BenchError(f"peer {self.spec.label} exited with {self.proc.returncode} "
                                 f"while starting:\n  {shlex.join(self.argv)}\n"
                                 f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"peer {self.spec.label} not ready after {timeout:g} s "
                                 f"(no pidfile or socket):\n{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"peer {self.spec.label} is gone (exit {code}):\n{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        return None if self.proc is None else _cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for p in (self.sock, self.qmp, self.pidfile):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# Backings
# --------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[nbd_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _fill_random(path: Path, size: int) -> None:
    """Write random data (so every block is allocated), fsync, then read it back (warm)."""
    chunk = 4 * MiB
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    _prewarm(str(path))


def _prewarm(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MiB)
        while f.readinto(buf):
            pass


def _prewarm_pages(path: str) -> None:
    """Warm the cache one page at a time, readahead off: it holds single-page folios.

    What the cache already holds is written back and dropped first (pages probed at
    attach were read ahead into bigger folios; the last round's writes are dirty).
    The device stays locked meanwhile (``flock``), which udev honours: its probe, which
    reads ahead, waits until every page is cached.  Large reads instead
    (:func:`_prewarm`) leave folios of up to 2 MiB, and a 4 KiB buffered write into a
    block device walks the buffer heads of its whole folio (bench/folio_sizes.py).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        size = os.lseek(fd, 0, os.SEEK_END)
        page = bytearray(4096)
        for offset in range(0, size, len(page)):
            os.preadv(fd, [page], offset)
    finally:
        os.close(fd)


def prewarm_for(kind: str) -> Callable[[str], None]:
    """How a backing's cache is warmed, at setup and again before each round."""
    return _prewarm_pages if kind == "loop4k" else _prewarm


def cached_path(blockdev: str) -> str | None:
    """The file or device whose page cache a ``--blockdev`` string reads, if any."""
    for option in blockdev.split(","):
        key, _, value = option.partition("=")
        if key == "filename":
            return value
    return None


class Shielded:
    """Run cleanup steps with SIGINT/SIGTERM blocked, so a second Ctrl-C cannot cut one short.

    A signal that arrives meanwhile is delivered once the step is done.
    """

    SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self.stack = stack

    def callback(self, fn: Callable[[], object]) -> None:
        def run() -> None:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)
            try:
                fn()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.stack.callback(run)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def _stop_holder(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def _detach_loop(dev: str) -> None:
    subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def backing(kind: str, size: int) -> Iterator[str]:
    """Set up one backing; yield its --blockdev options (without node-name); clean up."""
    with contextlib.ExitStack() as stack:
        clean = Shielded(stack)
        if kind == "null":
            yield f"driver=null-co,size={size},read-zeroes=on"
            return
        directory = "/var/tmp" if kind == "file" else "/dev/shm"
        fd, name = tempfile.mkstemp(prefix="nbd-bench-", suffix=".img", dir=directory)
        os.close(fd)
        path = Path(name)
        clean.callback(lambda: _unlink(path))
        _log(f"{kind}: writing {size // MiB} MiB of random data to {path}")
        _fill_random(path, size)
        # locking=off: all peers open the backing at once (QEMU would refuse the second
        # writer); locks are taken at open only, so this does not change the I/O path.
        if kind in ("file", "tmpfs"):
            yield f"driver=file,filename={path},locking=off"
            return
        if kind not in LOOP_BACKINGS:
            raise BenchError(f"unknown backing {kind!r}")
        dev = subprocess.run(["losetup", "--direct-io=off", "-f", "--show", str(path)],
                             check=True, capture_output=True, text=True).stdout.strip()
        clean.callback(lambda: _detach_loop(dev))
        # The kernel drops a block device's page cache when its last opener closes it
        # (perf-baseline §1): a holder keeps it open, then we pre-warm the cache.
        with open(dev, "rb") as f:
            holder = subprocess.Popen(["sleep", "infinity"], stdin=f,
                                      start_new_session=True)
        clean.callback(lambda: _stop_holder(holder))
        _log(f"{kind}: {dev} over {path}, holder pid {holder.pid}; pre-warming")
        prewarm_for(kind)(dev)
        try:
            cache = folio_sizes.describe(folio_sizes.folio_sizes(dev))
        except (OSError, ValueError, struct.error) as err:  # a diagnostic: never the run's end
            cache = f"unavailable ({err})"
        _log(f"{kind}: page cache by folio size: {cache}")
        yield f"driver=host_device,filename={dev},locking=off"


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclass
class Sample:
    peer: str
    backing: str
    workload: str
    round: int
    iops: float | None
    mbps: float
    seconds: float
    wall: float
    param: int | float  # qemu-img count, nbdcopy copies, fio runtime
    server_cpu_s: float | None  # the peer's CPU (every thread and process) during the run
    requests: int | None = None
    nbytes: int = 0
    client_cpu_s: float | None = None  # the client's CPU during the run (None: not read)

    def value(self, metric: Metric) -> float | None:
        return self.iops if metric == "IOPS" else self.mbps

    def cpu_us_per_request(self) -> float | None:
        if self.server_cpu_s is None or not self.requests:
            return None
        return self.server_cpu_s * 1e6 / self.requests

    def cpu_us_per_mib(self) -> float | None:
        if self.server_cpu_s is None or self.nbytes <= 0:
            return None
        return self.server_cpu_s * 1e6 * MiB / self.nbytes

    def server_cores(self) -> float | None:
        """How many CPUs the server kept busy on average while the client ran."""
        if self.server_cpu_s is None or self.wall <= 0:
            return None
        return self.server_cpu_s / self.wall

    def client_cores(self) -> float | None:
        """How many CPUs the client kept busy: near 1 for a one-thread client, it was the
        bound; with server and client cores adding up to the machine's CPUs, the machine was."""
        if self.client_cpu_s is None or self.wall <= 0:
            return None
        return self.client_cpu_s / self.wall

    def cpu_value(self, unit: CpuUnit) -> float | None:
        return self.cpu_us_per_request() if unit == "us/req" else self.cpu_us_per_mib()

    def figures(self) -> dict[str, float | None]:
        """The derived figures, for --json."""
        return {"cpu_us_per_request": self.cpu_us_per_request(),
                "cpu_us_per_mib": self.cpu_us_per_mib(),
                "server_cores": self.server_cores(),
                "client_cores": self.client_cores()}


@dataclass
class Options:
    backings: list[str]
    workloads: list[Workload]
    peers: list[PeerSpec]
    reference: str
    repeats: int
    size: int
    target_s: float
    skipped: dict[str, str] = field(default_factory=dict)  # default peer -> why not run


def cpu_unit(wl: Workload) -> CpuUnit:
    """Per request where the client's request count is known, else per MiB (nbdcopy)."""
    return "us/MiB" if wl.tool == "nbdcopy" else "us/req"


class Runner:
    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.samples: list[Sample] = []
        self.params: dict[tuple[str, str, str], int | float] = {}
        self.failures: list[str] = []

    def one(self, peer: Peer, wl: Workload, param: int | float) -> Result:
        peer.check_alive()
        size = self.opts.size
        if wl.tool == "qemu-img":
            return run_qemu_img(peer.uri, wl, int(param), size)
        if wl.tool == "fio":
            return run_fio(peer.uri, wl, float(param), size, self.workdir)
        return run_nbdcopy(peer.uri, int(param), size)

    def calibrate(self, peer: Peer, wl: Workload) -> int | float:
        """Pick the count (qemu-img) or copies (nbdcopy) for a run of about target_s.

        The calibration runs also warm the peer up.  fio is time-based: it gets a
        short warm-up run only.
        """
        target = self.opts.target_s
        if wl.tool == "fio":
            self.one(peer, wl, min(1.0, target))
            return target
        if wl.tool == "nbdcopy":
            res = self.one(peer, wl, 1)
            return max(1, math.ceil(target / res.seconds))
        count = wl.start_count
        for _ in range(8):
            res = self.one(peer, wl, count)
            if res.seconds >= 0.3:
                break
            count = int(count * min(10.0, 0.5 / res.seconds))
        return max(100, round(count * target / res.seconds))

    def run_backing(self, kind: str) -> None:
        opts = self.opts
        with contextlib.ExitStack() as stack:
            blockdev = stack.enter_context(backing(kind, opts.size))
            clean = Shielded(stack)
            peers: list[Peer] = []
            for spec in opts.peers:
                peer = Peer(spec, blockdev, self.workdir, kind)
                clean.callback(peer.stop)
                _log(f"{kind}: starting {spec.label}: {shlex.join(peer.argv)}")
                peer.start()
                peers.append(peer)
            for wl in opts.workloads:
                for peer in peers:
                    try:
                        param = self.calibrate(peer, wl)
                    except ClientError as err:
                        peer.check_alive()
                        _log(f"{kind}/{wl.key}/{peer.spec.label}: calibration failed, "
                             f"skipping this workload for this peer: {err}")
                        self.failures.append(f"{kind}/{wl.key}/{peer.spec.label} "
                                             f"calibration: {err}")
                        continue
                    self.params[(kind, wl.key, peer.spec.label)] = param
                    what = {"fio": "runtime (s)", "nbdcopy": "copies"}.get(wl.tool, "count")
                    _log(f"{kind}/{wl.key}/{peer.spec.label}: {what} {param}")
            warm = cached_path(blockdev)
            prewarm = prewarm_for(kind)
            for rnd in range(opts.repeats):
                order = peers if rnd % 2 == 0 else peers[::-1]
                if warm is not None:
                    # Read the whole backing again before each round: a kernel that
                    # reclaims cold page cache on its own (DAMON's pageout scheme on
                    # the standard VM evicts what was not touched for about a minute)
                    # would otherwise turn a "warm" run into disk reads, for
                    # whichever peer comes late.
                    prewarm(warm)
                for wl in opts.workloads:
                    for peer in order:
                        key = (kind, wl.key, peer.spec.label)
                        if key not in self.params:
                            continue
                        param = self.params[key]
                        cpu0 = peer.cpu_seconds()
                        try:
                            res = self.one(peer, wl, param)
                        except ClientError as err:
                            peer.check_alive()  # a dead peer stops the run
                            _log(f"round {rnd + 1}/{opts.repeats} {kind}/{wl.key}/"
                                 f"{peer.spec.label}: FAILED, sample left out: {err}")
                            self.failures.append(f"{kind}/{wl.key}/{peer.spec.label} "
                                                 f"round {rnd + 1}: {err}")
                            continue
                        cpu1 = peer.cpu_seconds()
                        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
                        s = Sample(peer.spec.label, kind, wl.key, rnd, res.iops, res.mbps,
                                   res.seconds, res.wall, param, cpu, res.requests,
                                   res.nbytes, res.client_cpu_s)
                        self.samples.append(s)
                        value = s.value(wl.metric)
                        unit = cpu_unit(wl)
                        per = s.cpu_value(unit)
                        cpu_text = "" if per is None else (
                            f", server CPU {fmt_quantity(per, unit)} {unit.replace('us', 'µs')}")
                        client = s.client_cores()
                        if client is not None:
                            cpu_text += f", client {client:.2f} cores"
                        _log(f"round {rnd + 1}/{opts.repeats} {kind}/{wl.key}/"
                             f"{peer.spec.label}: {fmt_quantity(value or 0, wl.metric)} "
                             f"{wl.metric} in {res.seconds:.2f} s{cpu_text}")
                        if res.seconds < 0.5 * opts.target_s:
                            _log(f"  note: run shorter than half the target "
                                 f"({res.seconds:.2f} s < {opts.target_s / 2:.2f} s)")
                        self.params[(kind, wl.key, peer.spec.label)] = self.adjust(
                            wl, param, res.seconds)

    def adjust(self, wl: Workload, param: int | float, seconds: float) -> int | float:
        """Re-aim the next run of this peer and workload at target_s (the VM drifts).

        Rates are per run, so a changed count does not bias the ratios; the change is
        limited to a factor of 2 per round so one odd run cannot swing it far.
        """
        if wl.tool == "fio":
            return param
        want = param * self.opts.target_s / max(seconds, 1e-3)
        want = min(max(want, param / 2), param * 2)
        return max(1, round(want)) if wl.tool == "nbdcopy" else max(100, round(want))


def ratio_pairs(opts: Options) -> list[tuple[str, str]]:
    """(candidate, reference) pairs: every peer against the reference, blockd against
    nbdkit (a C server's cost per request) and against blockd-noacct (the cost of
    accounting) when those run."""
    labels = [p.label for p in opts.peers]
    pairs = [(label, opts.reference) for label in labels if label != opts.reference]
    for other in ("nbdkit", "blockd-noacct"):
        if "blockd" in labels and other in labels:
            pairs.append(("blockd", other))
    return list(dict.fromkeys(pairs))


def _by_round(samples: Sequence[Sample], repeats: int, kind: str, wl: Workload, label: str,
              get: Callable[[Sample], float | None]) -> list[float | None]:
    """One figure of one peer per round (None where the round has no sample)."""
    by_round: list[float | None] = [None] * repeats
    for s in samples:
        if (s.backing, s.workload, s.peer) == (kind, wl.key, label):
            by_round[s.round] = get(s)
    return by_round


def _target_ratio(opts: Options, pairs: Sequence[tuple[str, str]]) -> str | None:
    return next((f"{a}/{b}" for a, b in pairs
                 if b == opts.reference and a.startswith("blockd")
                 and not opts.reference.startswith("blockd")), None)


def _build(opts: Options, samples: Sequence[Sample], cpu: bool
           ) -> tuple[list[TableRow], list[str], str | None]:
    labels = [p.label for p in opts.peers]
    pairs = ratio_pairs(opts)
    rows: list[TableRow] = []
    for kind in opts.backings:
        for wl in opts.workloads:
            unit = cpu_unit(wl)

            def get(s: Sample, wl: Workload = wl, unit: CpuUnit = unit) -> float | None:
                return s.cpu_value(unit) if cpu else s.value(wl.metric)

            per_peer = {label: _by_round(samples, opts.repeats, kind, wl, label, get)
                        for label in labels}
            if all(v is None for vals in per_peer.values() for v in vals):
                continue
            ratios = {f"{a}/{b}": spread(round_ratios(per_peer[a], per_peer[b]))
                      for a, b in pairs}
            target = wl.cpu_target if cpu else wl.target
            rows.append(TableRow(
                BACKING_LABELS.get(kind, kind), wl.label, unit if cpu else wl.metric,
                {label: spread(per_peer[label]) for label in labels}, ratios,
                None if kind == "null" else target))
    return rows, [f"{a}/{b}" for a, b in pairs], _target_ratio(opts, pairs)


def build_rows(opts: Options, samples: Sequence[Sample]
               ) -> tuple[list[TableRow], list[str], str | None]:
    """The throughput table: each row's headline metric (IOPS or MB/s) and its ratios."""
    return _build(opts, samples, cpu=False)


def build_cpu_rows(opts: Options, samples: Sequence[Sample]
                   ) -> tuple[list[TableRow], list[str], str | None]:
    """The server CPU table: microseconds per request (per MiB for nbdcopy) and the
    per-round ratios of those, with the same ratio columns as the throughput table."""
    return _build(opts, samples, cpu=True)


def build_peer_rows(opts: Options, samples: Sequence[Sample]) -> list[PeerRow]:
    """Every figure of every peer, as medians over the rounds."""
    getters: list[Callable[[Sample], float | None]] = [
        lambda s: s.iops, lambda s: s.mbps, Sample.cpu_us_per_request,
        Sample.cpu_us_per_mib, Sample.server_cores, Sample.client_cores]
    rows: list[PeerRow] = []
    for kind in opts.backings:
        for wl in opts.workloads:
            for peer in opts.peers:
                mine = [s for s in samples
                        if (s.backing, s.workload, s.peer) == (kind, wl.key, peer.label)]
                if not mine:
                    continue
                medians = [spread([get(s) for s in mine]) for get in getters]
                iops, mbps, per_req, per_mib, cores, client = (
                    None if m is None else m.median for m in medians)
                rows.append(PeerRow(BACKING_LABELS.get(kind, kind), wl.label, peer.label,
                                    iops, mbps, per_req, per_mib, cores, client))
    return rows


def nbdkit_missing(backings: Sequence[str]) -> str | None:
    """Why nbdkit (with the plugins the backings need) cannot run here, or None."""
    if shutil.which("nbdkit") is None:
        return "nbdkit is not installed (Debian package nbdkit)"
    plugins = ["file"] if set(backings) - {"null"} else []
    if "null" in backings:
        plugins.append("null")
    for plugin in plugins:
        try:
            proc = subprocess.run(["nbdkit", "--dump-plugin", plugin], capture_output=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"nbdkit --dump-plugin {plugin} failed: {err}"
        if proc.returncode != 0:
            return f"nbdkit has no {plugin} plugin (nbdkit --dump-plugin {plugin} failed)"
    return None


def default_peers(backings: Sequence[str],
                  missing: Callable[[Sequence[str]], str | None] = nbdkit_missing
                  ) -> tuple[list[str], dict[str, str]]:
    """blockd, qsd and, where it can run, nbdkit; and why a default peer is left out."""
    why = missing(backings)
    if why is None:
        return ["blockd", "qsd", "nbdkit"], {}
    return ["blockd", "qsd"], {"nbdkit": why}


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except OSError:
        return "missing"
    return out.strip().splitlines()[0] if out.strip() else "?"


def _module_version(name: str) -> str | None:
    """The installed version of a distribution for this interpreter (blockd's), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=f"workloads: {', '.join(WORKLOADS)}; default: {','.join(DEFAULT_WORKLOADS)}")
    ap.add_argument("--quick", action="store_true",
                    help="256 MiB backings, ~1 s runs, 3 repeats (a smoke test)")
    ap.add_argument("--backings", default=",".join(BACKINGS),
                    help=f"comma-separated subset of {','.join(ALL_BACKINGS)} "
                         f"(default {','.join(BACKINGS)})")
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help="comma-separated workload keys, or 'all'")
    ap.add_argument("--repeats", type=int, default=None,
                    help="rounds per backing (default 5; 3 with --quick)")
    ap.add_argument("--peers", default=None,
                    help="comma-separated peers: qsd, blockd, blockd-noacct, nbdkit, qemu-nbd "
                         "or names from --peer (default blockd,qsd,nbdkit, without nbdkit "
                         "where it or its file plugin is missing; qsd,qsd is a smoke test)")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND",
                    type=parse_peer_definition,
                    help="define a peer: leading VAR=value words are its environment, the "
                         "QSD-style options are appended to COMMAND")
    ap.add_argument("--reference", default=None,
                    help="peer label the ratios are taken against (default: qsd if it "
                         "runs, else the last peer)")
    ap.add_argument("--accounting-off", action="store_true",
                    help="also run blockd-noacct (BLOCKD_NO_ACCOUNTING=1) and report "
                         "blockd/blockd-noacct")
    ap.add_argument("--size-mib", type=int, default=None,
                    help="backing size in MiB, a power of two (default 1024; 256 with "
                         "--quick)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="target length of one run (default 2.5; 1 with --quick)")
    ap.add_argument("--json", metavar="FILE", help="write config, samples and summary")
    return ap.parse_args(argv)


def make_options(ns: argparse.Namespace) -> Options:
    backings = [b for b in ns.backings.split(",") if b]
    for b in backings:
        if b not in ALL_BACKINGS:
            raise BenchError(f"unknown backing {b!r} (choose from {', '.join(ALL_BACKINGS)})")
    keys = list(WORKLOADS) if ns.workloads == "all" else [
        w for w in ns.workloads.split(",") if w]
    for k in keys:
        if k not in WORKLOADS:
            raise BenchError(f"unknown workload {k!r} (choose from {', '.join(WORKLOADS)})")
    skipped: dict[str, str] = {}
    if ns.peers is None:
        names, skipped = default_peers(backings)
    else:
        names = [p for p in ns.peers.split(",") if p]
    if ns.accounting_off and "blockd-noacct" not in names:
        if "blockd" not in names:
            raise BenchError("--accounting-off needs blockd among --peers")
        names.insert(names.index("blockd") + 1, "blockd-noacct")
    defined = {name: (argv, env) for name, argv, env in ns.peer}
    peers = resolve_peers(names, defined)
    if len(peers) < 1:
        raise BenchError("no peers")
    labels = [p.label for p in peers]
    reference = ns.reference or ("qsd" if "qsd" in labels else labels[-1])
    if reference not in labels:
        raise BenchError(f"--reference {reference!r} is not one of {', '.join(labels)}")
    size_mib = ns.size_mib or (256 if ns.quick else 1024)
    if size_mib < 16 or size_mib & (size_mib - 1):
        raise BenchError("--size-mib must be a power of two >= 16")
    repeats = ns.repeats or (3 if ns.quick else 5)
    if repeats < 1:
        raise BenchError("--repeats must be >= 1")
    return Options(backings, [WORKLOADS[k] for k in keys], peers, reference, repeats,
                   size_mib * MiB, ns.seconds or (1.0 if ns.quick else 2.5), skipped)


def check_tools(opts: Options) -> None:
    needed: set[str] = {wl.tool for wl in opts.workloads}
    if any(kind in LOOP_BACKINGS for kind in opts.backings):
        needed.add("losetup")
        if os.geteuid() != 0:
            raise BenchError("the loop backings need root (or drop them: --backings "
                             "file,tmpfs,null)")
    for p in opts.peers:  # a reference peer needs the server it runs, not just Python
        needed.add(p.argv[2] if p.argv[1:2] == (str(REFERENCE_PEER),) else p.argv[0])
    missing = [t for t in sorted(needed) if shutil.which(t) is None]
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)} (Debian: qemu-utils, "
                         "qemu-system-common, libnbd-bin, fio, util-linux, nbdkit)")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        opts = make_options(ns)
        check_tools(opts)
    except BenchError as err:
        print(f"nbd_bench: {err}", file=sys.stderr)
        return 2
    for name, why in opts.skipped.items():
        _log(f"skipping {name}: {why}")
    # Also when started in the background by a shell, which ignores SIGINT there.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="nbd-bench-"))
    runner = Runner(opts, workdir)
    started = time.time()
    failed: str | None = None
    try:
        for kind in opts.backings:
            runner.run_backing(kind)
    except BenchError as err:
        failed = str(err)
        print(f"nbd_bench: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = "interrupted"
        print("nbd_bench: interrupted; cleaned up", file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    labels = [p.label for p in opts.peers]
    rows, ratio_labels, target_ratio = build_rows(opts, runner.samples)
    cpu_rows, _, _ = build_cpu_rows(opts, runner.samples)
    peer_rows = build_peer_rows(opts, runner.samples)
    print(f"\n{opts.repeats} rounds per backing, ~{opts.target_s:g} s per run, "
          f"{opts.size // MiB} MiB backings; ratios are per-round medians (min-max); "
          f"targets judged on the median ratio, not for null-co.\n")
    print(format_table(rows, labels, ratio_labels, target_ratio))
    if "blockd/blockd-noacct" in ratio_labels:
        print("blockd/blockd-noacct: accounting on vs off; 1 - ratio is the cost.\n")
    print("Server CPU (user + system, every thread and process of the peer, from "
          "/proc/PID/stat) per request, per MiB for nbdcopy; a ratio below 1 means "
          "less CPU than the peer divided by.\n")
    print(format_table(cpu_rows, labels, ratio_labels, target_ratio, at_most=True))
    print("Every peer: medians over the rounds (server cores: server CPU seconds per "
          "second of client run; client cores: the client's own, from its rusage; "
          f"this machine has {os.cpu_count()} CPUs).\n")
    print(format_peer_table(peer_rows))
    if opts.repeats < 5:
        print(f"Only {opts.repeats} rounds: the speed issue's targets are judged on "
              "medians of at least 5.")
    for name, why in opts.skipped.items():
        print(f"{name} skipped: {why}.")
    if runner.failures:
        print(f"{len(runner.failures)} client runs failed and are left out "
              "(details on stderr and in --json).")
    if ns.json:
        doc = {
            "started": started,
            "finished": time.time(),
            "failed": failed,
            "options": {
                "backings": opts.backings,
                "workloads": [asdict(w) for w in opts.workloads],
                "peers": [{"label": p.label, "name": p.name, "argv": list(p.argv),
                           "env": dict(p.env)} for p in opts.peers],
                "reference": opts.reference,
                "repeats": opts.repeats,
                "size": opts.size,
                "target_s": opts.target_s,
                "skipped_peers": opts.skipped,
            },
            "environment": {
                "python": sys.version,
                "kernel": platform.release(),
                "nproc": os.cpu_count(),
                "qemu-img": _version(["qemu-img", "--version"]),
                "qemu-storage-daemon": _version(["qemu-storage-daemon", "--version"]),
                "fio": _version(["fio", "--version"]),
                "nbdcopy": _version(["nbdcopy", "--version"]),
                "nbdkit": _version(["nbdkit", "--version"]),
                "uvloop": _module_version("uvloop"),
            },
            "samples": [{**asdict(s), **s.figures()} for s in runner.samples],
            "client_failures": runner.failures,
            "table": [{"backing": r.backing, "workload": r.workload, "metric": r.metric,
                       "values": {k: None if v is None else asdict(v)
                                  for k, v in r.values.items()},
                       "ratios": {k: None if v is None else asdict(v)
                                  for k, v in r.ratios.items()},
                       "target": r.target} for r in rows],
            "cpu_table": [{"backing": r.backing, "workload": r.workload, "unit": r.metric,
                           "values": {k: None if v is None else asdict(v)
                                      for k, v in r.values.items()},
                           "ratios": {k: None if v is None else asdict(v)
                                      for k, v in r.ratios.items()},
                           "target_at_most": r.target} for r in cpu_rows],
            "peer_table": [asdict(r) for r in peer_rows],
            "target_ratio": target_ratio,
        }
        Path(ns.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if failed is None and not runner.failures else 1


if __name__ == "__main__":
    sys.exit(main())
