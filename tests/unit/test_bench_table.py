"""The benchmark's statistics and table formatting (bench/nbd_bench.py): pure functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "nbd_bench.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nbd_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nbd_bench"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


nb = _load()


def test_spread_median_min_max_ignoring_missing() -> None:
    assert nb.spread([3.0, None, 1.0, 2.0]) == nb.Spread(2.0, 1.0, 3.0)
    assert nb.spread([1.0, 2.0, 3.0, 10.0]) == nb.Spread(2.5, 1.0, 10.0)
    assert nb.spread([]) is None
    assert nb.spread([None, None]) is None


def test_round_ratios_are_per_round_and_skip_gaps() -> None:
    cand = [200.0, 300.0, None, 100.0]
    ref = [100.0, 100.0, 100.0, 0.0]
    assert nb.round_ratios(cand, ref) == [2.0, 3.0]
    # min/max of the ratio come from rounds, not from min(cand)/max(ref)
    r = nb.spread(nb.round_ratios([10.0, 30.0], [10.0, 20.0]))
    assert r == nb.Spread(1.25, 1.0, 1.5)


@pytest.mark.parametrize(("value", "metric", "text"), [
    (8714.0, "IOPS", "8,714"),
    (9994.0, "IOPS", "9,994"),
    (14_300.0, "IOPS", "14.3k"),
    (64_349.0, "IOPS", "64.3k"),
    (999_499.0, "IOPS", "999.5k"),
    (1_870_000.0, "IOPS", "1.87M"),
    (2164.4, "MB/s", "2,164"),
    (42_101.0, "MB/s", "42,101"),
    (3.44, "MB/s", "3.4"),
    (1.5249, "ratio", "1.52x"),
])
def test_fmt_quantity(value: float, metric: str, text: str) -> None:
    assert nb.fmt_quantity(value, metric) == text


def test_fmt_spread() -> None:
    assert nb.fmt_spread(nb.Spread(64_300.0, 56_400.0, 68_900.0), "IOPS") == \
        "64.3k (56.4k-68.9k)"
    assert nb.fmt_spread(None, "IOPS") == "-"


def test_target_mark() -> None:
    assert nb.target_mark(nb.Spread(1.6, 1.2, 2.0), 1.5) == ">=1.5x ok"
    assert nb.target_mark(nb.Spread(1.4, 1.2, 2.0), 1.5) == ">=1.5x MISS"
    assert nb.target_mark(nb.Spread(1.0, 0.9, 1.1), 1.0) == ">=1x ok"
    assert nb.target_mark(None, 1.0) == ">=1x ?"
    assert nb.target_mark(nb.Spread(0.1, 0.1, 0.1), None) == "-"


def _rows() -> list[object]:
    return [
        nb.TableRow("file (tmpfs)", "4K rand read QD32 (qemu-img)", "IOPS",
                    {"qsd": nb.Spread(64_300.0, 56_400.0, 68_900.0),
                     "blockd": nb.Spread(128_600.0, 120_000.0, 130_000.0)},
                    {"blockd/qsd": nb.Spread(2.0, 1.9, 2.1)}, 1.5),
        nb.TableRow("null-co", "nbdcopy -> null:", "MB/s",
                    {"qsd": nb.Spread(16_709.0, 16_485.0, 16_816.0), "blockd": None},
                    {"blockd/qsd": None}, None),
    ]


def test_format_table_markdown_shape() -> None:
    text = nb.format_table(_rows(), ["qsd", "blockd"], ["blockd/qsd"], "blockd/qsd")
    lines = text.splitlines()
    assert text.endswith("\n")
    assert len(lines) == 4
    # every line has the same width and the same number of cells
    assert len({len(line) for line in lines}) == 1
    assert {line.count("|") for line in lines} == {8}
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["backing", "workload", "metric", "qsd", "blockd", "blockd/qsd",
                      "target (blockd/qsd)"]
    # text columns left-aligned, numbers right-aligned, in Markdown's rule syntax
    rule = lines[1].strip("|").split("|")
    assert [r.endswith(":") for r in rule] == [False, False, False, True, True, True, False]
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first == ["file (tmpfs)", "4K rand read QD32 (qemu-img)", "IOPS",
                     "64.3k (56.4k-68.9k)", "128.6k (120.0k-130.0k)",
                     "2.00x (1.90x-2.10x)", ">=1.5x ok"]
    second = [c.strip() for c in lines[3].strip("|").split("|")]
    assert second == ["null-co", "nbdcopy -> null:", "MB/s", "16,709 (16,485-16,816)",
                      "-", "-", "-"]
    assert lines[2].index("64.3k") + len("64.3k (56.4k-68.9k)") == \
        lines[3].index("16,709") + len("16,709 (16,485-16,816)")  # right-aligned


def test_format_table_without_target_and_without_rows() -> None:
    text = nb.format_table(_rows()[:1], ["qsd", "blockd"], ["blockd/qsd"])
    assert "target" not in text
    assert text.splitlines()[0].count("|") == 7
    empty = nb.format_table([], ["qsd", "qsd#2"], ["qsd#2/qsd"])
    assert empty.splitlines()[0].split("|")[1].strip() == "backing"
    assert len(empty.splitlines()) == 2


def test_peer_labels_and_definitions() -> None:
    specs = nb.resolve_peers(["qsd", "qsd", "blockd"], {})
    assert [s.label for s in specs] == ["qsd", "qsd#2", "blockd"]
    assert specs[0].argv == ("qemu-storage-daemon",)
    assert specs[2].argv[1:3] == ("-m", "blockd")
    noacct = nb.resolve_peers(["blockd-noacct"], {})[0]
    assert noacct.env == {"BLOCKD_NO_ACCOUNTING": "1"}
    kit, qnbd = nb.resolve_peers(["nbdkit", "qemu-nbd"], {})  # bench/reference_peer.py
    assert kit.argv[1:] == (str(nb.REFERENCE_PEER), "nbdkit")
    assert qnbd.argv[1:] == (str(nb.REFERENCE_PEER), "qemu-nbd")
    assert nb.REFERENCE_PEER.is_file()
    name, argv, env = nb.parse_peer_definition("fast=X=1 Y='a b' /usr/bin/qsd --trace foo")
    assert (name, argv, env) == ("fast", ("/usr/bin/qsd", "--trace", "foo"),
                                 {"X": "1", "Y": "a b"})
    with pytest.raises(nb.BenchError):
        nb.resolve_peers(["nosuch"], {})


def test_cached_path_is_the_blockdev_filename() -> None:
    """Each round re-reads this path, so a reclaimed page cache is warm again."""
    assert nb.cached_path("driver=file,filename=/var/tmp/nbd-bench-x.img,locking=off") == (
        "/var/tmp/nbd-bench-x.img")
    assert nb.cached_path("driver=host_device,filename=/dev/loop7,locking=off") == "/dev/loop7"
    assert nb.cached_path("driver=null-co,size=1073741824,read-zeroes=on") is None
