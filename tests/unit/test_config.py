"""Command line and TOML configuration -> DaemonConfig."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest

from blockd import __version__
from blockd.daemon.config import (
    DEFAULT_CONFIG_TOML,
    ConfigError,
    DaemonConfig,
    InfoRequested,
    MetricsListener,
    OptionSpec,
    QmpListener,
    default_config,
    default_qmp_path,
    load_config_file,
    parse_command_line,
)

SOCKET_CHARDEV = "socket,id=c0,path=/tmp/q.sock,server=on,wait=off"


def parse(*argv: str) -> DaemonConfig:
    return parse_command_line(list(argv))


def error_of(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_command_line(list(argv))
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, text: str, name: str = "blockd.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- QSD options ----------------------------------------------------------------------


def test_blockdev_keyval_with_implied_driver() -> None:
    config = parse("--blockdev", "file,node-name=f0,filename=a,,b.img,cache.direct=on")
    assert config.blockdevs == (
        OptionSpec(
            {
                "driver": "file",
                "node-name": "f0",
                "filename": "a,b.img",
                "cache": {"direct": "on"},
            },
            True,
        ),
    )
    assert config.default_used is False


def test_blockdev_json() -> None:
    config = parse("--blockdev", '{"driver": "null-co", "node-name": "n", "size": 512}')
    assert config.blockdevs[0].args == {"driver": "null-co", "node-name": "n", "size": 512}
    assert config.blockdevs[0].from_keyval is False


def test_blockdev_equals_form() -> None:
    config = parse("--blockdev=null-co,node-name=n")
    assert config.blockdevs[0].args == {"driver": "null-co", "node-name": "n"}


def test_option_args_are_read_only() -> None:
    config = parse("--blockdev", "null-co,node-name=n")
    with pytest.raises(TypeError):
        config.blockdevs[0].args["x"] = 1  # type: ignore[index]


def test_blockdevs_and_devices_keep_their_order() -> None:
    config = parse(
        "--blockdev", "null-co,node-name=b",
        "--device", "hd,id=d2,drive=b",
        "--blockdev", "null-co,node-name=a",
        "--device", "cd,id=d1",
        "--blockdev", "null-co,node-name=c",
    )  # fmt: skip
    assert [b.args["node-name"] for b in config.blockdevs] == ["b", "a", "c"]
    assert [d.args["id"] for d in config.devices] == ["d2", "d1"]


def test_chardev_and_monitor_make_a_unix_listener() -> None:
    config = parse("--chardev", SOCKET_CHARDEV, "--monitor", "chardev=c0")
    assert config.qmp == (QmpListener(path="/tmp/q.sock"),)


def test_monitor_implied_chardev_mode_and_pretty() -> None:
    config = parse("--chardev", SOCKET_CHARDEV, "--monitor", "c0,mode=control,pretty=on")
    assert config.qmp == (QmpListener(path="/tmp/q.sock", pretty=True),)


def test_monitor_json() -> None:
    config = parse("--chardev", SOCKET_CHARDEV, "--monitor", '{"chardev": "c0", "pretty": true}')
    assert config.qmp[0].pretty is True


def test_chardev_tcp() -> None:
    config = parse(
        "--chardev", "socket,id=t,host=::1,port=4444,server=on,wait=off", "--monitor", "t"
    )
    assert config.qmp == (QmpListener(host="::1", port=4444),)


def test_chardev_tcp_port_only_binds_loopback() -> None:
    config = parse("--chardev", "socket,id=t,port=4444,server=on", "--monitor", "t")
    assert config.qmp == (QmpListener(host="127.0.0.1", port=4444),)


def test_chardev_legacy_bare_flags() -> None:
    config = parse("--chardev", "socket,id=c,path=q.sock,server,nowait", "--monitor", "c")
    assert config.qmp == (QmpListener(path="q.sock"),)


def test_chardev_without_monitor_serves_nothing() -> None:
    assert parse("--chardev", SOCKET_CHARDEV, "--blockdev", "null-co,node-name=n").qmp == ()


def test_nbd_server_export_and_object() -> None:
    config = parse(
        "--nbd-server", "addr.type=unix,addr.path=/tmp/nbd.sock",
        "--export", "nbd,id=e0,node-name=n,writable=on",
        "--export", "type=nbd,id=e1,node-name=m",
        "--object", "secret,id=s0,data=x",
        "--object", "iothread,id=io0",
    )  # fmt: skip
    assert config.nbd_server == OptionSpec(
        {"addr": {"type": "unix", "path": "/tmp/nbd.sock"}}, True
    )
    assert [e.args for e in config.exports] == [
        {"type": "nbd", "id": "e0", "node-name": "n", "writable": "on"},
        {"type": "nbd", "id": "e1", "node-name": "m"},
    ]
    assert [o.args for o in config.objects] == [
        {"qom-type": "secret", "id": "s0", "data": "x"}, {"qom-type": "iothread", "id": "io0"}]


def test_pidfile() -> None:
    assert parse("--pidfile", "/run/b.pid", "--qmp", "q.sock").pidfile == "/run/b.pid"


def test_help_and_version() -> None:
    for flag in ("-h", "--help"):
        with pytest.raises(InfoRequested) as info:
            parse(flag)
        assert info.value.text.startswith("Usage: blockd [options]")
    for flag in ("-V", "--version"):
        with pytest.raises(InfoRequested) as info:
            parse(flag)
        assert info.value.text == f"blockd {__version__}\n"


def test_help_wins_even_after_other_options() -> None:
    with pytest.raises(InfoRequested):
        parse("--qmp", "q.sock", "--help")


def test_bundled_short_flags() -> None:
    with pytest.raises(InfoRequested) as info:
        parse("-Vh")
    assert info.value.text == f"blockd {__version__}\n"


# --- blockd's own options -------------------------------------------------------------


def test_device_with_implied_driver_and_policies() -> None:
    config = parse("--device", "cd,id=cd0,drive=n,rerror=report,werror=stop")
    assert config.devices == (
        OptionSpec(
            {"driver": "cd", "id": "cd0", "drive": "n", "rerror": "report", "werror": "stop"},
            True,
        ),
    )


@pytest.mark.parametrize(
    ("value", "listener"),
    [
        ("/run/x.sock", QmpListener(path="/run/x.sock")),
        ("rel.sock", QmpListener(path="rel.sock")),
        ("unix:/a.sock", QmpListener(path="/a.sock")),
        ("tcp:4444", QmpListener(host="127.0.0.1", port=4444)),
        ("tcp::4444", QmpListener(host="127.0.0.1", port=4444)),
        ("tcp:0.0.0.0:4444", QmpListener(host="0.0.0.0", port=4444)),
        ("tcp:[::1]:4444", QmpListener(host="::1", port=4444)),
    ],
)
def test_qmp_addresses(value: str, listener: QmpListener) -> None:
    assert parse("--qmp", value).qmp == (listener,)


def test_qmp_listeners_keep_order_across_monitor_and_qmp() -> None:
    config = parse("--qmp", "a.sock", "--chardev", SOCKET_CHARDEV, "--monitor", "c0")
    assert [q.path for q in config.qmp] == ["a.sock", "/tmp/q.sock"]


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_log_level(level: str) -> None:
    assert parse("--qmp", "q.sock", "--log-level", level).log_level == level


def test_defaults_of_a_non_default_config() -> None:
    config = parse("--qmp", "q.sock")
    assert config.log_level == "info"
    assert config.socket_mode == 0o600
    assert config.socket_group is None
    assert config.pidfile is None
    assert config.nbd_server is None
    assert config.objects == ()


# --- TOML -----------------------------------------------------------------------------

FULL_TOML = """\
pidfile = "/run/blockd.pid"
log-level = "debug"
socket-mode = "0660"
socket-group = "disk"

