#!/usr/bin/env python3
"""Instructions per NBD request, counted by callgrind: a figure the machine's load does not move.

IOPS and CPU seconds per request change with the host CPU, the kernel and whatever
else shares the 2 vCPUs; the number of instructions a server executes in user space
for a request does not (valgrind counts them, it does not time them).  So this is
the figure to compare one blockd commit with another, and blockd with
qemu-storage-daemon and nbdkit, on any machine.

Each peer is started under ``valgrind --tool=callgrind`` with the same
qemu-storage-daemon command line ``nbd_bench.py`` uses, warmed up with some
requests, then its counters are zeroed, ``qemu-img bench`` sends N requests, and
the counters are dumped (``callgrind_control``).  The total over all threads,
divided by N, is the figure.  What it leaves out: the kernel's work in system
calls (a server that makes more system calls per request pays that on top), and
anything about waiting or scheduling; blockd runs with busy-polling off.  See
bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbd_bench as nb  # the same peers and backings as the timed benchmark

WORKLOADS = {  # key: qemu-img bench arguments
    "rr4k-qd1": ["-d", "1", "-s", "4096", "-S", str(4096 * nb.STEP_BLOCKS)],
    "rr4k-qd32": ["-d", "32", "-s", "4096", "-S", str(4096 * nb.STEP_BLOCKS)],
    "rw4k-qd32": ["-w", "-d", "32", "-s", "4096", "-S", str(4096 * nb.STEP_BLOCKS)],
    "sr1m-qd4": ["-d", "4", "-s", str(nb.MiB)],
}
WARMUP = 2000  # requests before the counters are zeroed (caches, the window, the pools)


def requests_for(workload: str, requests: int) -> int:
    """How many requests a run of ``workload`` counts: a tenth of ``requests`` for 1 MiB reads."""
    return requests // 10 if workload.startswith("sr1m") else requests


def callgrind_total(text: str) -> int:
    """The instruction count of a callgrind dump: its ``totals:`` (or ``summary:``) line."""
    for line in text.splitlines():
        match = re.match(r"(?:totals|summary):\s+(\d+)", line)
        if match:
            return int(match.group(1))
    raise ValueError("no totals or summary line in the callgrind dump")


def newest_dump(directory: Path, pid: int, before: set[Path]) -> Path:
    """The dump ``callgrind_control -d`` just wrote for ``pid`` (``cg.PID.N``)."""
    for _ in range(200):
        fresh = [p for p in directory.glob(f"cg.{pid}.*") if p not in before]
        if fresh:
            newest = max(fresh, key=lambda p: int(p.suffix[1:]))
            text = newest.read_text(errors="replace")
            if re.search(r"^(?:totals|summary):", text, re.M):
                return newest
        time.sleep(0.05)
    raise nb.BenchError(f"callgrind wrote no dump for pid {pid}")


def bench(uri: str, args: Sequence[str], count: int) -> None:
    subprocess.run(["qemu-img", "bench", "-f", "raw", "-c", str(count), *args, uri],
                   check=True, stdout=subprocess.DEVNULL, timeout=1800)


def measure(peer: nb.Peer, workdir: Path, args: Sequence[str], count: int) -> int:
    """Instructions per request of one run of ``count`` requests."""
    pid = peer_pid(peer)
    bench(peer.uri, args, min(WARMUP, count))
    control(pid, "-z")
    bench(peer.uri, args, count)
    before = set(workdir.glob(f"cg.{pid}.*"))
    control(pid, "-d")
    return callgrind_total(newest_dump(workdir, pid, before).read_text()) // count


def peer_pid(peer: nb.Peer) -> int:
    """The pid in the peer's pid file (a server may create the file before writing it)."""
    for _ in range(200):
        words = peer.pidfile.read_text().split()
        if words:
            return int(words[0])
        time.sleep(0.05)
    raise nb.BenchError(f"{peer.spec.label} wrote no pid into {peer.pidfile}")


