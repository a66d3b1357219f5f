"""contrib/'s deployment files, checked by the tools that read them.

* the systemd unit (and its scsi-passthrough drop-in): ``systemd-analyze verify`` and
  ``systemd-analyze security --offline``;
* the udev rule: ``udevadm test`` on a real loop device in a private mount namespace,
  with a stand-in rules file giving the device the properties of a CD drive (or of a
  disk with a serial), so the rule's effects are seen as udev computes them;
* the example configuration and the DaemonSet's: loaded by blockd's own config loader,
  their hotplug rules tried on the devices they are meant for;
* the Kubernetes manifests: ``kubernetes-validate --strict`` (offline JSON schemas);
* the fleet Prometheus configuration: ``promtool check config``, its relabelling
  replayed on a discovered pod and on file_sd targets.

Every tool is installed by ``./dev test`` (Debian: systemd, udev, prometheus; PyPI:
kubernetes-validate); in CI (strict skips) a missing tool fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from allowed_skips import strict

from blockd.daemon.config import load_config_file, parse_command_line
from blockd.hotplug.rules import NODE_NAME_MAX, Rule, Seen, first_match, render

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
UNIT = CONTRIB / "blockd.service"
PASSTHROUGH_DROPIN = CONTRIB / "blockd.service.d" / "scsi-passthrough.conf"
UDEV_RULES = CONTRIB / "udev" / "61-blockd.rules"
EXAMPLE_CONFIG = CONTRIB / "blockd.toml.example"
DAEMONSET = CONTRIB / "kubernetes" / "blockd-daemonset.yaml"
FLEET_CONFIG = CONTRIB / "prometheus" / "prometheus-fleet.yml"
FLEET_TARGETS = CONTRIB / "prometheus" / "blockd-targets.yml"
ALERT_RULES = CONTRIB / "blockd-alerts.yml"
METRICS_PORT = 9580


def need_tool(name: str, package: str) -> str:
    """The tool's path; without it, a skip (a failure in CI, where ./dev installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({package}; ./dev test installs it)"
        if strict() or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          **kwargs)


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}{result.stderr}"


# --------------------------------------------------------------------------------------
# systemd unit
# --------------------------------------------------------------------------------------

INSTALLED_EXEC_START = "/usr/local/bin/blockd --config /etc/blockd/blockd.toml"


def unit_options(*paths: Path) -> dict[str, list[str]]:
    """Key -> values (in order) of the [Service] sections of a unit and its drop-ins."""
    options: dict[str, list[str]] = {}
    for path in paths:
        section = ""
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line
                continue
            key, _, value = line.partition("=")
            options.setdefault(f"{section}{key}", []).append(value)
    return options


def verify_unit(tmp_path: Path, *dropins: Path, extra: str = "") -> str:
    """``systemd-analyze verify blockd.service`` with contrib's unit (unchanged) and
    drop-ins; returns what it said about blockd (nothing when clean).

    The unit runs /usr/local/bin/blockd, where ``pip install`` as root puts it; here a
    drop-in points ExecStart at this virtualenv's blockd instead (verify checks that
    the program exists), the way the unit's header tells operators to.
    """
    analyze = need_tool("systemd-analyze", "Debian package systemd")
    blockd = Path(sys.executable).parent / "blockd"
    assert blockd.exists(), f"{blockd}: blockd is not installed in this virtualenv"
    units = tmp_path / "units"
    dropin_dir = units / "blockd.service.d"
    dropin_dir.mkdir(parents=True)
    (units / "blockd.service").symlink_to(UNIT)
    (dropin_dir / "00-test-exec-start.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={blockd} --config /etc/blockd/blockd.toml\n")
    for dropin in dropins:
        (dropin_dir / dropin.name).symlink_to(dropin)
    if extra:
        (dropin_dir / "99-extra.conf").write_text(extra)
    # The trailing ":" keeps systemd's own unit directories (sysinit.target, ...).
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:", "SYSTEMD_LOG_COLOR": "0"}
    result = run([analyze, "verify", "blockd.service"], env=env)
    said = [line for line in (result.stdout + result.stderr).splitlines()
            if "blockd" in line or str(tmp_path) in line]
    if result.returncode != 0:
        said.append(f"exit status {result.returncode}: {result.stdout}{result.stderr}")
    return "\n".join(said)


