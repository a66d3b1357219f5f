"""The instruction-count benchmark's pure parts (bench/nbd_instructions.py)."""

from __future__ import annotations

from pathlib import Path

import benchscripts
import pytest

ni = benchscripts.load("nbd_instructions")

DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  python3 -m blockd
part: 1
events: Ir
fn=(1) main
0 12
summary: 723531107
totals: 719496078
"""


def test_the_total_is_read_from_the_totals_line() -> None:
    assert ni.callgrind_total(DUMP) == 723531107  # the first of summary/totals
    assert ni.callgrind_total("events: Ir\ntotals: 5\n") == 5


def test_a_dump_without_totals_is_an_error() -> None:
    with pytest.raises(ValueError):
        ni.callgrind_total("events: Ir\nfn=(1) main\n0 12\n")


def test_the_newest_complete_dump_of_the_pid_is_taken(tmp_path: Path) -> None:
    (tmp_path / "cg.7.1").write_text(DUMP)
    before = set(tmp_path.glob("cg.7.*"))
    (tmp_path / "cg.7.2").write_text(DUMP.replace("723531107", "10"))
    (tmp_path / "cg.7.10").write_text(DUMP.replace("723531107", "20"))  # 10 > 2
    (tmp_path / "cg.8.11").write_text(DUMP)  # another process
    newest = ni.newest_dump(tmp_path, 7, before)
    assert newest.name == "cg.7.10"
    assert ni.callgrind_total(newest.read_text()) == 20


def test_the_table_gives_medians_and_ratios_to_the_first_peer() -> None:
    table = ni.format_table(
        {"blockd": {"rr4k-qd32": [30_000, 32_000, 31_000]},
         "qsd": {"rr4k-qd32": [60_000, 62_000, 61_000], "rr4k-qd1": [1]}},
        ["rr4k-qd32", "rr4k-qd1"])
    rows = table.splitlines()
    assert rows[0] == "| workload | blockd | qsd | blockd/qsd |"
    assert rows[2] == "| rr4k-qd32 | 31,000 | 61,000 | 0.51x |"
    assert rows[3] == "| rr4k-qd1 | - | 1 | - |"


def test_1_mib_reads_count_a_tenth_of_the_requests() -> None:
    assert ni.requests_for("sr1m-qd4", 20_000) == 2_000
    assert ni.requests_for("rw4k-qd32", 20_000) == 20_000
