"""bench/nbd_bench.py's Peer: a peer defined on another tree runs that tree's blockd."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import benchscripts
import pytest

nb = benchscripts.load("nbd_bench")

# A stand-in for another checkout's blockd: says which tree it is, then looks ready.
FAKE_MAIN = '''
import socket, sys, time
argv = sys.argv
sock = argv[argv.index("--nbd-server") + 1].split("addr.path=")[1]
pidfile = argv[argv.index("--pidfile") + 1]
open(sys.argv[0] + ".ran", "w").write("other tree")
s = socket.socket(socket.AF_UNIX)
s.bind(sock)
open(pidfile, "w").write("1")
time.sleep(30)
'''


def test_a_peer_with_its_own_pythonpath_runs_that_tree_from_a_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m blockd`` puts the current directory first on sys.path: started from a
    checkout, a ``--peer base=PYTHONPATH=/other/tree ...`` would run the checkout's blockd.
    Peers start in the work directory, so the other tree's is the one that runs."""
    other = tmp_path / "other"
    (other / "blockd").mkdir(parents=True)
    (other / "blockd" / "__init__.py").write_text("")
    (other / "blockd" / "__main__.py").write_text(FAKE_MAIN)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(nb.REPO_ROOT)  # where the benchmark is usually run from
    spec = nb.PeerSpec("base", "base", (sys.executable, "-m", "blockd"),
                       {"PYTHONPATH": str(other)})
    peer = nb.Peer(spec, "driver=null-co,size=1M", work, "t")
    try:
        peer.start(timeout=20)
        assert (other / "blockd" / "__main__.py.ran").read_text() == "other tree"
    finally:
        if peer.proc is not None:
            peer.proc.kill()
            peer.proc.wait()
    assert os.getcwd() == str(nb.REPO_ROOT)