def security(tmp_path: Path, *dropins: Path) -> tuple[float, str]:
    """``systemd-analyze security --offline``: the exposure level and the whole table."""
    analyze = need_tool("systemd-analyze", "Debian package systemd")
    units = tmp_path / "security"
    (units / "blockd.service.d").mkdir(parents=True)
    (units / "blockd.service").symlink_to(UNIT)
    for dropin in dropins:
        (units / "blockd.service.d" / dropin.name).symlink_to(dropin)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:", "SYSTEMD_LOG_COLOR": "0",
           "SYSTEMD_COLORS": "0"}
    result = run([analyze, "security", "--offline=true", "--no-pager", "blockd.service"],
                 env=env)
    ok(result)
    level = re.search(r"Overall exposure level for blockd\.service: ([0-9.]+)", result.stdout)
    assert level, result.stdout
    return float(level[1]), result.stdout


def test_systemd_analyze_verify_unit(tmp_path: Path) -> None:
    assert verify_unit(tmp_path) == ""


def test_systemd_analyze_verify_unit_with_passthrough_dropin(tmp_path: Path) -> None:
    assert verify_unit(tmp_path, PASSTHROUGH_DROPIN) == ""


def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above would see a mistake: an unknown key, a bad value."""
    said = verify_unit(tmp_path, extra="[Service]\nDevicePolicy=closed\nProtectSytem=strict\n")
    assert "Unknown key 'ProtectSytem'" in said, said


def test_unit_runs_the_installed_blockd_with_the_example_config() -> None:
    options = unit_options(UNIT)
    assert options["[Service]ExecStart"] == [INSTALLED_EXEC_START]
    # The header's install commands put the example where ExecStart reads it, and the
    # unit's runtime directory is where the example's sockets and pidfile go.
    text = UNIT.read_text()
    assert "contrib/blockd.toml.example /etc/blockd/blockd.toml" in text
    config = load_config_file(EXAMPLE_CONFIG)
    assert options["[Service]RuntimeDirectory"] == ["blockd"]
    assert [q.path for q in config.qmp] == ["/run/blockd/qmp.sock"]
    assert config.pidfile is not None and config.pidfile.startswith("/run/blockd/")
    assert config.nbd_server is not None
    assert config.nbd_server.args["addr"] == {"type": "unix", "path": "/run/blockd/nbd.sock"}


def test_unit_hardening() -> None:
    o = unit_options(UNIT)
    s = "[Service]"
    assert o[f"{s}Type"] == ["notify"]  # blockd/daemon/sdnotify.py sends READY=1
    assert o[f"{s}DevicePolicy"] == ["closed"]
    assert o[f"{s}DeviceAllow"] == ["block-* rw", "char-sg rw"]
    assert o[f"{s}RuntimeDirectory"] == ["blockd"]
    assert o[f"{s}RuntimeDirectoryMode"] == ["0750"]
    assert o[f"{s}NoNewPrivileges"] == ["yes"]
    assert o[f"{s}ProtectSystem"] == ["strict"]
    assert o[f"{s}ProtectHome"] == ["yes"]
    assert "PrivateDevices" not in o  # hotplugged devices must show up in /dev
    assert f"{s}ProcSubset" not in o  # "pid" would hide /proc/swaps from the safety check
    caps = o[f"{s}CapabilityBoundingSet"][0].split()
    assert "CAP_SYS_ADMIN" in caps and "CAP_SYS_RAWIO" not in caps
    assert "AF_NETLINK" in o[f"{s}RestrictAddressFamilies"][0].split()  # udev events
    assert o[f"{s}SystemCallFilter"] == ["@system-service"]
    assert o[f"{s}Restart"] == ["on-failure"] and o[f"{s}KillSignal"] == ["SIGTERM"]


def test_passthrough_dropin_adds_only_cap_sys_rawio() -> None:
    o = unit_options(PASSTHROUGH_DROPIN)
    assert o == {"[Service]CapabilityBoundingSet": ["CAP_SYS_RAWIO"]}


def test_systemd_analyze_security(tmp_path: Path) -> None:
    """systemd's own exposure score stays low; CAP_SYS_RAWIO only with the drop-in."""
    level, table = security(tmp_path)
    assert level <= 3.5, table
    assert re.search(r"✓ CapabilityBoundingSet=~CAP_SYS_RAWIO", table), table
    assert re.search(r"✓ ProtectSystem=", table) and re.search(r"✓ ProtectHome=", table)
    level_rawio, table = security(tmp_path / "rawio", PASSTHROUGH_DROPIN)
    assert re.search(r"✗ CapabilityBoundingSet=~CAP_SYS_RAWIO", table), table
    assert level_rawio > level


