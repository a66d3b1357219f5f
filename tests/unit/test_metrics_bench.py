"""bench/metrics_bench.py's pure parts: the device config it generates, what it reads from
an exposition, and its tables."""

from __future__ import annotations

from pathlib import Path

import benchscripts

from blockd.daemon.config import load_config_file

mb = benchscripts.load("metrics_bench")


def test_devices_toml_is_a_blockd_config(tmp_path: Path) -> None:
    path = tmp_path / "devices.toml"
    path.write_text(mb.devices_toml(3, size=1 << 20))
    config = load_config_file(path)
    assert [b.args["node-name"] for b in config.blockdevs] == ["null0", "null1", "null2"]
    assert {b.args["driver"] for b in config.blockdevs} == {"null-co"}
    assert [(d.args["id"], d.args["drive"]) for d in config.devices] == [
        ("hd0", "null0"), ("hd1", "null1"), ("hd2", "null2")]


def test_exposition_summary_counts_samples_and_reads_gauges() -> None:
    body = (b"# HELP blockd_devices Devices.\n# TYPE blockd_devices gauge\n"
            b"blockd_devices 1001.0\n"
            b'blockd_device_io_now{device="hd0",node="null0"} 0.0\n'
            b"blockd_nbd_exports 1.0\n\n")
    assert mb.exposition_summary(body) == {"samples": 3, "blockd_devices": 1001.0,
                                           "blockd_nbd_exports": 1.0}


def test_scrape_table() -> None:
    r = mb.ScrapeResult(devices=1001, samples=89107, plain_bytes=7_552_000, gzip_bytes=1836,
                        gzip_served=True, plain_s=[0.9, 1.0, 1.2], gzip_s=[1.1, 1.3, 1.2],
                        server_cpu_s_per_scrape=1.0887, startup_s=0.51)
    lines = mb.format_scrape_table([r]).splitlines()
    assert lines[0].split("  ")[0] == "devices"
    assert lines[2].split() == ["1001", "89,107", "7,375", "KiB", "1,836", "B",
                                "1000.0", "(900.0-1200.0)", "1200.0", "(1100.0-1300.0)",
                                "1088.7", "0.5"]


def test_load_table_takes_ratios_within_rounds() -> None:
    samples = [mb.LoadSample(rnd, on, iops, 1.0, 5.0, cpu, 5 if on else 0,
                             [0.02] if on else [], [])
               for rnd, on, iops, cpu in [(0, False, 100.0, 4.0), (0, True, 90.0, 5.0),
                                          (1, True, 40.0, 5.0), (1, False, 50.0, 4.0)]]
    table = mb.format_load_table(samples, 2, "fio-rr4k-qd32", 1.0)
    row = table.splitlines()[2]
    assert "0.85x (0.80x-0.90x)" in row  # per-round 0.9 and 0.8, not 130/150
    assert "0.80/1.00" in row and "20.0 (20.0-20.0)" in row
    assert "scrapes every 1 s" in table.splitlines()[0]
