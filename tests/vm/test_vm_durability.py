"""No acknowledged NBD write is lost in a power cut (hardening issue, item 7).

A host-side test that boots its own guest (``guest.boot_guest``), because the guest
must not survive it.  Inside the guest blockd exports four virtio-scsi disks
(``scsi-hd``, each backed by a host image file) through ``host_device`` with blockd's
default buffered I/O (``cache.direct=off``), so a write it has not synced sits in the
guest's page cache, and periodic writeback is off there, so nothing rescues it.  A
libnbd client in the guest (``durability_guest.py``) writes; the instant the last
acknowledgement of a scenario arrives it sends ``stop`` to the emulator through the
witness port, and the guest executes nothing more.  The host then reads the image
files, the backing as it sees it, and compares them byte by byte with the writes
acknowledged:

1. ``fua0``: FUA writes; the cut follows the last FUA acknowledgement.
2. ``flush0``: writes without FUA, then a flush; the cut follows the flush's.
3. ``multi0``: writes without FUA on connection A, then a flush on connection B (blockd
   advertises NBD_FLAG_CAN_MULTI_CONN); the cut follows B's flush.  This cut is the
   real one: the emulator gets SIGKILL while stopped and the images are read again.
4. ``canary0``, before all of them: FUA writes and a flush on an export with
   ``cache.no-flush=on``, i.e. a blockd that acknowledges without syncing.  They must
   be missing at every cut: proof that the cut loses what blockd did not make durable,
   so the other checks can fail.

The first two cuts resume the guest (``cont``) so one boot serves every scenario.  A
stopped guest runs no instruction, the emulator drains the disk requests in flight when
it stops, and a killed emulator's writes survive in the host's page cache, so the images
read while stopped are what a kill at that instant leaves; the last cut checks exactly
that (snapshot while stopped == images after SIGKILL).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import guest
import pytest
from durability_guest import pattern
from guest import HD_SIZE, SECTOR, BootedGuest, Hardware, QMPStream, VMUnavailable, disc_sector

DISKS = ("canary0", "fua0", "flush0", "multi0")
HARDWARE = [Hardware("scsi-hd", d, drive=f"drv-{d}") for d in DISKS]
GUEST_SCRIPT = Path(__file__).resolve().parent / "durability_guest.py"
# Boot (15-35 s), guest setup, blockd's start (5-30 s under TCG) and the writes.
FIRST_CUT_WITHIN = 420
CUT_WITHIN = 120


@dataclass(frozen=True)
class Write:
    conn: int
    offset: int
    length: int
    seed: int
    fua: bool


def plan_writes(name: str, count: int, fua: bool, conn: int = 0) -> list[Write]:
    """``count`` writes of mixed sizes and alignments (some overlap: the last one wins)."""
    rng = random.Random(name)
    writes = []
    for _ in range(count):
        length = rng.choice([512, 4096, 65536, 1 << 20, rng.randrange(1, 9000)])
        offset = rng.randrange(0, HD_SIZE - length)
        if rng.random() < 0.5:
            offset -= offset % 4096
        writes.append(Write(conn, offset, length, rng.getrandbits(32), fua))
    return writes


# One step per export, in order; "cut": stop the machine at its last acknowledgement.
STEPS: list[dict[str, Any]] = [
    {"name": "canary", "export": "canary0", "writes": plan_writes("canary", 8, fua=True),
     "flush": 0, "cut": False},
    {"name": "fua", "export": "fua0", "writes": plan_writes("fua", 16, fua=True),
     "flush": None, "cut": True},
    {"name": "flush", "export": "flush0", "writes": plan_writes("flush", 32, fua=False),
     "flush": 0, "cut": True},
    {"name": "multi-conn", "export": "multi0",
     "writes": plan_writes("multi", 24, fua=False, conn=0), "flush": 1, "cut": True},
]
EXPORTS = {"canary0": {"disk": "canary0", "connections": 1, "no_flush": True},
           "fua0": {"disk": "fua0", "connections": 1},
           "flush0": {"disk": "flush0", "connections": 1},
           "multi0": {"disk": "multi0", "connections": 2}}


def initial_image(disk: str) -> bytes:
    return b"".join(disc_sector(disk, n) for n in range(HD_SIZE // SECTOR))


def expected_image(disk: str, steps: list[dict[str, Any]]) -> bytes:
    """The image once every write of ``steps`` to ``disk`` is durable, in order."""
    image = bytearray(initial_image(disk))
    for step in steps:
        if step["export"] == disk:
            for w in step["writes"]:
                image[w.offset:w.offset + w.length] = pattern(w.seed, w.length)
    return bytes(image)


def first_difference(a: bytes, b: bytes) -> int:
    lo, hi = 0, len(a)
    while hi - lo > 1:  # a[:lo] == b[:lo] holds throughout
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo if a[lo] != b[lo] else hi


class Host:
    """The host's view: the guest, its emulator's monitor, the plan, what was checked."""

    def __init__(self, g: BootedGuest, monitor: QMPStream) -> None:
        self.g = g
        self.monitor = monitor

    def journal(self) -> list[dict[str, Any]]:
        path = self.g.shared / "guest.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def context(self) -> str:
        lines = [json.dumps(r)[:3000] for r in self.journal()]
        return "guest journal:\n" + "\n".join(lines) + "\n" + self.g.tail()

    def wait_stop(self, within: float) -> float:
        """Wait for the guest's ``stop``; return when it came (seconds since boot)."""
        deadline = time.monotonic() + within
        while True:
            try:
                self.monitor.wait_event("STOP", timeout=2)
                break
            except TimeoutError:
                errors = [r["error"] for r in self.journal() if "error" in r]
                if errors or not self.g.alive() or time.monotonic() > deadline:
                    pytest.fail(f"the guest never cut the power ({len(errors)} errors)\n"
                                + self.context(), pytrace=False)
        # Answered once the stop has completed, i.e. the requests in flight drained.
        assert self.monitor.execute("query-status")["status"] == "paused"
        return time.monotonic() - self.g.t0

    def images(self) -> dict[str, bytes]:
        return {d: self.g.images[d].read_bytes() for d in DISKS}

    def check(self, images: dict[str, bytes], done: list[dict[str, Any]], when: str,
              ) -> list[str]:
        """Every acknowledged write of ``done`` is in its image, the canary holds none:
        what differs, one line per image."""
        failures = []
        for disk in DISKS:
            if disk == "canary0":
                want, what = initial_image(disk), "nothing of the unsynced canary writes"
            else:
                want, what = expected_image(disk, done), "every acknowledged write"
            have = images[disk]
            if have != want:
                at = first_difference(have, want)
                hits = [f"{s['name']}#{i} {w}" for s in done if s["export"] == disk
                        for i, w in enumerate(s["writes"])
                        if w.offset <= at < w.offset + w.length]
                failures.append(f"{when}: {disk}'s image should hold {what}, but differs "
                                f"at byte {at} (written by: {hits or 'no write'})")
        return failures