# --------------------------------------------------------------------------------------
# udev rule
# --------------------------------------------------------------------------------------


@dataclass
class UdevRun:
    """What ``udevadm test`` computed for one device."""

    output: str
    errors: list[str]
    properties: dict[str, str] = field(default_factory=dict)
    run: list[str] = field(default_factory=list)

    @property
    def tags(self) -> set[str]:
        return set(filter(None, self.properties.get("TAGS", "").split(":")))


def loop_device() -> Path:
    """A loop device's sysfs directory (they exist whether attached or not)."""
    found = sorted(Path("/sys/class/block").glob("loop[0-9]*"),
                   key=lambda p: int(p.name[4:]))
    if not found:
        pytest.fail("no loop device in /sys/class/block (modprobe loop)")
    return found[0]


def stand_in(kernel: str, properties: Mapping[str, str], eject_request: bool) -> str:
    """A rules file run just before 61-blockd.rules that makes a loop device look like
    another device, and adds the RUN that 60-cdrom_id.rules adds on an eject request."""
    sets = "".join(f', ENV{{{k}}}="{v}"' for k, v in properties.items())
    text = f'KERNEL=="{kernel}"{sets}\n'
    if eject_request:
        text += (f'KERNEL=="{kernel}", ENV{{DISK_EJECT_REQUEST}}="1", '
                 'RUN+="/usr/bin/udev-eject-stand-in $devnode"\n')
    return text


# Run in a private mount namespace: ``udevadm test`` (systemd 252) also writes the udev
# database and creates /dev symlinks as udevd would, so /run and /dev are fresh tmpfs
# there (with the few device nodes it opens), and /etc/udev holds only the test's rules.
ISOLATED_TEST = """set -e
mount -t tmpfs blockd-test /etc/udev
mkdir /etc/udev/rules.d
cp "$1"/*.rules /etc/udev/rules.d/
mount -t tmpfs blockd-test /run
mount -t tmpfs blockd-test /dev
mknod -m 666 /dev/null c 1 3
mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/urandom c 1 9
mknod -m 660 "/dev/$4" b "$5" "$6"
exec "$2" test --action=change "$3"
"""


def udev_test(tmp_path: Path, rules: str, properties: Mapping[str, str] | None = None, *,
              eject_request: bool = False) -> UdevRun:
    """``udevadm test`` of a loop device with ``rules`` installed as 61-blockd.rules.

    The rules go into a tmpfs over /etc/udev in a private mount namespace, so neither
    the machine's udevd, its database nor its rules are touched (:data:`ISOLATED_TEST`);
    Debian's own rules in /usr/lib/udev/rules.d run as usual.  ``udevadm test``
    executes no RUN program.
    """
    need_root("installing udev rules in a private mount namespace")
    udevadm = need_tool("udevadm", "Debian package udev")
    unshare = need_tool("unshare", "Debian package util-linux")
    device = loop_device()
    rules_dir = tmp_path / f"rules{len(list(tmp_path.glob('rules*')))}"
    rules_dir.mkdir()
    (rules_dir / "61-blockd.rules").write_text(rules)
    if properties is not None or eject_request:
        (rules_dir / "60-zz-blockd-test-stand-in.rules").write_text(
            stand_in(device.name, properties or {}, eject_request))
    major, minor = (device / "dev").read_text().split(":")
    result = run([unshare, "--mount", "--propagation", "private", "sh", "-c", ISOLATED_TEST,
                  "sh", str(rules_dir), udevadm, str(device.resolve()), device.name,
                  major, minor.strip()])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    ours = re.compile(r"^/etc/udev/rules\.d/(61-blockd|60-zz-blockd-test-stand-in)\.rules:\d+")
    errors = [line for line in output.splitlines() if ours.match(line)]
    assert "Reading rules file: /etc/udev/rules.d/61-blockd.rules" in output, output
    found = UdevRun(output, errors)
    for line in output.splitlines():
        prop = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if prop:
            found.properties[prop[1]] = prop[2]
        cmd = re.match(r"^run: '(.*)'$", line)
        if cmd:
            found.run.append(cmd[1])
    return found