def control(pid: int, action: str) -> None:
    """``callgrind_control -z`` (zero the counters) or ``-d`` (dump them) for ``pid``."""
    done = subprocess.run(["callgrind_control", action, str(pid)], capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise nb.BenchError(f"callgrind_control {action} {pid}: {done.stderr.strip()}")


def under_callgrind(spec: nb.PeerSpec, workdir: Path) -> nb.PeerSpec:
    """The same peer, run by valgrind (children too: the C references exec their server).

    blockd's busy-polling is off unless the peer's definition sets it: a spin
    executes instructions for as long as the client takes, which is waiting, not
    work, and would make the count depend on the machine again.
    """
    valgrind = ("valgrind", "--tool=callgrind", "--trace-children=yes",
                f"--callgrind-out-file={workdir}/cg.%p")
    env = {"BLOCKD_POLL_MAX_NS": "0", **spec.env}
    return nb.PeerSpec(spec.label, spec.name, valgrind + spec.argv, env)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="blockd,qsd,nbdkit",
                    help="as nbd_bench.py's --peers (default blockd,qsd,nbdkit)")
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=COMMAND",
                    help="define a peer, as nbd_bench.py's --peer")
    ap.add_argument("--workloads", default="rr4k-qd1,rr4k-qd32,rw4k-qd32",
                    help=f"comma-separated, of {','.join(WORKLOADS)}")
    ap.add_argument("--requests", type=int, default=20000,
                    help="requests counted per run (1 MiB reads: a tenth)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per peer and workload")
    ap.add_argument("--backing", default="tmpfs", choices=nb.ALL_BACKINGS)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--json", metavar="FILE", help="write every count")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "qemu-img"):
        if shutil.which(tool) is None:
            print(f"nbd_instructions: {tool} is not installed", file=sys.stderr)
            return 2
    defined = dict((n, (a, e)) for n, a, e in map(nb.parse_peer_definition, ns.peer))
    specs = nb.resolve_peers(ns.peers.split(","), defined)
    workloads = ns.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"nbd_instructions: unknown workloads {unknown}", file=sys.stderr)
        return 2
    counts: dict[str, dict[str, list[int]]] = {s.label: {} for s in specs}
    workdir = Path(tempfile.mkdtemp(prefix="nbd-instr-"))
    try:
        with nb.backing(ns.backing, ns.size_mib * nb.MiB) as blockdev:
            for spec in specs:
                peer = nb.Peer(under_callgrind(spec, workdir), blockdev, workdir, "i")
                nb._log(f"{spec.label}: starting under callgrind")
                peer.start(timeout=300)
                try:
                    for wl in workloads:
                        n = requests_for(wl, ns.requests)
                        for _ in range(ns.repeats):
                            value = measure(peer, workdir, WORKLOADS[wl], n)
                            counts[spec.label].setdefault(wl, []).append(value)
                            nb._log(f"{spec.label} {wl}: {value:,} instructions per request")
                finally:
                    peer.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(counts, workloads))
    if ns.json:
        Path(ns.json).write_text(json.dumps(
            {"options": vars(ns), "instructions_per_request": counts}, indent=2))
    return 0


def format_table(counts: dict[str, dict[str, list[int]]], workloads: Sequence[str]) -> str:
    """Medians per peer and workload, and each peer's ratio to the first one."""
    labels = list(counts)
    first = labels[0]
    head = ["workload", *labels, *(f"{first}/{other}" for other in labels[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wl in workloads:
        med = {label: statistics.median(counts[label][wl]) if counts[label].get(wl) else None
               for label in labels}
        cells = [f"{med[label]:,.0f}" if med[label] else "-" for label in labels]
        base = med[first]
        for other in labels[1:]:
            cells.append(f"{base / med[other]:.2f}x" if base and med[other] else "-")
        lines.append("| " + " | ".join([wl, *cells]) + " |")
    return "\n".join(lines) + "\n\nInstructions per request in user space (callgrind), " \
        "every thread; the kernel's share of system calls is not counted.\n"


if __name__ == "__main__":
    sys.exit(main())