def _plan_json() -> str:
    steps = [dict(s, writes=[[w.conn, w.offset, w.length, w.seed, w.fua] for w in s["writes"]])
             for s in STEPS]
    return json.dumps({"exports": EXPORTS, "steps": steps}, indent=1)


@pytest.mark.vm
@pytest.mark.timeout(FIRST_CUT_WITHIN + 3 * CUT_WITHIN + 60)
def test_acknowledged_writes_survive_a_power_cut(tmp_path: Path) -> None:
    """FUA, flush and another connection's flush: acknowledged means in the backing."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "plan.json").write_text(_plan_json())
    try:
        g = guest.boot_guest(HARDWARE, tmp_path,
                             lambda sh: [sys.executable, str(GUEST_SCRIPT), str(sh)])
    except VMUnavailable as e:
        if os.environ.get(guest.REQUIRE_ENV) == "1":
            pytest.fail(f"VM tier required ({guest.REQUIRE_ENV}=1) but unavailable: {e}")
        pytest.skip(f"VM tier unavailable: {e}")
    sock = None
    try:
        sock, monitor = g.connect_monitor()
        host = Host(g, monitor)
        cache = {b["device"]: b["inserted"]["cache"] for b in monitor.execute("query-block")
                 if b["device"].startswith("drv-")}
        print(f"emulator's cache modes of the disks: {cache}")
        done: list[dict[str, Any]] = []
        failures: list[str] = []
        cuts = [s for s in STEPS if s["cut"]]
        for step in STEPS:
            done.append(step)
            if not step["cut"]:
                continue
            at = host.wait_stop(FIRST_CUT_WITHIN if step is cuts[0] else CUT_WITHIN)
            snapshot = host.images()
            lost = host.check(snapshot, done, f"stopped after {step['name']}")
            failures += lost
            print(f"cut after {step['name']} at {at:.1f} s: "
                  + ("; ".join(lost) if lost else "images as acknowledged"))
            if step is cuts[0]:
                # What every writable export advertised to the guest's client.
                flags = next(r["flags"] for r in host.journal()
                             if r.get("step") == "connected")
                for export, f in flags.items():
                    assert f == {"can_multi_conn": True, "can_fua": True, "can_flush": True,
                                 "read_only": False}, (export, f)
            if step is not cuts[-1]:
                monitor.execute("cont")
                continue
            # The real power cut: the emulator dies while the guest is stopped.
            os.kill(g.emulator_pid(), signal.SIGKILL)
            assert g.wait(60) is not None, "vng did not end after its emulator was killed"
            after = host.images()
            failures += host.check(after, done, "after SIGKILL")
            assert after == snapshot, "the images changed between the stop and the kill"
        writes = [w for s in STEPS for w in s["writes"]]
        print(f"{len(writes)} writes, {sum(w.length for w in writes)} bytes; "
              f"group took {time.monotonic() - g.t0:.1f} s")
        if failures:
            pytest.fail("acknowledged writes lost (or the cut lost nothing):\n"
                        + "\n".join(failures) + "\n" + host.context(), pytrace=False)
    finally:
        if sock is not None:
            sock.close()
        g.close()