def managed(result: UdevRun) -> bool:
    blockd = result.properties.get("BLOCKD_MANAGED") == "1"
    assert blockd == ("blockd" in result.tags) == (result.properties.get("UDISKS_IGNORE")
                                                   == "1"), result.output
    return blockd


CD_DRIVE = {"ID_CDROM": "1", "ID_BUS": "ata", "ID_SERIAL": "HL-DT-ST_DVDRAM_GH24NSD1_K123"}
USB_CD_DRIVE = {**CD_DRIVE, "ID_BUS": "usb", "ID_SERIAL": "ASUS_SDRW-08D2S-U_KZ42"}


def test_udev_rule_hands_cd_drives_to_blockd(tmp_path: Path) -> None:
    result = udev_test(tmp_path, UDEV_RULES.read_text(), CD_DRIVE)
    assert result.errors == [], result.output
    assert managed(result)
    assert "/bin/true" not in result.run


def test_udev_rule_gives_eject_requests_to_blockd(tmp_path: Path) -> None:
    """The eject udev would do (60-cdrom_id.rules' RUN) is replaced by a no-op."""
    result = udev_test(tmp_path, UDEV_RULES.read_text(), CD_DRIVE, eject_request=True)
    assert result.errors == [] and managed(result), result.output
    assert result.run == ["/bin/true"], result.output


def test_udev_rule_leaves_other_devices_alone(tmp_path: Path) -> None:
    result = udev_test(tmp_path, UDEV_RULES.read_text(), {"ID_SERIAL": "QEMU_HARDDISK_1"},
                       eject_request=True)
    assert result.errors == [] and not managed(result), result.output
    assert "/usr/bin/udev-eject-stand-in" in " ".join(result.run), result.output
    assert "/bin/true" not in result.run


def commented_selections(text: str) -> list[str]:
    """The commented example selection lines (each one sets BLOCKD_MANAGED)."""
    return [line[2:] for line in text.splitlines()
            if line.startswith("# ") and line.endswith('ENV{BLOCKD_MANAGED}="1"')]


DEFAULT_SELECTION = 'ENV{ID_CDROM}=="1", ENV{BLOCKD_MANAGED}="1"'


def example_device(selection: str) -> dict[str, str]:
    """Properties that match a selection line (globs filled in)."""
    props = {}
    for key, pattern in re.findall(r'ENV\{(\w+)\}=="([^"]*)"', selection):
        props[key] = pattern.split("|")[0].replace("*", "X").replace("?", "X")
    assert props and not re.search(r'\b(KERNEL|ATTRS?|SUBSYSTEMS?)==', selection), selection
    return props


def test_udev_rule_examples(tmp_path: Path) -> None:
    """Every commented selection, put in place of the default, parses and selects the
    devices it describes (and only those: a CD drive on another bus stays udev's)."""
    text = UDEV_RULES.read_text()
    assert text.count(f"\n{DEFAULT_SELECTION}\n") == 1
    examples = commented_selections(text)
    assert len(examples) >= 4, examples
    assert any("ID_BUS}==\"usb\"" in e and "ID_CDROM" in e for e in examples)
    assert any("ID_SERIAL}==" in e for e in examples)
    for example in examples:
        rules = text.replace(f"\n{DEFAULT_SELECTION}\n", f"\n{example}\n")
        device = example_device(example)
        result = udev_test(tmp_path, rules, device, eject_request="ID_CDROM" in device)
        assert result.errors == [], (example, result.output)
        assert managed(result), (example, result.output)
        if "ID_CDROM" in device:
            assert result.run == ["/bin/true"], result.output
        other = udev_test(tmp_path, rules, {k: v + "-other" for k, v in device.items()})
        assert not managed(other), (example, other.output)


def test_udev_check_catches_broken_rules(tmp_path: Path) -> None:
    broken = UDEV_RULES.read_text().replace('ENV{BLOCKD_MANAGED}!="1"',
                                            'ENV{BLOCKD_MANAGED}=!"1"')
    result = udev_test(tmp_path, broken, CD_DRIVE)
    assert result.errors, result.output


def test_one_udev_rules_file() -> None:
    """The CD-ROM rule is folded into 61-blockd.rules (the VM tier installs them all)."""
    assert sorted(p.name for p in (CONTRIB / "udev").iterdir()) == ["61-blockd.rules"]


