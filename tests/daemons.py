"""Real daemon processes for tests: blockd and qemu-storage-daemon, with QMP clients."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient

ROOT = Path(__file__).resolve().parent.parent
# What blockd prints on stderr once its metrics endpoint listens.
_METRICS_LINE = re.compile(r"^blockd: metrics on (http://\S+)$", re.MULTILINE)


@dataclass
class DaemonProcess:
    """A blockd (or qemu-storage-daemon) started by a test, with its QMP socket."""

    proc: subprocess.Popen[bytes]
    qmp_path: str
    pidfile: str
    stderr_path: Path
    clients: list[QMPClient] = field(default_factory=list)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    @property
    def metrics_url(self) -> str:
        """The ``http://HOST:PORT/metrics`` URL blockd printed (start it with a
        ``metrics=`` address, e.g. ``127.0.0.1:0``); waits briefly for the line."""
        deadline = time.monotonic() + 10
        while True:
            found = _METRICS_LINE.search(self.stderr())
            if found:
                return found.group(1)
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"blockd printed no metrics URL: {self.stderr()}")
            time.sleep(0.02)

    async def client(self, name: str = "test") -> QMPClient:
        qmp = QMPClient(name)
        await qmp.connect(self.qmp_path)
        self.clients.append(qmp)
        return qmp

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start_daemon(argv: list[str], tmp: Path, name: str, timeout: float = 20) -> DaemonProcess:
    """Start ``argv`` (which must write ``--pidfile``) and wait until it is ready."""
    pidfile = str(tmp / f"{name}.pid")
    stderr_path = tmp / f"{name}.stderr"
    with open(stderr_path, "wb") as err:
        env = dict(os.environ, PYTHONPATH=str(ROOT))  # the blockd under test, installed or not
        proc = subprocess.Popen([*argv, "--pidfile", pidfile], stderr=err, stdout=err,
                                cwd=tmp, env=env)
    qmp_path = ""
    for i, arg in enumerate(argv):
        if arg == "--qmp":
            qmp_path = argv[i + 1]
        elif arg.startswith("socket,") and "path=" in arg:
            qmp_path = arg.split("path=", 1)[1].split(",", 1)[0]
    deadline = time.monotonic() + timeout
    while not os.path.exists(pidfile):
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {stderr_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not become ready: {stderr_path.read_text()}")
        time.sleep(0.02)
    return DaemonProcess(proc, qmp_path, pidfile, stderr_path)


def blockd_argv(*args: str, metrics: str = "none") -> list[str]:
    """``python -m blockd`` with ``args``.

    Metrics are off by default (``--metrics none``) so that parallel daemons do
    not compete for the default port 9580; pass ``metrics="127.0.0.1:0"`` for an
    endpoint on a free port (see :attr:`DaemonProcess.metrics_url`).  A
    ``--metrics`` in ``args`` wins (the last one counts).
    """
    return [sys.executable, "-m", "blockd", "--metrics", metrics, *args]


BlockdFactory = Callable[..., DaemonProcess]
