"""Load with faults, bounded: bench/load_faults.py run for 20 s and its verdicts asserted.

The program (see bench/README.md) starts a real blockd, drives 16 NBD clients and 16 QMP
sessions against it, detaches a loop device under its clients, fills two small tmpfs
(werror=report, and werror=enospc with ``cont`` after space is freed), and then checks
every block against what was acknowledged, through a fresh NBD connection and in the
backing files after blockd has exited.  This test runs it once and checks its findings
one by one, so a failure names what broke.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PROGRAM = ROOT / "bench" / "load_faults.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if os.geteuid() != 0:
        pytest.skip("loop devices and tmpfs mounts need root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    out = tmp_path_factory.mktemp("load-faults") / "results.json"
    proc = subprocess.run(
        [sys.executable, str(PROGRAM), "--duration", "20", "--nbd-clients", "16",
         "--qmp-sessions", "16", "--hang-timeout", "20", "--json", str(out)],
        capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert out.exists(), f"no results (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    found: dict[str, Any] = json.loads(out.read_text())
    found["exit_status"] = proc.returncode
    found["stdout"] = proc.stdout
    return found


def verdict(results: dict[str, Any], name: str) -> None:
    v = results["verdicts"][name]
    assert v["ok"], f"{name}: {json.dumps(v, indent=1)}\n{results['stdout']}"


def test_no_acknowledged_write_is_lost(results: dict[str, Any]) -> None:
    """Every block read back (in the run, through a fresh connection, from the backing
    files after blockd exited) holds what was last acknowledged, or a failed write."""
    verdict(results, "no-lost-write")
    v = results["verdicts"]["no-lost-write"]
    assert v["blocks checked in the run"] > 0 and v["blocks checked in the backing files"] > 0


def test_the_daemon_survives_and_never_hangs(results: dict[str, Any]) -> None:
    verdict(results, "no-hang")
    verdict(results, "daemon-alive")


def test_faulted_requests_get_error_replies(results: dict[str, Any]) -> None:
    """ENOSPC comes back as an NBD error reply (never a disconnect), a paused device's
    requests are held and succeed after ``cont``, the detached loop device's clients are
    let go at once and a new connection to it is refused, and healthy devices see none
    of it."""
    verdict(results, "faulted-requests-clean")
    verdict(results, "enospc-stop-cycles")
    verdict(results, "healthy-devices-clean")
    errors = results["errors"]
    assert not any("disconnected" in k for k in errors), errors


def test_qmp_sessions_work_through_the_load(results: dict[str, Any]) -> None:
    verdict(results, "qmp-clean")
    assert results["latency_ms"]["qmp device_add"]["n"] > 0


def test_descriptors_and_memory_return_after_the_clients_leave(
        results: dict[str, Any]) -> None:
    verdict(results, "fds-back")
    verdict(results, "rss-back")


def test_every_verdict_passes(results: dict[str, Any]) -> None:
    """The program's own exit status agrees (and no verdict was added unchecked)."""
    assert results["exit_status"] == 0, results["stdout"]