# --------------------------------------------------------------------------------------
# The example configuration and its hotplug rules
# --------------------------------------------------------------------------------------


def seen(kernel: str, attrs: Mapping[str, str] | None = None, **props: str) -> Seen:
    devname = f"/dev/{kernel}"
    properties = {"SUBSYSTEM": "block", "DEVTYPE": "disk", "DEVNAME": devname, **props}
    return Seen(properties, kernel, devname, (attrs or {}).get)


@dataclass(frozen=True)
class Attach:
    rule: str
    id: str
    node_name: str
    driver: str
    read_only: bool
    export: tuple[str, bool] | None


def attach(rules: tuple[Rule, ...], device: Seen) -> Attach | str | None:
    """What the rules do with a device, as the hotplug manager would compute it."""
    rule = first_match(rules, device)
    if rule is None:
        return None
    if rule.action == "ignore":
        return f"ignored by {rule.label}"
    id = render(rule.id, device)
    export = None if rule.export is None else (render(rule.export.name, device, id=id),
                                               rule.export.writable)
    return Attach(rule.label, id, render(rule.node_name, device, id=id, limit=NODE_NAME_MAX),
                  rule.driver_for(device), rule.read_only, export)


def example_rules() -> tuple[Rule, ...]:
    return load_config_file(EXAMPLE_CONFIG).hotplug_rules


def test_example_config_loads() -> None:
    config = load_config_file(EXAMPLE_CONFIG)
    assert [r.label for r in config.hotplug_rules] == [
        "snap-loops", "usb-cd", "cd", "scratch-disk", "loop"]
    assert len(config.blockdevs) == 1 and len(config.devices) == 2
    assert config.metrics is not None and config.metrics.port == METRICS_PORT
    # As ExecStart passes it.
    assert parse_command_line(["--config", str(EXAMPLE_CONFIG)]) == config


def test_example_rules_on_cd_drives() -> None:
    rules = example_rules()
    usb = seen("sr1", ID_CDROM="1", ID_BUS="usb", ID_SERIAL="ASUS_SDRW-08D2S-U_KZ42",
               BLOCKD_MANAGED="1")
    # The id is the serial's; the node-name ("{id}-node") is shortened to QEMU's limit.
    assert attach(rules, usb) == Attach("usb-cd", "usbcd-ASUS_SDRW-08D2S-U_KZ42",
                                        attach_node_name(rules, usb), "host_cdrom",
                                        True, ("usbcd-ASUS_SDRW-08D2S-U_KZ42", False))
    sata = seen("sr0", ID_CDROM="1", ID_BUS="ata", ID_SERIAL="HL-DT-ST_DVDRAM_GH24NSD1_K1",
                BLOCKD_MANAGED="1")
    assert attach(rules, sata) == Attach("cd", "cd-sr0", "cd-sr0-node", "host_cdrom", True,
                                         None)
    # A drive the udev rule did not hand to blockd stays udev's.
    unmanaged = seen("sr2", ID_CDROM="1", ID_BUS="usb", ID_SERIAL="X")
    assert attach(rules, unmanaged) is None


def attach_node_name(rules: tuple[Rule, ...], device: Seen) -> str:
    """The node-name for a long id: the default template, shortened to QEMU's limit."""
    rule = first_match(rules, device)
    assert rule is not None and rule.node_name == "{id}-node"
    name = render(rule.node_name, device, id=render(rule.id, device), limit=NODE_NAME_MAX)
    assert len(name) <= NODE_NAME_MAX
    return name


def test_example_rules_on_disks_and_loop_devices() -> None:
    rules = example_rules()
    scratch = seen("sdc", ID_BUS="scsi", ID_SERIAL="SEAGATE_ST4000NM0023_Z1Z0ABCD")
    assert attach(rules, scratch) == Attach("scratch-disk", "scratch0", "scratch0-disk",
                                            "host_device", False, ("scratch", True))
    scratch_rule = next(r for r in rules if r.label == "scratch-disk")
    assert (scratch_rule.rerror, scratch_rule.werror) == ("report", "stop")
    # Any other disk (the root disk among them): no rule.
    assert attach(rules, seen("sda", ID_BUS="ata", ID_SERIAL="Samsung_SSD_870")) is None
    assert attach(rules, seen("sdc1", DEVTYPE="partition", ID_SERIAL=(
        "SEAGATE_ST4000NM0023_Z1Z0ABCD"))) is None
    loop = seen("loop3", {"loop/backing_file": "/srv/iso/debian.iso"})
    assert attach(rules, loop) == Attach("loop", "loop3", "loop3-node", "host_device", True,
                                         ("loop3", False))
    snap = seen("loop7", {"loop/backing_file": "/var/lib/snapd/snaps/core22_1380.snap"})
    assert attach(rules, snap) == "ignored by snap-loops"
    assert attach(rules, seen("loop4", DEVTYPE="partition")) is None


