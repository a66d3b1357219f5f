#!/usr/bin/env python3
"""Bytecodes per NBD request, by Python function: where blockd's interpreter time goes.

``nbd_instructions.py`` counts a request's instructions but cannot say which Python
function ran them, and a sampling profiler's shares move with the machine's load.
This runs blockd under a tracer that counts every bytecode it executes
(``sys.settrace`` with opcode events), per function, while ``qemu-img bench`` sends
requests: for the same code and workload the counts come out within a few per cent on
any machine, so two trees can be compared function by function.

The tracer makes blockd some tens of times slower.  Busy-polling is off (a spin
would count waiting as work), and what depends on timing (requests per received
chunk, completions per reap) can differ from a run at full speed.  Only Python is
counted: C functions, the kernel and other threads' waiting are not.

Each tree (``--tree``, default this checkout) is started on the backing with the
command line of ``nbd_bench.py``, warmed up, its counts zeroed (SIGUSR1), sent N
requests, and its counts written out (SIGUSR2).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbd_bench as nb  # the same backings and command line as the timed benchmark
from nbd_instructions import WARMUP, WORKLOADS, bench, peer_pid, requests_for

TRACE_FLAG = "--trace-into"  # how a peer started by this script knows it is the traced one
SETTLE_S = 0.5  # for the traced daemon to finish with a client that has gone


def count_bytecodes(counts: Counter[str]) -> None:
    """From now on, add every bytecode this thread and new threads execute to ``counts``.

    The key is the function: ``qualified name (file:first line)``.
    """

    def on_call(frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        code = frame.f_code
        key = f"{code.co_qualname} ({Path(code.co_filename).name}:{code.co_firstlineno})"
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False

        def on_event(frame: FrameType, event: str, arg: Any) -> Callable[..., Any]:
            if event == "opcode":
                counts[key] += 1
            return on_event

        return on_event

    threading.settrace(on_call)
    sys.settrace(on_call)


def run_traced(out: Path, blockd_args: Sequence[str]) -> None:
    """Run blockd counting bytecodes; SIGUSR1 zeroes the counts, SIGUSR2 writes them to ``out``."""
    import runpy

    counts: Counter[str] = Counter()

    def zero(signum: int, frame: object) -> None:
        counts.clear()

    def write(signum: int, frame: object) -> None:
        snapshot = dict(counts)
        part = out.with_suffix(".part")
        part.write_text(json.dumps(snapshot))
        os.replace(part, out)  # the reader never sees half a file

    signal.signal(signal.SIGUSR1, zero)
    signal.signal(signal.SIGUSR2, write)
    sys.argv = ["blockd", *blockd_args]
    count_bytecodes(counts)
    runpy.run_module("blockd", run_name="__main__", alter_sys=True)


def per_request(counts: Mapping[str, int], requests: int) -> dict[str, float]:
    """Each function's bytecodes per request, biggest first."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {key: value / requests for key, value in ranked}


def format_report(label: str, workload: str, per_req: Mapping[str, float], top: int) -> str:
    """The total per request, then the ``top`` functions with their share."""
    total = sum(per_req.values())
    lines = [f"## {label}: {workload}, {total:,.0f} bytecodes per request", "",
             "| bytecodes/request | share | function |", "|--:|--:|---|"]
    for key, value in list(per_req.items())[:top]:
        share = value / total if total else 0.0
        lines.append(f"| {value:,.1f} | {share:.1%} | {key} |")
    return "\n".join(lines) + "\n"


def traced_spec(tree: Path, out: Path) -> nb.PeerSpec:
    """A peer running the blockd of ``tree`` under the tracer, writing its counts to ``out``."""
    argv = (sys.executable, str(Path(__file__).resolve()), TRACE_FLAG, str(out))
    env = {"PYTHONPATH": str(tree), "BLOCKD_POLL_MAX_NS": "0"}
    return nb.PeerSpec(tree.name or str(tree), "blockd", argv, env)


def measure(peer: nb.Peer, out: Path, args: Sequence[str], count: int) -> dict[str, int]:
    """The counts of one run of ``count`` requests (after a warm-up)."""
    pid = peer_pid(peer)
    bench(peer.uri, args, min(WARMUP, count))
    time.sleep(SETTLE_S)  # the warm-up's connection is torn down before the zero ...
    os.kill(pid, signal.SIGUSR1)
    bench(peer.uri, args, count)
    time.sleep(SETTLE_S)  # ... and the measured one's within the count, every time
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR2)
    for _ in range(400):  # the handler runs when the loop thread next runs Python
        if out.exists():
            return dict(json.loads(out.read_text()))
        time.sleep(0.05)
    raise nb.BenchError(f"{peer.spec.label} wrote no counts to {out}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", type=Path, metavar="PATH",
                    help="a blockd source tree to count (repeatable; default this checkout)")
    ap.add_argument("--workloads", default="rw4k-qd32",
                    help=f"comma-separated, of {','.join(WORKLOADS)}")
    ap.add_argument("--requests", type=int, default=5000, help="requests counted per run")
    ap.add_argument("--backing", default="loop4k", choices=nb.ALL_BACKINGS)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--top", type=int, default=25, help="functions listed per run")
    ap.add_argument("--json", metavar="FILE", help="write every count")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == [TRACE_FLAG]:
        run_traced(Path(args[1]), args[2:])
        return 0
    ns = parse_args(args)
    if shutil.which("qemu-img") is None:
        print("nbd_bytecodes: qemu-img is not installed", file=sys.stderr)
        return 2
    workloads = ns.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"nbd_bytecodes: unknown workloads {unknown}", file=sys.stderr)
        return 2
    if ns.requests < 10:
        print("nbd_bytecodes: --requests must be at least 10", file=sys.stderr)
        return 2
    trees = [t.resolve() for t in ns.tree or [nb.REPO_ROOT]]
    # A tree without blockd would not fail: Python would find an installed blockd instead.
    missing = [str(t) for t in trees if not (t / "blockd" / "__main__.py").is_file()]
    if missing:
        print(f"nbd_bytecodes: no blockd/__main__.py in {', '.join(missing)}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, dict[str, float]]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="nbd-bytecodes-"))
    try:
        with nb.backing(ns.backing, ns.size_mib * nb.MiB) as blockdev:
            for n, tree in enumerate(trees):
                out = workdir / f"counts-{n}.json"
                peer = nb.Peer(traced_spec(tree, out), blockdev, workdir, f"b{n}")
                nb._log(f"{tree}: starting under the bytecode tracer")
                try:
                    peer.start(timeout=120)  # inside: a start that fails is stopped too
                    for wl in workloads:
                        count = requests_for(wl, ns.requests)
                        per_req = per_request(measure(peer, out, WORKLOADS[wl], count), count)
                        results.setdefault(str(tree), {})[wl] = per_req
                        print(format_report(str(tree), wl, per_req, ns.top))
                finally:
                    peer.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if ns.json:
        Path(ns.json).write_text(json.dumps(
            {"options": {k: str(v) for k, v in vars(ns).items()},
             "bytecodes_per_request": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
