"""The accounting micro-benchmark (bench/accounting_bench.py) runs and measures both paths."""

from __future__ import annotations

import re

import benchscripts
import pytest

ab = benchscripts.load("accounting_bench")


def test_fast_path_mode_times_reads_and_writes_with_and_without_accounting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert ab.main(["--fast-path", "--requests", "3000", "--repeats", "1"]) == 0
    rows = {m[0]: (float(m[1]), float(m[2]), float(m[3])) for m in re.findall(
        r"^(4K read|4K write)\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)$", capsys.readouterr().out, re.M)}
    assert set(rows) == {"4K read", "4K write"}
    for on, off, difference in rows.values():
        assert on > 0 and off > 0 and difference == pytest.approx(on - off, abs=0.11)


def test_the_fast_path_is_what_the_benchmark_times() -> None:
    # It raises if a request left the fast path: then it would time something else.
    import asyncio
    from pathlib import Path

    from blockd.block.stats import BlockAcctStats

    path = Path("/dev/shm") / "blockd-test-accounting-bench.img"
    path.write_bytes(b"")
    try:
        dev = asyncio.run(ab._fast_device(path, BlockAcctStats))
        with pytest.raises(RuntimeError, match="declined"):
            ab._time_fast(dev, False, 10)  # an empty file: every read is out of range
    finally:
        path.unlink()
