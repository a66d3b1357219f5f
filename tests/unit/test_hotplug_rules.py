"""Hotplug rules: parsing, matching (first match wins), templates; the protected-device set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockd.hotplug import safety
from blockd.hotplug.rules import (
    ExportRule,
    RuleError,
    Seen,
    first_match,
    parse_rules,
    render,
)


def seen(kernel: str = "loop3", **props: str) -> Seen:
    properties = {"SUBSYSTEM": "block", "DEVNAME": f"/dev/{kernel}", "DEVTYPE": "disk",
                  **props}
    attrs = {"size": "2048", "ro": "0", "removable": "0"}
    return Seen(properties, kernel, f"/dev/{kernel}", attrs.get)


def test_defaults_are_safe() -> None:
    (rule,) = parse_rules([{"match": {"DEVNAME": "/dev/loop*"}}])
    assert rule.action == "attach" and rule.read_only is True
    assert rule.driver == "auto" and rule.id == "{kernel}" and rule.node_name == "{id}-node"
    assert rule.export is None and rule.label == "rule 1"
    assert (rule.rerror, rule.werror) == ("auto", "auto")


def test_first_match_wins_and_globs_must_all_hold() -> None:
    rules = parse_rules([
        {"match": {"DEVNAME": "/dev/loop7"}, "action": "ignore", "name": "not-seven"},
        {"match": {"SUBSYSTEM": "block", "DEVNAME": "/dev/loop*"}, "read-only": False},
        {"match": {}, "name": "catch-all"},
    ])
    assert first_match(rules, seen("loop7")).label == "not-seven"  # type: ignore[union-attr]
    assert first_match(rules, seen("loop3")).index == 2  # type: ignore[union-attr]
    assert first_match(rules, seen("sda", DEVNAME="/dev/sda")).label == "catch-all"  # type: ignore[union-attr]
    assert first_match(rules[:2], seen("sda", DEVNAME="/dev/sda")) is None
    # Case matters, as in udev's own rules.
    assert first_match(parse_rules([{"match": {"DEVNAME": "/dev/LOOP*"}}]), seen()) is None


def test_attributes_and_missing_properties() -> None:
    rules = parse_rules([{"match": {"ATTR{size}": "2048", "ID_BUS": "usb"}},
                         {"match": {"ATTR{removable}": "1"}},
                         {"match": {"ATTR{size}": "20?8"}}])
    assert first_match(rules, seen()).index == 3  # type: ignore[union-attr]
    assert first_match(rules, seen(ID_BUS="usb")).index == 1  # type: ignore[union-attr]


def test_driver_auto() -> None:
    (rule,) = parse_rules([{"match": {}}])
    assert rule.driver_for(seen()) == "host_device"
    assert rule.driver_for(seen("sr0", ID_CDROM="1")) == "host_cdrom"
    assert rule.driver_for(seen("sg1", SUBSYSTEM="scsi_generic")) == "sg"
    (fixed,) = parse_rules([{"match": {}, "driver": "host_device"}])
    assert fixed.driver_for(seen("sr0", ID_CDROM="1")) == "host_device"


def test_templates() -> None:
    s = seen("sdb", ID_SERIAL="WDC_WD10EZEX-08W_WD-WCC6Y1234567", ID_MODEL="disk:1")
    assert render("{kernel}", s) == "sdb"
    assert render("usb-{ID_SERIAL}", s) == "usb-WDC_WD10EZEX-08W_WD-WCC6Y1234567"
    assert render("{ID_MODEL}", s) == "disk_1"  # ':' is not allowed in a QEMU id
    assert render("{devname}", s) == "d_dev_sdb"  # must start with a letter
    assert render("n-{id}", s, id="cd0") == "n-cd0"
    long = render("{ID_SERIAL}-{ID_SERIAL}", s, limit=31)
    assert len(long) == 31 and long.startswith("WDC_WD10EZEX-08W_WD-W")
    assert long != render("{ID_SERIAL}-{ID_SERIAL}x", s, limit=31)  # a hash keeps them apart
    with pytest.raises(KeyError, match="ID_WWN"):
        render("{ID_WWN}", s)


@pytest.mark.parametrize(("table", "message"), [
    ({"match": {"SUBSYSTEM": 1}}, "match: expected a table of strings"),
    ({"match": {"bad key": "x"}}, "neither a udev property nor ATTR"),
    ({"match": {}, "action": "detach"}, "action: expected one of attach, ignore"),
    ({"match": {}, "driver": "file"}, "driver: expected one of auto"),
    ({"match": {}, "read-only": "no"}, "read-only: expected true or false"),
    ({"match": {}, "id": "{id}-x"}, r"id: \{id\} cannot be used here"),
    ({"match": {}, "id": ""}, "id: expected a non-empty template"),
    ({"match": {}, "id": "{kernel"}, "template"),
    ({"match": {}, "rerror": "explode"}, "rerror: expected one of"),
    ({"match": {}, "export": {"writable": True}}, "needs read-only = false"),
    ({"match": {}, "export": {"port": 1}}, "export.port: unknown key"),
    ({"match": {}, "colour": "red"}, "colour: unknown key"),
    ({"match": {}, "node-name": "{id}"}, "node-name: must differ from the device id"),
    ({"match": {}, "id": "x-{kernel}", "node-name": "x-{kernel}"}, "must differ"),
])
def test_bad_rules_say_what_is_wrong(table: dict[str, object], message: str) -> None:
    with pytest.raises(RuleError, match=message) as caught:
        parse_rules([{"match": {}}, table])
    assert str(caught.value).startswith("[[hotplug.rule]] #2: ")


def test_export_rule() -> None:
    (rule,) = parse_rules([{"match": {}, "read-only": False,
                            "export": {"name": "{kernel}", "writable": True}}])
    assert rule.export == ExportRule(name="{kernel}", writable=True)
    with pytest.raises(RuleError, match="array of tables"):
        parse_rules({"match": {}})


# -- protected devices -----------------------------------------------------------------


def fake_sys(tmp: Path) -> tuple[Path, Path]:
    """A sysfs with sda (sda1 mounted), sdb, loop0, dm-0 built on sdc2, and sg0 -> sdb."""
    sys, proc = tmp / "sys", tmp / "proc"
    devices = sys / "devices"

    def disk(name: str, num: str, parts: dict[str, str] | None = None) -> Path:
        d = devices / name
        d.mkdir(parents=True)
        (d / "dev").write_text(num + "\n")
        (d / "holders").mkdir()
        for part, pnum in (parts or {}).items():
            p = d / part
            p.mkdir()
            (p / "dev").write_text(pnum + "\n")
            (p / "partition").write_text("1\n")
            (p / "holders").mkdir()
            link_block(part, p)
        link_block(name, d)
        return d

    def link_block(name: str, target: Path) -> None:
        for where in (sys / "class" / "block" / name,
                      sys / "dev" / "block" / (target / "dev").read_text().strip()):
            where.parent.mkdir(parents=True, exist_ok=True)
            where.symlink_to(target)

    disk("sda", "8:0", {"sda1": "8:1", "sda2": "8:2"})
    sdb = disk("sdb", "8:16")
    sdc = disk("sdc", "8:32", {"sdc1": "8:33", "sdc2": "8:34"})
    disk("loop0", "7:0")
    dm = disk("dm-0", "253:0")
    (dm / "slaves").mkdir()
    (dm / "slaves" / "sdc2").symlink_to(sdc / "sdc2")
    (sdc / "sdc2" / "holders" / "dm-0").symlink_to(dm)
    sg = sys / "class" / "scsi_generic" / "sg0" / "device" / "block"
    sg.mkdir(parents=True)
    (sg / "sdb").symlink_to(sdb)
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "23 22 0:21 / /proc rw shared:2 - proc proc rw\n")
    (proc / "swaps").write_text("Filename Type Size Used Priority\n")
    return sys, proc


def test_protected_devices(tmp_path: Path) -> None:
    sys, proc = fake_sys(tmp_path)
    taken = safety.protected(proc, sys)
    # sda1 is mounted: sda and all its partitions.  dm-0 sits on sdc2: sdc and its
    # partitions, and dm-0 itself (it has a holder chain of its own).
    assert {"8:0", "8:1", "8:2", "8:32", "8:33", "8:34"} <= taken
    assert "8:16" not in taken and "7:0" not in taken
    assert safety.scsi_generic_disks("sg0", sys) == {"8:16"}
    assert safety.scsi_generic_disks("sg9", sys) == set()


def test_protected_on_this_machine_holds_the_root_filesystem() -> None:
    root = os.stat("/").st_dev
    taken = safety.protected()
    # The root filesystem's device, when it is a real block device (not overlay/tmpfs).
    if os.major(root) != 0:
        assert f"{os.major(root)}:{os.minor(root)}" in taken
