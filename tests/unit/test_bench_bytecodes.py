"""The bytecode counter's pure parts (bench/nbd_bytecodes.py)."""

from __future__ import annotations

import sys
import threading
from collections import Counter
from pathlib import Path

import benchscripts

nbc = benchscripts.load("nbd_bytecodes")


def _loop(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def _counted(n: int) -> Counter[str]:
    counts: Counter[str] = Counter()
    before = sys.gettrace(), threading.gettrace()  # a coverage tool's or debugger's
    nbc.count_bytecodes(counts)
    try:
        _loop(n)
    finally:
        sys.settrace(before[0])
        threading.settrace(before[1])  # type: ignore[arg-type]
    return counts


def _loop_count(counts: Counter[str]) -> int:
    (key,) = [k for k in counts if k.startswith("_loop (test_bench_bytecodes.py:")]
    return counts[key]


def test_every_bytecode_of_a_function_is_counted_under_its_name() -> None:
    ten, twenty, thirty = (_loop_count(_counted(n)) for n in (10, 20, 30))
    # Each turn of the loop runs the same bytecodes: the count grows by the same step.
    assert twenty - ten == thirty - twenty > 0
    assert ten > twenty - ten  # plus the call's own bytecodes outside the loop


def test_counting_stops_with_the_tracer() -> None:
    counts = _counted(5)
    before = dict(counts)
    _loop(100)
    assert dict(counts) == before


def test_a_tree_without_blockd_is_refused(tmp_path: Path) -> None:
    assert nbc.main(["--tree", str(tmp_path), "--backing", "tmpfs"]) == 2
    assert nbc.main(["--requests", "5"]) == 2


def test_counts_per_request_are_ranked_biggest_first() -> None:
    per = nbc.per_request({"a (x.py:1)": 300, "b (x.py:9)": 1200, "c (y.py:2)": 300}, 100)
    assert list(per.items()) == [("b (x.py:9)", 12.0), ("a (x.py:1)", 3.0), ("c (y.py:2)", 3.0)]


def test_the_report_gives_the_total_and_each_share() -> None:
    report = nbc.format_report("tree", "rw4k-qd32", {"b": 75.0, "a": 20.0, "c": 5.0}, top=2)
    lines = report.splitlines()
    assert lines[0] == "## tree: rw4k-qd32, 100 bytecodes per request"
    assert lines[4] == "| 75.0 | 75.0% | b |"
    assert lines[5] == "| 20.0 | 20.0% | a |"
    assert len(lines) == 6  # top=2: c is left out