def test_example_commented_rule_loads(tmp_path: Path) -> None:
    """The commented [[hotplug.rule]] at the end is a valid rule once uncommented."""
    text = EXAMPLE_CONFIG.read_text()
    start = text.index("# [[hotplug.rule]]")
    block = [line[2:] for line in text[start:].splitlines() if line.startswith("# ")]
    config = tmp_path / "blockd.toml"
    config.write_text(text + "\n" + "\n".join(block) + "\n")
    rules = load_config_file(config).hotplug_rules
    assert rules[-1].label == "scratch-sg"
    sg = Seen({"SUBSYSTEM": "scsi_generic", "ID_SERIAL": "SEAGATE_ST4000NM0023_Z1Z0ABCD"},
              "sg2", "/dev/sg2")
    assert attach(rules, sg) == Attach("scratch-sg", "scratch0-sg", "scratch0-sg-node", "sg",
                                       True, None)


# --------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    return {d["kind"]: d for d in docs}


def kubernetes_validate(path: Path, *versions: str) -> subprocess.CompletedProcess[str]:
    args = [a for v in versions for a in ("-k", v)]
    return run([sys.executable, "-m", "kubernetes_validate", "--strict", *args, str(path)])


@pytest.mark.parametrize("version", ["1.27.0", "latest"])
def test_kubernetes_validate(version: str) -> None:
    """Strict schema validation (unknown fields fail) for an old and the newest API."""
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra)")
    result = kubernetes_validate(DAEMONSET, *([] if version == "latest" else [version]))
    ok(result)
    assert result.stdout.count(" passed for resource ") == 3, result.stdout


def test_kubernetes_validate_catches_mistakes(tmp_path: Path) -> None:
    pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra)")
    broken = tmp_path / "broken.yaml"
    broken.write_text(DAEMONSET.read_text().replace("readinessProbe:", "readynessProbe:"))
    result = kubernetes_validate(broken)
    assert result.returncode != 0 and "readynessProbe" in result.stdout + result.stderr


