"""The benchmark's statistics and table formatting (bench/nbd_bench.py): pure functions."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import benchscripts
import pytest

nb = benchscripts.load("nbd_bench")


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


# --------------------------------------------------------------------------------------
# Server CPU per request (speed issue, item 1)
# --------------------------------------------------------------------------------------


def test_stat_ticks_count_threads_and_waited_children() -> None:
    """utime+stime+cutime+cstime: a worker that exits mid-round still counts via its parent."""
    line = ("4242 (qemu (storage) d) S 17 4242 4242 0 -1 4194560 100 0 0 0 "
            "250 30 7 5 20 0 9 0 100 1000 200")
    assert nb.parse_stat(line) == (17, 250 + 30 + 7 + 5)


def test_tree_ticks_sum_the_peer_and_all_its_descendants() -> None:
    stats = {1: (0, 1000), 10: (1, 40), 11: (10, 5), 12: (11, 2), 20: (1, 900)}
    assert nb.tree_ticks(stats, 10) == 47  # not its parent, not its sibling 20
    assert nb.tree_ticks(stats, 12) == 2
    assert nb.tree_ticks(stats, 99) is None


def test_cpu_seconds_of_a_real_process_tree() -> None:
    """A shell whose grandchild burned CPU: the shell alone used ~0, its tree >= 0.07 s."""
    burn = ("import time, sys\nt = time.process_time() + 0.1\n"
            "while time.process_time() < t: pass\nprint(1, flush=True)\ntime.sleep(60)")
    proc = subprocess.Popen(["sh", "-c", f'{shlex.quote(sys.executable)} -c '
                             f'{shlex.quote(burn)}; exit'], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
        own = nb.parse_stat(Path(f"/proc/{proc.pid}/stat").read_text())[1]
        tree = nb._cpu_seconds(proc.pid)
        assert tree is not None and tree >= 0.07 > own / os.sysconf("SC_CLK_TCK")
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert nb._cpu_seconds(proc.pid) is None


def test_sample_cpu_per_request_and_per_mib() -> None:
    s = nb.Sample("blockd", "tmpfs", "rr4k-qd32", 0, 50_000.0, 204.8, 2.0, 2.1, 100_000,
                  1.42, 100_000, 100_000 * 4096)
    assert s.cpu_us_per_request() == pytest.approx(14.2)
    assert s.cpu_us_per_mib() == pytest.approx(14.2 * 256)
    assert s.server_cores() == pytest.approx(1.42 / 2.1)
    assert s.cpu_value("us/req") == s.cpu_us_per_request()
    # nbdcopy: no request count, so per MiB only; no CPU reading, no figure at all
    copy = nb.Sample("qsd", "tmpfs", "nbdcopy", 0, None, 3000.0, 1.0, 1.0, 3, 0.5, None,
                     3 * nb.GiB)
    assert copy.cpu_us_per_request() is None
    assert copy.cpu_us_per_mib() == pytest.approx(0.5e6 / 3072)
    gone = nb.Sample("qsd", "tmpfs", "rr4k-qd32", 0, 1.0, 1.0, 1.0, 1.0, 1, None, 1, 4096)
    assert gone.figures() == {"cpu_us_per_request": None, "cpu_us_per_mib": None,
                              "server_cores": None, "client_cores": None}
    assert s.client_cores() is None  # no client reading
    busy = nb.Sample("qsd", "tmpfs", "rr4k-qd32", 0, 1.0, 1.0, 2.0, 2.5, 1, 1.0, 1, 4096,
                     client_cpu_s=2.4)
    assert busy.client_cores() == pytest.approx(2.4 / 2.5)
    assert busy.figures()["client_cores"] == pytest.approx(0.96)


@pytest.mark.parametrize(("value", "unit", "text"), [
    (14.2, "us/req", "14.2"), (5.84, "us", "5.8"), (99.96, "us", "100"),
    (3640.4, "us/MiB", "3,640"), (0.456, "cores", "0.46"),
])
def test_fmt_cpu(value: float, unit: str, text: str) -> None:
    assert nb.fmt_quantity(value, unit) == text


def test_cpu_target_is_a_maximum() -> None:
    assert nb.target_mark(nb.Spread(0.5, 0.4, 0.6), 0.55, at_most=True) == "<=0.55x ok"
    assert nb.target_mark(nb.Spread(0.6, 0.5, 0.7), 0.55, at_most=True) == "<=0.55x MISS"
    assert nb.target_mark(None, 0.55, at_most=True) == "<=0.55x ?"


def _opts(peers: list[str], repeats: int = 2) -> object:
    wls = [nb.WORKLOADS["rr4k-qd32"], nb.WORKLOADS["nbdcopy"]]
    return nb.Options(["tmpfs"], wls, nb.resolve_peers(peers, {}), "qsd", repeats,
                      256 * nb.MiB, 1.0)


def _sample(peer: str, workload: str, rnd: int, iops: float, cpu_s: float) -> object:
    """A run of 100,000 4 KiB requests (or one 256 MiB nbdcopy) at the given IOPS."""
    if workload == "nbdcopy":
        return nb.Sample(peer, "tmpfs", workload, rnd, None, iops, 1.0, 1.0, 1, cpu_s,
                         None, 256 * nb.MiB)
    return nb.Sample(peer, "tmpfs", workload, rnd, iops, iops * 4096 / 1e6,
                     100_000 / iops, 100_000 / iops, 100_000, cpu_s, 100_000,
                     100_000 * 4096, client_cpu_s=0.9 * 100_000 / iops)


def _cpu_samples() -> list[object]:
    return [
        _sample("blockd", "rr4k-qd32", 0, 60_000.0, 1.0),   # 10 us/req
        _sample("qsd", "rr4k-qd32", 0, 50_000.0, 2.0),      # 20 us/req
        _sample("nbdkit", "rr4k-qd32", 0, 120_000.0, 0.5),  # 5 us/req
        _sample("blockd", "rr4k-qd32", 1, 66_000.0, 1.2),   # 12 us/req
        _sample("qsd", "rr4k-qd32", 1, 60_000.0, 1.5),      # 15 us/req
        _sample("nbdkit", "rr4k-qd32", 1, 132_000.0, 0.8),  # 8 us/req
        _sample("blockd", "nbdcopy", 0, 4000.0, 0.128),     # 500 us/MiB
        _sample("qsd", "nbdcopy", 0, 2000.0, 0.256),        # 1000 us/MiB
    ]


def test_ratios_include_blockd_against_nbdkit() -> None:
    assert nb.ratio_pairs(_opts(["blockd", "qsd", "nbdkit"])) == [
        ("blockd", "qsd"), ("nbdkit", "qsd"), ("blockd", "nbdkit")]
    assert nb.ratio_pairs(_opts(["blockd", "qsd"])) == [("blockd", "qsd")]


def test_cpu_rows_per_request_ratios_per_round_and_target() -> None:
    rows, labels, target = nb.build_cpu_rows(_opts(["blockd", "qsd", "nbdkit"]),
                                             _cpu_samples())
    assert labels == ["blockd/qsd", "nbdkit/qsd", "blockd/nbdkit"]
    assert target == "blockd/qsd"
    reads, copy = rows
    assert reads.metric == "us/req" and reads.target == 0.55
    assert reads.values["blockd"] == nb.Spread(pytest.approx(11.0), pytest.approx(10.0),
                                               pytest.approx(12.0))
    assert reads.values["qsd"].median == pytest.approx(17.5)
    # per round: 10/20 and 12/15; 10/5 and 12/8 (not median over median)
    assert reads.ratios["blockd/qsd"] == nb.Spread(pytest.approx(0.65), pytest.approx(0.5),
                                                   pytest.approx(0.8))
    assert reads.ratios["blockd/nbdkit"] == nb.Spread(pytest.approx(1.75),
                                                      pytest.approx(1.5), pytest.approx(2.0))
    assert copy.metric == "us/MiB" and copy.target is None
    assert copy.values["blockd"].median == pytest.approx(500.0)
    assert copy.values["nbdkit"] is None and copy.ratios["blockd/nbdkit"] is None
    assert copy.ratios["blockd/qsd"].median == pytest.approx(0.5)
    text = nb.format_table(rows, ["blockd", "qsd", "nbdkit"], labels, target, at_most=True)
    first = [c.strip() for c in text.splitlines()[2].strip("|").split("|")]
    assert first == ["file (tmpfs)", "4K rand read QD32 (qemu-img)", "us/req",
                     "11.0 (10.0-12.0)", "17.5 (15.0-20.0)", "6.5 (5.0-8.0)",
                     "0.65x (0.50x-0.80x)", "0.39x (0.25x-0.53x)", "1.75x (1.50x-2.00x)",
                     "<=0.55x MISS"]
    # the throughput table of the same samples: IOPS ratios, also blockd/nbdkit
    iops_rows, _, _ = nb.build_rows(_opts(["blockd", "qsd", "nbdkit"]), _cpu_samples())
    assert iops_rows[0].ratios["blockd/nbdkit"] == nb.Spread(
        pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))
    assert iops_rows[0].ratios["blockd/qsd"].median == pytest.approx((1.2 + 1.1) / 2)


def test_peer_rows_show_every_figure() -> None:
    rows = nb.build_peer_rows(_opts(["blockd", "qsd", "nbdkit"]), _cpu_samples())
    assert [(r.workload[:6], r.peer) for r in rows] == [
        ("4K ran", "blockd"), ("4K ran", "qsd"), ("4K ran", "nbdkit"),
        ("nbdcop", "blockd"), ("nbdcop", "qsd")]
    blockd = rows[0]
    assert blockd.iops == pytest.approx(63_000.0)
    assert blockd.mbps == pytest.approx(63_000.0 * 4096 / 1e6)
    assert blockd.cpu_us_per_request == pytest.approx(11.0)
    assert blockd.cpu_us_per_mib == pytest.approx(11.0 * 256)
    assert blockd.server_cores == pytest.approx((0.6 + 1.2 * 0.66) / 2)
    assert blockd.client_cores == pytest.approx(0.9)
    assert rows[3].cpu_us_per_request is None and rows[3].iops is None
    text = nb.format_peer_table(rows)
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "backing", "workload", "peer", "IOPS", "MB/s", "CPU us/req", "CPU us/MiB",
        "server cores", "client cores"]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "file (tmpfs)", "4K rand read QD32 (qemu-img)", "blockd", "63.0k", "258", "11.0",
        "2,816", "0.70", "0.90"]
    assert [c.strip() for c in lines[5].strip("|").split("|")][3:] == [
        "-", "4,000", "-", "500", "0.13", "-"]
    assert len({len(line) for line in lines}) == 1


def test_nbdkit_runs_by_default_where_it_can() -> None:
    assert nb.default_peers(["tmpfs"], lambda backings: None) == (
        ["blockd", "qsd", "nbdkit"], {})
    names, skipped = nb.default_peers(["tmpfs"], lambda backings: "nbdkit is not installed")
    assert names == ["blockd", "qsd"] and skipped == {"nbdkit": "nbdkit is not installed"}
    ns = nb.parse_args(["--backings", "tmpfs", "--peers", "blockd,qsd"])
    assert [p.label for p in nb.make_options(ns).peers] == ["blockd", "qsd"]
    opts = nb.make_options(nb.parse_args(["--backings", "tmpfs"]))
    if nb.nbdkit_missing(["tmpfs"]) is None:
        assert [p.label for p in opts.peers] == ["blockd", "qsd", "nbdkit"]
    else:
        assert "nbdkit" in opts.skipped


def test_run_client_reads_the_clients_own_cpu() -> None:
    spin = [sys.executable, "-c",
            "import time\nt = time.process_time() + 0.3\nwhile time.process_time() < t: pass"]
    _, wall, cpu = nb._run_client(spin)
    assert 0.25 <= cpu <= wall + 0.05
    _, wall, cpu = nb._run_client([sys.executable, "-c", "import time; time.sleep(0.3)"])
    assert wall >= 0.3 and cpu < 0.2  # waiting is not CPU
