"""The VM tier's runner itself, on the host, without booting anything.

Not a VM group (no ``VM_HARDWARE``): these run in the ordinary outer pytest run.  They
check that inner results reach the outer report (a failure with its traceback, skips,
xfails, errors, tests the guest never reported, a failed boot), that the hardware
presets give the intended QEMU arguments, and that the witness client finds its session
in a byte stream that carries an earlier session's leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import guest
import pytest
from guest import GroupRun, Hardware, InnerResult, QMPStream, WitnessSockets

HERE = Path(__file__).resolve().parent
TRACEBACK = ("def test_b():\n>       assert 1 == 2\nE       assert 1 == 2\n\n"
             "test_x.py:7: AssertionError")


def rec(nodeid: str, when: str, outcome: str, **extra: Any) -> dict[str, Any]:
    return {"nodeid": nodeid, "when": when, "outcome": outcome, "longrepr": "",
            "reason": "", "wasxfail": None, "sections": [], "duration": 0.5, **extra}


def passed(nodeid: str) -> list[dict[str, Any]]:
    return [rec(nodeid, w, "passed") for w in ("setup", "call", "teardown")]


FABRICATED = [
    *passed("t.py::test_a"),
    rec("t.py::test_b", "setup", "passed"),
    rec("t.py::test_b", "call", "failed", longrepr=TRACEBACK,
        sections=[["Captured stdout call", "hello from the guest\n"]]),
    rec("t.py::test_b", "teardown", "passed"),
    rec("t.py::test_c", "setup", "skipped", reason="no /dev/sr0 here"),
    rec("t.py::test_c", "teardown", "passed"),
    rec("t.py::test_d", "setup", "failed", longrepr="fixture 'x' exploded"),
    rec("t.py::test_d", "teardown", "passed"),
    rec("t.py::test_e", "setup", "passed"),
    rec("t.py::test_e", "call", "skipped", wasxfail="tray quirk"),
    rec("t.py::test_e", "teardown", "passed"),
    rec("t.py::test_f[x-1]", "setup", "passed"),
    rec("t.py::test_f[x-1]", "call", "passed"),
    rec("t.py::test_f[x-1]", "teardown", "failed", longrepr="teardown broke"),
    {"nodeid": "", "when": "session", "outcome": "finished", "exitstatus": 1},
]


def test_aggregate_combines_the_phases_of_each_inner_test() -> None:
    results = guest.aggregate(FABRICATED)
    assert {k: v.outcome for k, v in results.items()} == {
        "t.py::test_a": "passed", "t.py::test_b": "failed", "t.py::test_c": "skipped",
        "t.py::test_d": "failed", "t.py::test_e": "xfailed", "t.py::test_f[x-1]": "failed"}
    assert results["t.py::test_a"].duration == pytest.approx(1.5)
    assert TRACEBACK in results["t.py::test_b"].message
    assert "hello from the guest" in results["t.py::test_b"].message
    assert "error in setup" in results["t.py::test_d"].message
    assert "error in teardown" in results["t.py::test_f[x-1]"].message
    assert results["t.py::test_c"].message == "no /dev/sr0 here"


def test_replay_fails_the_outer_test_with_the_inner_traceback() -> None:
    results = guest.aggregate(FABRICATED)
    guest.replay(results["t.py::test_a"])  # passes: returns
    with pytest.raises(pytest.fail.Exception) as failed:
        guest.replay(results["t.py::test_b"])
    assert TRACEBACK in str(failed.value)
    assert not failed.value.pytrace
    with pytest.raises(pytest.skip.Exception, match="no /dev/sr0 here"):
        guest.replay(results["t.py::test_c"])
    with pytest.raises(pytest.xfail.Exception, match="tray quirk"):
        guest.replay(results["t.py::test_e"])
    with pytest.raises(pytest.fail.Exception, match=r"(?s)reported nothing.*LOG TAIL"):
        guest.replay(None, "LOG TAIL")


def test_report_writer_lines_read_back(tmp_path: Path) -> None:
    path = tmp_path / "report.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FABRICATED) + '{"truncated": ')
    assert guest.read_report(path) == FABRICATED


# -- the whole outer path, in a separate pytest run with run_group replaced

FAKE_PLUGIN = '''
import json, os, time
import guest

def fake_run_group(module, nodeids, hardware, workdir, timeout=None):
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps({"module": module, "nodeids": list(nodeids),
                            "hardware": [h.id for h in hardware]}) + "\\n")
    mode = os.environ["FAKE_MODE"]
    if mode == "unavailable":
        raise guest.VMUnavailable("qemu-system-x86_64 is missing (test)")
    if mode == "hang":
        time.sleep(60)
    run = guest.GroupRun(module, log=workdir / "guest.log", boot_seconds=1.0)
    if mode == "bootfail":
        run.error = "the guest boot failed (vng exited 1)\\n---- tail ----\\nKernel panic XYZZY"
        return run
    records = json.loads(os.environ["FAKE_RECORDS"])
    run.results = guest.aggregate(records)
    return run

guest.run_group = fake_run_group
'''

GROUP_MODULE = '''
import pytest

VM_HARDWARE = ["atapi-cd", "scsi-hd"]

def test_a(vm): pass
@pytest.mark.tray
def test_b(vm, witness): pass
def test_c(vm): pass
@pytest.mark.parametrize("n", [1, 2])
def test_f(vm, n): pass
def test_never_reported(vm): pass
'''

OTHER_MODULE = '''
import pytest

pytestmark = pytest.mark.vm(hardware=["atapi-cd-empty"])

def test_one(vm): pass
'''


def run_fake(tmp_path: Path, mode: str, records: list[dict[str, Any]], *args: str,
             require: bool = False, strict: bool = False,
             **env_vars: str) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
    """A pytest run over a copy of this tier's conftest and a fabricated group
    (``strict``: with the skip policy of tests/allowed_skips.py, in strict mode)."""
    for name in ("conftest.py", "guest.py"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "fakevm.py").write_text(FAKE_PLUGIN)
    (tmp_path / "test_group.py").write_text(GROUP_MODULE)
    (tmp_path / "test_group_two.py").write_text(OTHER_MODULE)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    vm: a VM test\n    tray: a mark\n")
    calls = tmp_path / "calls.jsonl"
    calls.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in (guest.IN_VM_ENV, guest.REQUIRE_ENV, guest.STRICT_ENV, "PYTEST_ADDOPTS")}
    env.update(PYTHONPATH=str(tmp_path), FAKE_MODE=mode, FAKE_CALLS=str(calls),
               FAKE_RECORDS=json.dumps(records), **env_vars)
    if require:
        env[guest.REQUIRE_ENV] = "1"
    policy: list[str] = []
    if strict:
        env[guest.STRICT_ENV] = "1"
        env["PYTHONPATH"] += os.pathsep + str(HERE.parent)  # tests/allowed_skips.py
        policy = ["-p", "allowed_skips"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fakevm", *policy, "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"), "-rA",
         "--basetemp", str(tmp_path / "basetemp"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    made = [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []
    return proc, made


def test_outer_run_replays_inner_results(tmp_path: Path) -> None:
    m = "test_group.py"
    records = [
        *passed(f"{m}::test_a"),
        rec(f"{m}::test_b", "setup", "passed"),
        rec(f"{m}::test_b", "call", "failed", longrepr=TRACEBACK),
        rec(f"{m}::test_c", "setup", "skipped", reason="needs a disc"),
        *passed(f"{m}::test_f[1]"),
        rec(f"{m}::test_f[2]", "call", "skipped", wasxfail="known"),
        *passed("test_group_two.py::test_one"),
    ]
    proc, calls = run_fake(tmp_path, "ok", records, "-v")
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert "test_group.py::test_a PASSED" in out
    assert "test_group.py::test_b FAILED" in out
    assert "test_group.py::test_c SKIPPED" in out and "needs a disc" in out
    assert "test_group.py::test_f[1] PASSED" in out
    assert "test_group.py::test_f[2] XFAIL" in out
    assert "test_group.py::test_never_reported FAILED" in out
    assert "reported nothing for this test" in out
    assert "test_group_two.py::test_one PASSED" in out
    assert TRACEBACK in out  # the inner traceback is the outer failure's text
    # One boot per module, each with that module's hardware and selected tests.
    assert calls == [
        {"module": m, "hardware": ["cdrom0", "scsihd0"],
         "nodeids": [f"{m}::test_a", f"{m}::test_b", f"{m}::test_c", f"{m}::test_f[1]",
                     f"{m}::test_f[2]", f"{m}::test_never_reported"]},
        {"module": "test_group_two.py", "hardware": ["cdrom1"],
         "nodeids": ["test_group_two.py::test_one"]},
    ]
    assert "VM groups" in out


def test_outer_run_sends_only_the_selected_tests(tmp_path: Path) -> None:
    proc, calls = run_fake(tmp_path, "ok", passed("test_group.py::test_f[2]"),
                           "test_group.py", "-k", "test_f and 2")
    assert proc.returncode == 0, proc.stdout
    assert calls[0]["nodeids"] == ["test_group.py::test_f[2]"]
    # The tests' own marks select on the host too; every test of a group is marked vm.
    proc, calls = run_fake(tmp_path, "ok", passed("test_group.py::test_b"),
                           "test_group.py", "-m", "tray")
    assert proc.returncode == 0, proc.stdout
    assert calls[0]["nodeids"] == ["test_group.py::test_b"]
    proc, calls = run_fake(tmp_path, "ok", [], "-m", "not vm")
    assert proc.returncode == 5 and calls == [], proc.stdout  # nothing left to run


def test_boot_failure_fails_every_test_of_the_group(tmp_path: Path) -> None:
    proc, calls = run_fake(tmp_path, "bootfail", [], "test_group.py")
    assert proc.returncode == 1
    assert "6 failed" in proc.stdout
    assert proc.stdout.count("Kernel panic XYZZY") >= 6
    assert len(calls) == 1  # booted once, not once per test


def test_a_hung_group_fails_by_timeout_and_boots_once(tmp_path: Path) -> None:
    """Replay items have their own pytest-timeout (the group's limit plus a margin)."""
    group = str(2 - guest.REPLAY_TIMEOUT_MARGIN)  # the replay items' limit: 2 s
    proc, calls = run_fake(tmp_path, "hang", [], "test_group.py::test_a",
                           "test_group.py::test_c", **{guest.TIMEOUT_ENV: group})
    assert proc.returncode == 1, proc.stdout
    assert "Timeout (>2.0s) from pytest-timeout" in proc.stdout
    assert "2 failed" in proc.stdout and "the group's run was interrupted" in proc.stdout
    assert len(calls) == 1  # the second test did not boot the group again


def test_missing_vm_tools_skip_unless_required(tmp_path: Path) -> None:
    proc, _ = run_fake(tmp_path, "unavailable", [], "test_group_two.py")
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout and "qemu-system-x86_64 is missing" in proc.stdout
    proc, _ = run_fake(tmp_path, "unavailable", [], "test_group_two.py", require=True)
    assert proc.returncode == 1
    assert f"{guest.REQUIRE_ENV}=1" in proc.stdout and "1 failed" in proc.stdout


def test_strict_mode_fails_skips_from_the_guest(tmp_path: Path) -> None:
    """A skip inside the guest counts as a skip of the outer test: it fails unless allowed."""
    m = "test_group.py"
    records = [*passed(f"{m}::test_a"), rec(f"{m}::test_c", "setup", "skipped",
                                            reason="needs a disc")]
    proc, _ = run_fake(tmp_path, "ok", records, f"{m}::test_a", f"{m}::test_c", strict=True)
    assert proc.returncode == 1, proc.stdout
    assert f"FAILED {m}::test_c" in proc.stdout and "[guest] needs a disc" in proc.stdout
    assert f"{guest.STRICT_ENV}=1" in proc.stdout and "1 failed, 1 passed" in proc.stdout
    proc, _ = run_fake(tmp_path, "unavailable", [], "test_group_two.py", strict=True)
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout
    assert "VM tier unavailable: qemu-system-x86_64 is missing" in proc.stdout


# -- hardware presets


def test_presets_give_the_intended_qemu_devices(tmp_path: Path) -> None:
    hw = guest.resolve_hardware(["atapi-cd", "atapi-cd-empty", "scsi-cd", "scsi-hd",
                                 Hardware("scsi-cd", "mycd", "c")])
    images = {"a": tmp_path / "a.img", "c": tmp_path / "c.img", "scsihd0": tmp_path / "h.img"}
    args = guest.qemu_args(hw, images, WitnessSockets.in_dir(tmp_path))
    joined = " ".join(args)
    assert (f"-drive if=none,id=cd0,media=cdrom,file={tmp_path}/a.img,format=raw,readonly=on "
            "-device ide-cd,bus=ide.0,drive=cd0,id=cdrom0,serial=BLOCKD-cdrom0") in joined
    assert ("-drive if=none,id=cd1,media=cdrom "
            "-device ide-cd,bus=ide.1,drive=cd1,id=cdrom1,serial=BLOCKD-cdrom1") in joined
    assert args.count("virtio-scsi-pci,id=vscsi0") == 1
    hd = hw[3]
    assert hd.wwn is not None and hd.wwn >> 32 == 0x5000C500
    assert hd.wwn_text == f"0x{hd.wwn:016x}" and len(hd.wwn_text) == 18
    assert hd.wwn == guest.resolve_hardware(["scsi-hd"])[0].wwn  # stable
    assert Hardware("scsi-hd", "other").wwn != hd.wwn
    assert (f"file={tmp_path}/h.img,format=raw -device scsi-hd,bus=vscsi0.0,drive=shd0,"
            f"id=scsihd0,serial=BLOCKD-scsihd0,vendor=BLOCKD,product=SG-scsihd0,"
            f"wwn={hd.wwn_text} ") in joined
    assert Hardware("scsi-hd", "a123456789abcdef").product == "SG-a123456789abc"  # 16 chars
    assert hw[2].wwn is None and "vendor=" not in joined.split("-device scsi-cd", 1)[1][:80]
    assert "-device scsi-cd,bus=vscsi0.0,drive=mycd-drive,id=mycd" in joined
    assert f"name={guest.WITNESS_PORT},id={guest.WITNESS_QDEV}" in joined
    assert joined.count("-qmp unix:") == 2
    with pytest.raises(ValueError, match="unknown VM hardware preset"):
        guest.resolve_hardware(["floppy"])
    with pytest.raises(ValueError, match="distinct"):
        guest.resolve_hardware(["atapi-cd", "atapi-cd"])


def test_disc_images_are_recognizable(tmp_path: Path) -> None:
    path = guest.make_image(tmp_path / "b.img", "b", 8 * guest.SECTOR)
    data = path.read_bytes()
    assert len(data) == 8 * guest.SECTOR
    assert data[3 * guest.SECTOR:4 * guest.SECTOR] == guest.disc_sector("b", 3)
    assert guest.disc_sector("b", 3).startswith(b"BLOCKD-DISC b sector 00000003\n")
    assert guest.disc_sector("a", 3) != guest.disc_sector("b", 3)


# -- the witness's QMP client on a stream with an earlier session's leftovers


def test_qmp_stream_skips_leftovers_and_matches_replies_by_id() -> None:
    ours, emulator = socket.socketpair()
    seen: list[dict[str, Any]] = []

    def fake_emulator() -> None:
        emulator.sendall(b'{"event": "OLD", "data": {}}\r\n{"return": {}, "id": "stale"}\r\n'
                         b'{"event": "DEVICE_TRAY_MO')  # cut off: the old session ended
        emulator.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        f = emulator.makefile("rb")
        for _ in range(2):
            cmd = json.loads(f.readline())
            seen.append(cmd)
            if cmd["execute"] == "query-block":
                emulator.sendall(b'{"timestamp": {}, "event": "DEVICE_TRAY_MOVED", '
                                 b'"data": {"id": "cdrom0", "tray-open": true}}\r\n')
                emulator.sendall(json.dumps({"error": {"class": "GenericError", "desc": "no"},
                                             "id": "other"}).encode() + b"\r\n")
            emulator.sendall(json.dumps({"return": [], "id": cmd["id"]}).encode() + b"\r\n")

    t = threading.Thread(target=fake_emulator)
    t.start()
    try:
        qmp = QMPStream(ours.fileno())
        assert "QMP" in qmp.negotiate(timeout=5)
        assert qmp.events == []  # the old session's event is not ours
        assert qmp.execute("query-block", timeout=5) == []
        ev = qmp.wait_event("DEVICE_TRAY_MOVED", timeout=1, match={"id": "cdrom0"})
        assert ev["data"]["tray-open"] is True
        with pytest.raises(TimeoutError):
            qmp.wait_event("DEVICE_TRAY_MOVED", timeout=0.1)  # already taken
    finally:
        t.join(5)
        ours.close()
        emulator.close()
    assert [c["execute"] for c in seen] == ["qmp_capabilities", "query-block"]


def test_inner_result_defaults() -> None:
    assert InnerResult("x", "passed").message == ""
    assert GroupRun("m").result("x") is None