def test_daemonset_shape() -> None:
    m = manifests()
    assert set(m) == {"Namespace", "ConfigMap", "DaemonSet"}
    ds = m["DaemonSet"]
    namespace = m["Namespace"]["metadata"]["name"]
    assert ds["metadata"]["namespace"] == m["ConfigMap"]["metadata"]["namespace"] == namespace
    template = ds["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = template["spec"]
    # udev's netlink events reach only the host's network namespace.
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (container,) = pod["containers"]
    assert container["securityContext"] == {"privileged": True}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {v["mountPath"]: v for v in container["volumeMounts"]}
    assert {v["name"] for v in mounts.values()} == set(volumes)
    host = {path: volumes[mount["name"]].get("hostPath", {}).get("path")
            for path, mount in mounts.items()}
    assert host["/dev"] == "/dev" and not mounts["/dev"].get("readOnly")
    assert host["/run/udev"] == "/run/udev" and mounts["/run/udev"]["readOnly"] is True
    assert host["/run/blockd"] == "/run/blockd"
    assert host["/host"] == "/" and mounts["/host"]["mountPropagation"] == "HostToContainer"
    assert volumes[mounts["/etc/blockd"]["name"]]["configMap"]["name"] == \
        m["ConfigMap"]["metadata"]["name"]
    (port,) = container["ports"]
    assert port == {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}
    probe = container["readinessProbe"]["httpGet"]
    assert probe == {"path": "/metrics", "port": "metrics"}
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def daemonset_args(tmp_path: Path) -> list[str]:
    """The container's arguments, reading the ConfigMap's blockd.toml from a file."""
    m = manifests()
    path = tmp_path / "blockd.toml"
    path.write_text(m["ConfigMap"]["data"]["blockd.toml"])
    (container,) = m["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["blockd"]
    args = [str(path) if a == "/etc/blockd/blockd.toml" else a.replace("$(POD_IP)", "10.1.2.3")
            for a in container["args"]]
    return args


def test_daemonset_config(tmp_path: Path) -> None:
    """The ConfigMap's configuration loads; the container's options put the metrics on
    the node's address and port 9580; QMP and NBD sockets are in the hostPath."""
    config = parse_command_line(daemonset_args(tmp_path))
    assert config.metrics is not None
    assert (config.metrics.host, config.metrics.port) == ("10.1.2.3", METRICS_PORT)
    assert [q.path for q in config.qmp] == ["/run/blockd/qmp.sock"]
    assert config.socket_mode == 0o600
    assert config.nbd_server is not None
    assert config.nbd_server.args["addr"] == {"type": "unix", "path": "/run/blockd/nbd.sock"}
    # Only devices the node's udev rule handed to blockd, never anything else.
    rules = config.hotplug_rules
    assert [r.label for r in rules] == ["usb-cd", "cd", "disk"]
    assert all(("BLOCKD_MANAGED", "1") in r.match for r in rules)
    disk = seen("sdb", ID_SERIAL="WDC_WD40EFRX_WD-1234", BLOCKD_MANAGED="1")
    assert attach(rules, disk) == Attach("disk", "disk-WDC_WD40EFRX_WD-1234",
                                         attach_node_name(rules, disk), "host_device",
                                         True, ("disk-WDC_WD40EFRX_WD-1234", False))
    cd = seen("sr0", ID_CDROM="1", ID_BUS="ata", BLOCKD_MANAGED="1")
    assert attach(rules, cd) == Attach("cd", "cd-sr0", "cd-sr0-node", "host_cdrom", True,
                                       ("cd-sr0", False))
    assert attach(rules, seen("sda", ID_SERIAL="root-disk")) is None
    assert attach(rules, seen("loop0")) is None


# --------------------------------------------------------------------------------------
# Prometheus for the fleet
# --------------------------------------------------------------------------------------

# Prometheus 2.x's kubernetes_sd_config (discovery/kubernetes): its keys besides the HTTP
# client's, the roles, and a selector's keys.
K8S_SD_KEYS = {"api_server", "role", "kubeconfig_file", "namespaces", "selectors",
               "attach_metadata"}
HTTP_CLIENT_KEYS = {"basic_auth", "authorization", "oauth2", "follow_redirects",
                    "enable_http2", "tls_config", "proxy_url", "no_proxy", "proxy_from_environment",
                    "proxy_connect_header", "bearer_token", "bearer_token_file"}
K8S_ROLES = {"node", "pod", "service", "endpoints", "endpointslice", "ingress"}
K8S_UNKNOWN = "field kubernetes_sd_configs not found in type config.ScrapeConfig"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run([need_tool("promtool", "Debian package prometheus"), *args], cwd=cwd)


def fleet() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(FLEET_CONFIG.read_text())
    return config


def fleet_job(name: str) -> dict[str, Any]:
    (job,) = [j for j in fleet()["scrape_configs"] if j["job_name"] == name]
    return job


def test_promtool_check_fleet_config(tmp_path: Path) -> None:
    """promtool checks the whole file: the rule file it loads, the file_sd targets file,
    every relabelling.  Debian's promtool is built without Kubernetes discovery; there it
    must object to kubernetes_sd_configs and to nothing else, and then checks the same
    file with that one block swapped for static targets (the kubernetes_sd_configs
    block itself is checked by the next test)."""
    result = promtool("check", "config", str(FLEET_CONFIG))
    output = result.stdout + result.stderr
    if result.returncode != 0:
        unmarshal = re.findall(r"^\s+line \d+: (.*)$", output, re.M)
        assert unmarshal == [K8S_UNKNOWN], output
        directory = tmp_path / "prometheus"
        directory.mkdir()
        shutil.copy(ALERT_RULES, tmp_path / ALERT_RULES.name)
        shutil.copy(FLEET_TARGETS, directory / FLEET_TARGETS.name)
        config = fleet()
        for job in config["scrape_configs"]:
            if job.pop("kubernetes_sd_configs", None) is not None:
                job["static_configs"] = [{"targets": [f"10.1.2.3:{METRICS_PORT}"]}]
        swapped = directory / FLEET_CONFIG.name
        swapped.write_text(yaml.safe_dump(config, sort_keys=False))
        result = promtool("check", "config", str(swapped))
        output = result.stdout + result.stderr
    ok(result)
    assert "SUCCESS: 1 rule files found" in output
    assert "SUCCESS: 5 rules found" in output  # ../blockd-alerts.yml, found from here


def test_fleet_kubernetes_discovery() -> None:
    job = fleet_job("blockd-kubernetes")
    (sd,) = job["kubernetes_sd_configs"]
    assert set(sd) <= K8S_SD_KEYS | HTTP_CLIENT_KEYS, set(sd) - K8S_SD_KEYS
    assert sd["role"] == "pod" and sd["role"] in K8S_ROLES
    assert set(sd["namespaces"]) <= {"names", "own_namespace"}
    m = manifests()
    assert sd["namespaces"]["names"] == [m["Namespace"]["metadata"]["name"]]
    for selector in sd["selectors"]:
        assert set(selector) <= {"role", "label", "field"} and selector["role"] in K8S_ROLES
        key, _, value = selector["label"].partition("=")
        assert m["DaemonSet"]["spec"]["template"]["metadata"]["labels"][key] == value


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus's relabelling (replace, keep, drop), for the rules these files use."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(s, "")
                                                for s in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            # Go's $1 and ${1} are Python's \g<1>.
            target = match.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>",
                                         rule.get("replacement", "$1")))
            if target:
                labels[rule["target_label"]] = target
            else:
                labels.pop(rule["target_label"], None)
    return {k: v for k, v in labels.items() if not k.startswith("__")
            or k in ("__address__", "__metrics_path__")}


