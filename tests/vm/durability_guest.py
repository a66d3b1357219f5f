"""The guest's half of the power-cut test (tests/vm/test_vm_durability.py).

Run in the guest as ``python tests/vm/durability_guest.py SHARED``.  It reads the plan
the host wrote (``SHARED/plan.json``), starts blockd with one writable NBD export per
disk, writes through libnbd as planned, and the instant the last acknowledgement of a
scenario arrives it sends ``stop`` to the emulator over the witness port: from then on
the guest executes nothing, so whatever blockd left in the guest's page cache never
reaches the disk.  The host snapshots the images, then resumes the guest (``cont``) or
kills the emulator.  What the host must know that the plan does not say (the export
flags, errors) is written to ``SHARED/guest.jsonl``.

Shared with the host side: :func:`pattern` (the bytes of a planned write).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

# Writeback off in the guest: dirty pages stay dirty until someone syncs them, so an
# acknowledgement blockd gave without syncing can never be rescued by the kernel before
# the cut (the strictest power cut).  Periodic writeback is off; background writeback
# starts when a disk holds more dirty pages than its share of the background limit,
# and a disk that never wrote has a share of 0 (seen: the first 68 KiB written back at
# once), so each disk gets a guaranteed share (its bdi's min_ratio, in percent) larger
# than the whole disk.
WRITEBACK_SYSCTLS = {"vm/dirty_writeback_centisecs": "0",
                     "vm/dirty_expire_centisecs": "360000"}
BDI_MIN_RATIO = 20


def pattern(seed: int, length: int) -> bytes:
    """The bytes of a planned write: random, so no write resembles the image under it."""
    return random.Random(seed).randbytes(length)


class Journal:
    """Lines for the host in SHARED/guest.jsonl, each fsynced before going on."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, **record: Any) -> None:
        record["uptime"] = Path("/proc/uptime").read_text().split()[0]
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def kernel_view(disks: dict[str, str]) -> dict[str, Any]:
    """The guest kernel's dirty memory and the sectors it wrote to each disk."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    view: dict[str, Any] = {k: meminfo[k].strip() for k in ("Dirty", "Writeback")}
    for name, node in disks.items():
        fields = Path(f"/sys/block/{Path(node).name}/stat").read_text().split()
        view[f"{name}_sectors_written"] = int(fields[6])
    return view


def main(shared: Path) -> int:
    journal = Journal(shared / "guest.jsonl")
    try:
        run(shared, journal)
    except BaseException:
        journal.write(error=traceback.format_exc())
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return 1
    return 0


def run(shared: Path, journal: Journal) -> None:
    from guest import VM, Witness

    plan = json.loads((shared / "plan.json").read_text())
    # Only the disks' drivers: no udevd (its probes would only add I/O); the disks are
    # found by the serial number the kernel read (VPD page 0x80 in sysfs).
    subprocess.run(["modprobe", "-a", "virtio_scsi", "sd_mod"], check=True)
    for name, value in WRITEBACK_SYSCTLS.items():
        Path("/proc/sys", name).write_text(value)
    vm = VM.from_manifest(shared / "manifest.json")
    disks = {name: vm.device(spec["disk"]).node for name, spec in plan["exports"].items()}
    for node in disks.values():
        Path(f"/sys/block/{Path(node).name}/bdi/min_ratio").write_text(f"{BDI_MIN_RATIO}\n")
    journal.write(step="devices", nodes=disks)

    from daemons import blockd_argv, start_daemon
    from nbdclients import libnbd, uri

    nbd = libnbd()
    tmp = Path("/tmp/blockd-durability")  # the guest's tmpfs: no UNIX sockets on 9p
    tmp.mkdir(exist_ok=True)
    nbd_sock = str(tmp / "nbd.sock")
    args = ["--qmp", str(tmp / "qmp.sock"),
            "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}"]
    for name, spec in plan["exports"].items():
        node = f"driver=host_device,node-name={name},filename={disks[name]}"
        if spec.get("no_flush"):
            node += ",cache.no-flush=on"
        args += ["--blockdev", node,
                 "--export", f"type=nbd,id={name},node-name={name},name={name},writable=on"]
    daemon = start_daemon(blockd_argv(*args), tmp, "blockd", timeout=180)
    journal.write(step="blockd", argv=args)

    handles: dict[tuple[str, int], Any] = {}
    flags: dict[str, dict[str, bool]] = {}
    for name, spec in plan["exports"].items():
        for conn in range(spec["connections"]):
            h = nbd.NBD()
            h.connect_uri(uri(nbd_sock, name))
            handles[name, conn] = h
        h = handles[name, 0]
        flags[name] = {"can_multi_conn": bool(h.can_multi_conn()), "can_fua": bool(h.can_fua()),
                       "can_flush": bool(h.can_flush()), "read_only": bool(h.is_read_only())}
    journal.write(step="connected", flags=flags)

    witness = Witness()
    journal.write(step="witness")
    for step in plan["steps"]:
        export = step["export"]
        for conn, offset, length, seed, fua in step["writes"]:
            handles[export, conn].pwrite(pattern(seed, length), offset,
                                         nbd.CMD_FLAG_FUA if fua else 0)
        if step["flush"] is not None:
            handles[export, step["flush"]].flush()
        if step["cut"]:
            # The last acknowledgement is in: stop the machine now (the reply to
            # ``stop`` arrives only if the host resumes it).
            witness.execute("stop", timeout=600)
        journal.write(step="done", name=step["name"], resumed=step["cut"],
                      kernel=kernel_view(disks))
    journal.write(step="finished")
    # The host kills the emulator at the last cut; nothing here runs after it.
    time.sleep(600)
    daemon.stop()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