[[qmp]]
path = "/run/blockd/qmp.sock"

[[qmp]]
port = 4444
pretty = true

[[blockdev]]
driver = "host_cdrom"
node-name = "sr0"
filename = "/dev/sr0"
cache = {direct = true}

[[device]]
driver = "cd"
id = "cd0"
drive = "sr0"

[nbd-server]
addr = {type = "unix", path = "/run/nbd.sock"}

[[export]]
type = "nbd"
id = "e0"
node-name = "sr0"
"""


def test_load_config_file(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, FULL_TOML))
    assert config == DaemonConfig(
        qmp=(
            QmpListener(path="/run/blockd/qmp.sock"),
            QmpListener(host="127.0.0.1", port=4444, pretty=True),
        ),
        blockdevs=(
            OptionSpec(
                {
                    "driver": "host_cdrom",
                    "node-name": "sr0",
                    "filename": "/dev/sr0",
                    "cache": {"direct": True},
                },
                False,
            ),
        ),
        devices=(OptionSpec({"driver": "cd", "id": "cd0", "drive": "sr0"}, False),),
        nbd_server=OptionSpec({"addr": {"type": "unix", "path": "/run/nbd.sock"}}, False),
        exports=(OptionSpec({"type": "nbd", "id": "e0", "node-name": "sr0"}, False),),
        pidfile="/run/blockd.pid",
        log_level="debug",
        socket_mode=0o660,
        socket_group="disk",
    )


def test_socket_mode_as_toml_integer(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, "socket-mode = 0o640\n")).socket_mode == 0o640


def test_config_option_inserts_file_at_its_place(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[[blockdev]]\ndriver = "null-co"\nnode-name = "file"\n[[qmp]]\npath = "file.sock"\n',
    )
    config = parse(
        "--log-level", "debug",
        "--blockdev", "null-co,node-name=before",
        "--config", path,
        "--blockdev", "null-co,node-name=after",
        "--qmp", "cli.sock",
    )  # fmt: skip
    assert [b.args["node-name"] for b in config.blockdevs] == ["before", "file", "after"]
    assert [b.from_keyval for b in config.blockdevs] == [True, False, True]
    assert [q.path for q in config.qmp] == ["file.sock", "cli.sock"]
    assert config.log_level == "debug"
    assert config.default_used is False


def test_later_scalar_options_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'log-level = "error"\npidfile = "/a.pid"\n')
    config = parse("--log-level", "debug", "--config", path, "--pidfile", "/b.pid")
    assert config.log_level == "error"  # the file came after --log-level debug
    assert config.pidfile == "/b.pid"


def test_chardevs_carry_across_a_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[[qmp]]\npath = "f.sock"\n')
    config = parse("--chardev", SOCKET_CHARDEV, "--config", path, "--monitor", "c0")
    assert [q.path for q in config.qmp] == ["f.sock", "/tmp/q.sock"]


# --- the embedded default -------------------------------------------------------------


def test_no_options_use_the_embedded_default() -> None:
    config = parse()
    assert config.default_used is True
    assert config.qmp == (QmpListener(path=default_qmp_path()),)
    assert config.blockdevs == (
        OptionSpec(
            {"driver": "null-co", "node-name": "null0", "size": 1 << 30, "read-zeroes": True},
            False,
        ),
    )
    assert config.devices == (
        OptionSpec({"driver": "hd", "id": "hd0", "drive": "null0"}, False),
        OptionSpec({"driver": "cd", "id": "cd0"}, False),
    )
    assert config.log_level == "info"
    assert config.socket_mode == 0o600


def test_only_log_level_still_uses_the_default() -> None:
    config = parse("--log-level", "debug")
    assert config.default_used is True
    assert config.log_level == "debug"
    assert [d.args["id"] for d in config.devices] == ["hd0", "cd0"]


def test_bad_log_level_alone_is_still_an_error() -> None:
    assert error_of("--log-level", "loud") == (
        "--log-level loud: expected one of debug, info, warning, error"
    )


def test_default_toml_is_valid_and_documented() -> None:
    data = tomllib.loads(DEFAULT_CONFIG_TOML)
    assert data["qmp"] == [{"path": "/run/blockd/qmp.sock"}]
    assert DEFAULT_CONFIG_TOML.startswith("#")


def test_default_qmp_path_root_with_writable_run(tmp_path: Path) -> None:
    run = str(tmp_path)
    assert default_qmp_path(euid=0, run_dir=run) == os.path.join(run, "blockd", "qmp.sock")
    assert default_config(euid=0, run_dir="/run").qmp[0].path in {
        "/run/blockd/qmp.sock",
        os.path.join(os.getcwd(), "blockd.sock"),
    }


def test_default_qmp_path_non_root_uses_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_qmp_path(euid=1000, run_dir=str(tmp_path)) == str(tmp_path / "blockd.sock")
    config = default_config(euid=1000)
    assert config.qmp == (QmpListener(path=str(tmp_path / "blockd.sock")),)
    assert config.default_used is True


def test_default_qmp_path_root_without_writable_run(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-dir")
    assert default_qmp_path(euid=0, run_dir=missing) == os.path.join(os.getcwd(), "blockd.sock")


def test_configs_are_frozen() -> None:
    config = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log_level = "debug"  # type: ignore[misc]


# --- errors: one line each, naming the option -----------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frobnicate"], "unrecognized option '--frobnicate'"),
        (["-x"], "invalid option -- 'x'"),
        (["-xh"], "invalid option -- 'x'"),
        (["--blockdev"], "option '--blockdev' requires an argument"),
        (["--help=1"], "option '--help' doesn't allow an argument"),
        (["stray"], "Unexpected argument: stray"),
        (["--qmp", "q.sock", "--", "stray"], "Unexpected argument: stray"),
        (
            ["--blockdev", "file,filename"],
            "--blockdev file,filename: Expected '=' after parameter 'filename'",
        ),
        (
            ["--blockdev", '{"driver": '],
            '--blockdev {"driver": : JSON parse error: Expecting value at line 1 column 12',
        ),
        (["--export", "nbd,a.1=x"], "--export nbd,a.1=x: Parameter 'a.0' missing"),
        (
            ["--nbd-server", "addr.type=unix", "--nbd-server", "addr.type=unix"],
            "--nbd-server addr.type=unix: an NBD server is already configured",
        ),
        (["--device", "id=x"], "--device id=x: Parameter 'driver' is missing"),
        (
            ["--device", "fd,id=x"],
            "--device fd,id=x: Parameter 'driver' does not accept value 'fd'",
        ),
        (["--device", "cd"], "--device cd: Parameter 'id' is missing"),
        (["--device", "cd,id="], "--device cd,id=: Parameter 'id' expects a non-empty string"),
        (
            ["--daemonize"],
            "--daemonize: not supported: blockd runs in the foreground, as systemd and other "
            "supervisors expect (use --pidfile or sd_notify to learn when it is ready)",
        ),
        (
            ["-T", "foo*"],
            "--trace foo*: not supported: blockd has no QEMU trace events (use --log-level debug)",
        ),
        (["--pidfile", ""], "--pidfile : the pid file path is empty"),
        (["--qmp", ""], "--qmp : the socket path is empty"),
        (["--qmp", "unix:"], "--qmp unix:: the socket path is empty"),
        (["--qmp", "tcp:x"], "--qmp tcp:x: Parameter 'port' expects a port number (1-65535)"),
        (
            ["--qmp", "tcp:h:70000"],
            "--qmp tcp:h:70000: Parameter 'port' expects a port number (1-65535)",
        ),
        (
            ["--qmp", "q", "--log-level", "x"],
            "--log-level x: expected one of debug, info, warning, error",
        ),
    ],
)
def test_command_line_errors(argv: list[str], message: str) -> None:
    assert error_of(*argv) == message


@pytest.mark.parametrize(
    ("chardev", "message"),
    [
        ("socket,path=a,server=on", "chardev: no id specified"),
        ("id=c", 'chardev: "c" missing backend'),
        (
            "stdio,id=c",
            "chardev backend 'stdio' is not supported by blockd "
            "(only 'socket' can carry a QMP monitor)",
        ),
        ("bogus,id=c", "'bogus' is not a valid char driver name"),
        ("socket,id=c,path=a", "blockd only listens: a QMP chardev needs server=on"),
        ("socket,id=c,path=a,server=off", "blockd only listens: a QMP chardev needs server=on"),
        (
            "socket,id=c,path=a,server=on,wait=on",
            "wait=on is not supported: blockd never waits for a QMP client before starting; "
            "use wait=off",
        ),
        ("socket,id=c,path=a,server=maybe", "Parameter 'server' expects 'on' or 'off'"),
        ("socket,id=c,path=a,server=on,telnet=on", "Parameter 'telnet' is not supported by blockd"),
        ("socket,id=c,path=a,server=on,colour=red", "Invalid parameter 'colour'"),
        ("socket,id=c,server=on", "chardev: socket: no host given"),
        ("socket,id=c,host=h,server=on", "chardev: socket: no port given"),
        (
            "socket,id=c,host=h,port=http,server=on",
            "Parameter 'port' expects a port number (1-65535)",
        ),
        (
            "socket,id=c,path=a,port=1,server=on",
            "chardev: socket: 'path' cannot be combined with 'host' or 'port'",
        ),
        ("socket,id=c,path=,server=on", "chardev: socket: the path is empty"),
    ],
)
def test_chardev_errors(chardev: str, message: str) -> None:
    assert error_of("--chardev", chardev) == f"--chardev {chardev}: {message}"


def test_duplicate_chardev_id() -> None:
    assert error_of("--chardev", SOCKET_CHARDEV, "--chardev", SOCKET_CHARDEV) == (
        f"--chardev {SOCKET_CHARDEV}: Duplicate ID 'c0' for chardev"
    )


@pytest.mark.parametrize(
    ("monitor", "message"),
    [
        ("nope", 'chardev "nope" not found'),
        ("mode=control", "Parameter 'chardev' is missing"),
        ("c0,mode=readline", "Only QMP is supported"),
        ("c0,mode=chatty", "Parameter 'mode' does not accept value 'chatty'"),
        ("c0,pretty=very", "Parameter 'pretty' expects 'on' or 'off'"),
        ("c0,colour=red", "Parameter 'colour' is unexpected"),
        ('{"chardev": 1}', "Invalid parameter type for 'chardev', expected: string"),
        (
            '{"chardev": "c0", "pretty": "on"}',
            "Invalid parameter type for 'pretty', expected: boolean",
        ),
        ("c0,a", "Expected '=' after parameter 'a'"),
        # QEMU's MonitorOptions, member by member in its order: id, mode, pretty, chardev.
        ('{"chardev": "c0", "id": 1}', "Invalid parameter type for 'id', expected: string"),
        ('{"chardev": "c0", "mode": 1}', "Invalid parameter type for 'mode', expected: string"),
        ("mode=chatty,colour=red", "Parameter 'mode' does not accept value 'chatty'"),
        ("pretty=on,colour=red", "Parameter 'chardev' is missing"),
    ],
)
def test_monitor_errors(monitor: str, message: str) -> None:
    argv = ["--monitor", monitor]
    if "not found" not in message:
        argv = ["--chardev", SOCKET_CHARDEV, *argv]
    assert error_of(*argv) == f"--monitor {monitor}: {message}"


def test_monitor_before_its_chardev_is_an_error() -> None:
    # QSD processes options in order: a monitor cannot use a chardev defined later.
    assert error_of("--monitor", "c0", "--chardev", SOCKET_CHARDEV) == (
        '--monitor c0: chardev "c0" not found'
    )


def test_two_monitors_on_one_chardev() -> None:
    assert error_of("--chardev", SOCKET_CHARDEV, "--monitor", "c0", "--monitor", "c0") == (
        '--monitor c0: chardev "c0" is already used by another monitor'
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("colour = 1\n", "colour: unknown key"),
        ("qmp = 1\n", "qmp: expected an array of tables ([[qmp]])"),
        ("blockdev = [1]\n", "blockdev: expected an array of tables ([[blockdev]])"),
        (
            "[[qmp]]\npath = 'a'\nport = 1\n",
            "[[qmp]] #1: give either 'path' or 'host'/'port', not both",
        ),
        ("[[qmp]]\npretty = true\n", "[[qmp]] #1: give 'path' (UNIX socket) or 'port' (TCP)"),
        ("[[qmp]]\npath = ''\n", "[[qmp]] #1: 'path' must be a non-empty string"),
        (
            "[[qmp]]\npath = 'a'\n[[qmp]]\nport = 0\n",
            "[[qmp]] #2: 'port' must be an integer from 1 to 65535",
        ),
        ("[[qmp]]\nport = true\n", "[[qmp]] #1: 'port' must be an integer from 1 to 65535"),
        ("[[qmp]]\nport = 1\nhost = 2\n", "[[qmp]] #1: 'host' must be a string"),
        ("[[qmp]]\npath = 'a'\npretty = 'on'\n", "[[qmp]] #1: 'pretty' must be true or false"),
        ("[[qmp]]\npath = 'a'\nmode = 'x'\n", "[[qmp]] #1: unknown key 'mode'"),
        ("[[device]]\ndriver = 'cd'\n", "[[device]] #1: Parameter 'id' is missing"),
        ("[[device]]\nid = 'x'\n", "[[device]] #1: Parameter 'driver' is missing"),
        (
            "[[device]]\ndriver = 'fd'\nid = 'x'\n",
            "[[device]] #1: Parameter 'driver' does not accept value 'fd'",
        ),
        (
            "[[device]]\ndriver = 'cd'\nid = 3\n",
            "[[device]] #1: Parameter 'id' expects a non-empty string",
        ),
        ("nbd-server = 1\n", "nbd-server: expected a table ([nbd-server])"),
        ("pidfile = 1\n", "pidfile: expected a non-empty string"),
        ("socket-group = ''\n", "socket-group: expected a non-empty string"),
        ("log-level = 'loud'\n", "log-level: expected one of debug, info, warning, error"),
        ("socket-mode = '0968'\n", 'socket-mode: expected an octal string like "0660"'),
        ("socket-mode = 0o1777\n", "socket-mode: expected permission bits from 0000 to 0777"),
        ("socket-mode = true\n", 'socket-mode: expected an octal string like "0660"'),
    ],
)
def test_config_file_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f"{path}: {message}"
    # The same text through --config.
    assert error_of("--config", path) == f"{path}: {message}"


def test_config_file_nbd_server_twice(tmp_path: Path) -> None:
    path = write(tmp_path, "[nbd-server]\naddr = {type = 'unix', path = 'n.sock'}\n")
    assert error_of("--config", path, "--nbd-server", "addr.type=unix,addr.path=m.sock") == (
        "--nbd-server addr.type=unix,addr.path=m.sock: an NBD server is already configured"
    )
    assert error_of("--config", path, "--config", path) == (
        f"{path}: nbd-server: an NBD server is already configured"
    )


def test_config_file_missing(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    assert error_of("--config", path) == f"{path}: cannot read: No such file or directory"


def test_config_file_bad_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "pidfile = \n")
    assert error_of("--config", path) == f"{path}: Invalid value (at line 1, column 11)"


# --- metrics --------------------------------------------------------------------------


def test_metrics_default_to_loopback_9580() -> None:
    assert parse("--qmp", "q.sock").metrics == MetricsListener("127.0.0.1", 9580)
    assert parse().metrics == MetricsListener("127.0.0.1", 9580)
    assert tomllib.loads(DEFAULT_CONFIG_TOML)["metrics"] == {"listen": "127.0.0.1:9580"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", None),
        ("127.0.0.1:0", MetricsListener("127.0.0.1", 0)),
        ("0.0.0.0:9100", MetricsListener("0.0.0.0", 9100)),
        ("[::1]:9580", MetricsListener("::1", 9580)),
        ("localhost:65535", MetricsListener("localhost", 65535)),
        (":9581", MetricsListener("127.0.0.1", 9581)),
    ],
)
def test_metrics_addresses(value: str, expected: MetricsListener | None) -> None:
    assert parse("--qmp", "q.sock", "--metrics", value).metrics == expected
    assert parse("--qmp", "q.sock", f"--metrics={value}").metrics == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("9580", "expected HOST:PORT (for example 127.0.0.1:9580) or none"),
        ("off", "expected HOST:PORT (for example 127.0.0.1:9580) or none"),
        ("127.0.0.1:", "expected a port number (0-65535) after the colon"),
        ("127.0.0.1:65536", "expected a port number (0-65535) after the colon"),
        ("127.0.0.1:-1", "expected a port number (0-65535) after the colon"),
        ("127.0.0.1:http", "expected a port number (0-65535) after the colon"),
    ],
)
def test_metrics_address_errors(value: str, message: str) -> None:
    assert error_of("--qmp", "q.sock", "--metrics", value) == f"--metrics {value}: {message}"


def test_metrics_alone_still_uses_the_embedded_default() -> None:
    config = parse("--metrics", "none", "--log-level", "debug")
    assert config.default_used is True and config.metrics is None
    assert [d.args["id"] for d in config.devices] == ["hd0", "cd0"]
    config = parse("--metrics", "127.0.0.1:0")
    assert config.default_used is True and config.metrics == MetricsListener("127.0.0.1", 0)


def test_metrics_in_the_config_file_and_the_last_one_wins(tmp_path: Path) -> None:
    path = write(tmp_path, '[metrics]\nlisten = "0.0.0.0:9100"\n')
    assert load_config_file(path).metrics == MetricsListener("0.0.0.0", 9100)
    assert parse("--qmp", "q", "--config", path).metrics == MetricsListener("0.0.0.0", 9100)
    assert parse("--qmp", "q", "--config", path, "--metrics", "none").metrics is None
    assert parse("--qmp", "q", "--metrics", "none", "--config", path).metrics == \
        MetricsListener("0.0.0.0", 9100)
    off = write(tmp_path, '[metrics]\nlisten = "none"\n', "off.toml")
    assert load_config_file(off).metrics is None
    empty = write(tmp_path, "[metrics]\n", "empty.toml")
    assert load_config_file(empty).metrics == MetricsListener()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("metrics = 1\n", "metrics: expected a table ([metrics])"),
        ("[metrics]\nport = 1\n", "[metrics] port: unknown key"),
        ("[metrics]\nlisten = 9580\n",
         '[metrics] listen: expected a string like "127.0.0.1:9580" or "none"'),
        ("[metrics]\nlisten = 'x'\n",
         "[metrics] listen: expected HOST:PORT (for example 127.0.0.1:9580) or none"),
    ],
)
def test_metrics_config_file_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value) == f"{path}: {message}"


def test_help_documents_metrics() -> None:
    with pytest.raises(InfoRequested) as info:
        parse("--help")
    assert "--metrics <host>:<port> | none" in info.value.text
    assert "127.0.0.1:9580" in info.value.text


def test_media_poll_interval() -> None:
    assert parse("--qmp", "q").media_poll == 2.0
    assert parse("--qmp", "q", "--media-poll", "0.5").media_poll == 0.5
    assert parse("--qmp", "q", "--media-poll", "0").media_poll == 0.0
    config = parse("--media-poll", "5")
    assert config.default_used is True and config.media_poll == 5.0
    for bad in ("-1", "soon", "inf", "nan"):
        assert error_of("--qmp", "q", "--media-poll", bad).startswith(f"--media-poll {bad}: ")


def test_media_poll_in_the_config_file(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, "media-poll = 0\n")).media_poll == 0.0
    assert load_config_file(write(tmp_path, "media-poll = 1.5\n", "b.toml")).media_poll == 1.5
    with pytest.raises(ConfigError, match="media-poll"):
        load_config_file(write(tmp_path, 'media-poll = "2"\n', "c.toml"))
    with pytest.raises(ConfigError, match="media-poll"):
        load_config_file(write(tmp_path, "media-poll = true\n", "d.toml"))


def test_scsi_passthrough_allowlist(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, "")).scsi_allowed_opcodes is None
    config = load_config_file(write(
        tmp_path, "[scsi-passthrough]\nallowed-opcodes = [0x12, 0x2a, 0]\n", "a.toml"))
    assert config.scsi_allowed_opcodes == frozenset({0x12, 0x2A, 0x00})
    config = load_config_file(write(
        tmp_path, '[scsi-passthrough]\nallowed-opcodes = "all"\n', "b.toml"))
    assert config.scsi_allowed_opcodes == "all"
    for n, (text, message) in enumerate([
        ("allowed-opcodes = [256]", "operation code 256 is outside 0..255"),
        ("allowed-opcodes = [-1]", "operation code -1 is outside"),
        ('allowed-opcodes = ["0x12"]', 'expected "all" or an array of operation codes'),
        ("allowed-opcodes = [true]", 'expected "all" or an array'),
        ('allowed-opcodes = "some"', 'expected "all" or an array'),
        ("allowed = [1]", r"\[scsi-passthrough\] allowed: unknown key"),
    ]):
        with pytest.raises(ConfigError, match=message):
            load_config_file(write(tmp_path, f"[scsi-passthrough]\n{text}\n", f"bad{n}.toml"))


def test_allowed_paths(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, "")).allowed_paths is None
    config = load_config_file(write(
        tmp_path, 'allowed-paths = ["/var/lib/images/", "/dev/sd*"]\n', "a.toml"))
    assert config.allowed_paths == ("/var/lib/images/", "/dev/sd*")
    assert load_config_file(write(tmp_path, "allowed-paths = []\n", "b.toml")).allowed_paths == ()
    for n, text in enumerate(['allowed-paths = "/x"', 'allowed-paths = ["relative/x"]',
                              "allowed-paths = [1]"]):
        with pytest.raises(ConfigError, match="allowed-paths: expected an array of absolute"):
            load_config_file(write(tmp_path, text + "\n", f"bad{n}.toml"))


def test_tls_objects_listeners_and_insecure_network() -> None:
    config = parse_command_line([
        "--object", "tls-creds-x509,id=tls0,dir=/etc/pki/blockd,endpoint=server",
        "--chardev", "socket,id=m0,host=0.0.0.0,port=4444,server=on,wait=off,tls-creds=tls0",
        "--monitor", "m0",
        "--insecure-network",
    ])
    assert config.objects[0].args == {
        "qom-type": "tls-creds-x509", "id": "tls0", "dir": "/etc/pki/blockd",
        "endpoint": "server"}
    assert config.qmp[0].tls_creds == "tls0" and config.qmp[0].host == "0.0.0.0"
    assert config.insecure_network is True
    assert parse_command_line(["--qmp", "/tmp/q.sock"]).insecure_network is False


def test_tls_in_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "blockd.toml"
    path.write_text(
        'insecure-network = false\n'
        '[[object]]\nqom-type = "tls-creds-x509"\nid = "tls0"\ndir = "/x"\n'
        'endpoint = "server"\n'
        '[[qmp]]\nhost = "::"\nport = 4444\ntls-creds = "tls0"\n')
    config = load_config_file(path)
    assert config.objects[0].args["endpoint"] == "server"
    assert config.qmp[0].tls_creds == "tls0"
    path.write_text('insecure-network = "yes"\n')
    with pytest.raises(ConfigError, match="insecure-network: expected true or false"):
        load_config_file(path)
    with pytest.raises(ConfigError, match="tls-authz"):
        parse_command_line(["--chardev", "socket,id=m,port=1,server=on,tls-authz=a"])