def pod_target(**overrides: str) -> dict[str, str]:
    """The labels kubernetes_sd's pod role gives one of the DaemonSet's pods."""
    return {"__address__": f"192.0.2.17:{METRICS_PORT}", "job": "blockd-kubernetes",
            "__meta_kubernetes_namespace": "blockd",
            "__meta_kubernetes_pod_name": "blockd-x7k2p",
            "__meta_kubernetes_pod_node_name": "worker-3",
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": "blockd",
            "__meta_kubernetes_pod_container_port_name": "metrics", **overrides}


def test_fleet_kubernetes_relabelling() -> None:
    rules = fleet_job("blockd-kubernetes")["relabel_configs"]
    assert relabel(rules, pod_target()) == {
        "__address__": f"192.0.2.17:{METRICS_PORT}", "job": "blockd", "instance": "worker-3",
        "pod": "blockd-x7k2p", "namespace": "blockd"}
    assert relabel(rules, pod_target(__meta_kubernetes_pod_container_port_name="")) is None
    assert relabel(rules, pod_target(
        __meta_kubernetes_pod_label_app_kubernetes_io_name="other")) is None
    assert relabel(rules, pod_target(__meta_kubernetes_pod_phase="Succeeded")) is None
    assert relabel(rules, pod_target(__meta_kubernetes_pod_phase="Pending")) is not None


def test_fleet_file_sd_targets_and_relabelling() -> None:
    job = fleet_job("blockd-hosts")
    (sd,) = job["file_sd_configs"]
    assert FLEET_TARGETS.name in sd["files"]
    groups = yaml.safe_load(FLEET_TARGETS.read_text())
    assert groups and all(set(g) <= {"targets", "labels"} for g in groups)
    for group in groups:
        # blockd's series carry job, instance, device and node (the node-name) labels.
        assert not set(group.get("labels", {})) & {"job", "instance", "node", "device"}
        for target in group["targets"]:
            host, _, port = target.rpartition(":")
            assert host and port == str(METRICS_PORT), target
            labels = {"__address__": target, "job": "blockd-hosts",
                      **group.get("labels", {})}
            assert relabel(job["relabel_configs"], labels) == {
                **labels, "job": "blockd", "instance": host}


def test_fleet_jobs_feed_the_alerts() -> None:
    """Both jobs label their targets job="blockd", which BlockdDown and the dashboard use."""
    assert 'up{job="blockd"}' in ALERT_RULES.read_text()
    names = [j["job_name"] for j in fleet()["scrape_configs"]]
    assert names == ["blockd-kubernetes", "blockd-hosts"]
    for name in names:
        assert {"target_label": "job", "replacement": "blockd"} in \
            fleet_job(name)["relabel_configs"]
    assert fleet()["rule_files"] == ["../blockd-alerts.yml"]
