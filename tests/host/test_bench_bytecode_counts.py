"""bench/nbd_bytecodes.py counts a real blockd's bytecodes per request, served to qemu-img."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import benchscripts
import pytest

SCRIPT = benchscripts.BENCH / "nbd_bytecodes.py"
REQUESTS = 400


def test_a_write_to_tmpfs_is_counted_function_by_function(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    out = tmp_path / "counts.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--backing", "tmpfs", "--workloads", "rw4k-qd32",
         "--requests", str(REQUESTS), "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (per_request,) = json.loads(out.read_text())["bytecodes_per_request"].values()
    counts = per_request["rw4k-qd32"]
    by_name = {key.split(" (")[0]: value for key, value in counts.items()}
    # tmpfs is memory-backed: every write is written on the spot by Device.try_write,
    # once per request (a few bytecodes of spread from what the warm-up left behind).
    assert 20 < by_name["Device.try_write"] < 200
    assert "Device.write_on_ring" not in by_name
    assert by_name["NbdServerConnection.next_io"] > 20  # the parser ran for each
    total = sum(counts.values())
    assert 150 < total < 5000, total
    assert f"{total:,.0f} bytecodes per request" in done.stdout
