"""The skip policy of tests/allowed_skips.py: in strict mode a skip fails unless allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import allowed_skips
from allowed_skips import STRICT_ENV, AllowedSkip

HERE = Path(__file__).resolve().parent

SKIPPING = '''
import pytest

def test_unlisted():
    pytest.skip("no disc here")

def test_listed_and_applies():
    pytest.skip("the widget is missing")

@pytest.mark.skipif(True, reason="the gadget is missing")
def test_listed_elsewhere():
    pass

def test_listed_other_reason():
    pytest.skip("not root")

@pytest.mark.xfail(reason="a known bug")
def test_xfail():
    assert False

def test_passes():
    pass
'''

PLUGIN = '''
from allowed_skips import AllowedSkip
import allowed_skips

allowed_skips.ALLOWED_SKIPS = (
    AllowedSkip(("test_it.py::test_listed_and_applies", "test_it.py::test_listed_other_reason"),
                "widget", "the widget is missing", lambda: True),
    AllowedSkip(("test_it.py::test_listed_elsewhere",), "gadget", "no gadget", lambda: False),
    AllowedSkip(("test_whole.py::*",), "all of it", "always", lambda: True),
)
'''


def run(tmp_path: Path, strict: bool, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_it.py").write_text(SKIPPING)
    (tmp_path / "fakelist.py").write_text(PLUGIN)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k not in (STRICT_ENV, "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{HERE}"
    if strict:
        env[STRICT_ENV] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "allowed_skips", "-p", "fakelist",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "-c", str(tmp_path / "pytest.ini"),
         "-rA", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_without_strict_mode_skips_stay_skips(tmp_path: Path) -> None:
    proc = run(tmp_path, False, "test_it.py")
    assert proc.returncode == 0, proc.stdout
    assert "4 skipped" in proc.stdout and "1 xfailed" in proc.stdout


def test_strict_mode_fails_every_skip_the_list_does_not_allow(tmp_path: Path) -> None:
    proc = run(tmp_path, True, "test_it.py")
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "SKIPPED [1] test_it.py:8: the widget is missing" in out  # listed, condition holds
    assert "FAILED test_it.py::test_unlisted" in out
    assert "no entry for this test with this reason" in out
    assert "FAILED test_it.py::test_listed_other_reason" in out  # another reason than listed
    # A skip mark acts at setup: an error there; the condition does not hold.
    assert "ERROR test_it.py::test_listed_elsewhere" in out
    assert "only where no gadget: not so on this machine" in out
    assert "XFAIL test_it.py::test_xfail" in out and "PASSED test_it.py::test_passes" in out
    assert "2 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in out
    assert "tests/allowed_skips.py" in out and f"{STRICT_ENV}=1" in out


def test_strict_mode_fails_a_module_that_skips_whole(tmp_path: Path) -> None:
    (tmp_path / "test_mod.py").write_text(
        "import pytest\npytest.skip('no tools', allow_module_level=True)\n"
        "def test_x():\n    pass\n")
    (tmp_path / "test_whole.py").write_text(
        "import pytest\npytest.skip('all of it', allow_module_level=True)\n")
    proc = run(tmp_path, True, "test_mod.py", "test_whole.py")
    assert proc.returncode == 2, proc.stdout  # a collection error
    assert "ERROR test_mod.py" in proc.stdout and "skipped in strict mode" in proc.stdout
    assert "SKIPPED [1] test_whole.py:2: all of it" in proc.stdout


def test_entries_match_test_and_reason() -> None:
    entry = AllowedSkip(("tests/unit/test_uring.py::*",), "io_uring unavailable", "c",
                        lambda: True)
    assert entry.names("tests/unit/test_uring.py::test_nop[4]")
    assert entry.names("tests/unit/test_uring.py")  # the module as a whole
    assert not entry.names("tests/unit/test_uring_other.py::test_x")


def test_the_list_names_real_tests_and_real_reasons() -> None:
    """Every entry names test files that exist, with a reason their source gives."""
    root = HERE.parent
    for entry in allowed_skips.ALLOWED_SKIPS:
        for pattern in entry.tests:
            source = (root / pattern.split("::")[0]).read_text()
            assert any(part and part in source for part in entry.reason.split("|")), (
                f"{pattern}: no skip with reason {entry.reason!r} in its source")
        entry.holds()  # the check runs on this machine

