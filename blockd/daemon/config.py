"""The daemon's configuration: command line and TOML file in, frozen dataclasses out.

The command line is qemu-storage-daemon's, so QSD command lines work unchanged::

    blockd --chardev socket,id=qmp0,path=/run/qsd.sock,server=on,wait=off \\
           --monitor chardev=qmp0 \\
           --blockdev driver=host_cdrom,node-name=sr0,filename=/dev/sr0 \\
           --nbd-server addr.type=unix,addr.path=/run/nbd.sock \\
           --export type=nbd,id=e0,node-name=sr0

plus blockd's own options: ``--device``, ``--qmp``, ``--metrics``, ``--config``,
``--log-level``.  Like
QSD, options are processed in the order given (a ``--monitor`` must follow its
``--chardev``), and blockdevs and devices keep their order.  ``--config FILE`` inserts the
file's contents at its place in that order; list-like options accumulate, single-valued
ones (``--pidfile``, ``--log-level``, the socket mode and group) take the last value.

Values of ``--blockdev``, ``--device``, ``--nbd-server`` and ``--export`` are kept as
:class:`OptionSpec`: the parsed arguments plus whether they came from keyval (strings the
QMP schema must coerce) or from JSON/TOML (already typed).  This module checks syntax,
the chardev/monitor wiring and blockd's own ``--device``; the argument schemas of
``blockdev-add`` and friends are checked when the daemon applies the options.
``--monitor`` is QEMU's MonitorOptions, declared as a dataclass and checked by the QMP
schema (:mod:`blockd.qmp.schema`), so its texts are QEMU's.  The rest is checked by hand
on purpose: ``--chardev`` is QemuOpts (flat, bare flags), the TOML tables have blockd's
own texts, and ``--device`` checks only its model and id here (device_add checks the rest).

Every problem raises :class:`ConfigError` whose message is one line that names the
option, e.g. ``--monitor chardev=mon0: chardev "mon0" not found``.

With no options at all (or only ``--log-level``, ``--metrics``, ``--media-poll``) the
daemon runs the embedded default configuration, :data:`DEFAULT_CONFIG_TOML`; see
:func:`default_config`.

Prometheus metrics are served on ``127.0.0.1:9580`` unless ``--metrics`` (or the file's
``[metrics] listen``) says otherwise; ``--metrics none`` turns them off.
"""

from __future__ import annotations

import os
import tomllib
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NoReturn

from blockd import __version__
from blockd.hotplug.rules import Rule, RuleError, parse_rules
from blockd.qmp.keyval import KeyvalError, parse_option, parse_qemu_opts
from blockd.qmp.schema import SchemaError, validate

__all__ = [
    "DEFAULT_CONFIG_TOML",
    "LOG_LEVELS",
    "USAGE",
    "ConfigError",
    "DaemonConfig",
    "InfoRequested",
    "Limits",
    "MetricsListener",
    "OptionSpec",
    "QmpListener",
    "default_config",
    "default_qmp_path",
    "load_config_file",
    "parse_command_line",
]

LOG_LEVELS = ("debug", "info", "warning", "error")

#: The configuration used when blockd is started without options.  It gives a daemon
#: that can be tried at once: a 1 GiB ``null-co`` node that reads zeroes, a hard disk
#: ``hd0`` on it and an empty CD-ROM drive ``cd0``.  The QMP path below is the one used
#: when running as root with a writable ``/run``; otherwise :func:`default_config`
#: replaces it with ``blockd.sock`` in the working directory.
DEFAULT_CONFIG_TOML = """\
# blockd's embedded default configuration.
log-level = "info"
socket-mode = "0600"

[[qmp]]
path = "/run/blockd/qmp.sock"

[metrics]
listen = "127.0.0.1:9580"

[[blockdev]]
driver = "null-co"
node-name = "null0"
size = 1073741824
read-zeroes = true

[[device]]
driver = "hd"
id = "hd0"
drive = "null0"

[[device]]
driver = "cd"
id = "cd0"
"""

_ROOT_QMP_PATH = "/run/blockd/qmp.sock"
_USER_QMP_NAME = "blockd.sock"
_LOOPBACK = "127.0.0.1"
_DEFAULT_METRICS_PORT = 9580
DEFAULT_MEDIA_POLL = 2.0  # seconds between drive-status reads of host drives

USAGE = f"""\
Usage: blockd [options]
blockd {__version__}: a QMP-compatible block-device daemon for real host drives

  -h, --help             display this help and exit
  -V, --version          output version information and exit

qemu-storage-daemon options:
  --blockdev [driver=]<driver>,node-name=<N>[,...]   (or a JSON object)
                         add a block node, as QMP's blockdev-add
  --chardev socket,id=<id>,path=<path>,server=on,wait=off
  --chardev socket,id=<id>,host=<host>,port=<port>,server=on,wait=off[,tls-creds=<id>]
                         define a listening socket for --monitor
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                         serve QMP on that chardev
  --nbd-server addr.type=unix,addr.path=<path>
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,tls-creds=<id>]
                         start the NBD server
  --export [type=]nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on|off]
                         export a node over NBD
  --object tls-creds-x509,id=<id>,dir=<dir>,endpoint=server[,verify-peer=on|off]
                         TLS credentials (QEMU's file layout in <dir>), used by
                         --nbd-server ...,tls-creds=<id> and --chardev ...,tls-creds=<id>
  --pidfile <path>       write the pid there once ready

blockd options:
  --device cd|hd,id=<id>[,drive=<node>][,rerror=<action>][,werror=<action>]
                         add a device (a CD-ROM drive or a disk) over a node
  --qmp <path> | tcp:[<host>:]<port>
                         serve QMP on a UNIX socket, or TCP (loopback by default)
  --metrics <host>:<port> | none
                         serve Prometheus metrics over HTTP at /metrics
                         (default 127.0.0.1:9580; port 0 picks a free port;
                         none turns the endpoint off)
  --media-poll <seconds> how often to read the status of host CD-ROM drives, for
                         changes udev does not report (default 2; 0 turns it off)
  --insecure-network     allow QMP and NBD on non-loopback TCP addresses without TLS
  --config <file>        read a TOML configuration file at this point
  --log-level debug|info|warning|error

With no options (other than --log-level, --metrics and --media-poll), blockd runs its
embedded default configuration (a null-co disk hd0, an empty CD-ROM drive cd0, QMP on
/run/blockd/qmp.sock or ./blockd.sock, metrics on 127.0.0.1:9580).
blockd runs in the foreground; --daemonize is not supported.
"""

# Options that take a value, and flags.  Short forms map to their long names.
_VALUE_OPTIONS = frozenset(
    {
        "--blockdev", "--chardev", "--monitor", "--nbd-server", "--export", "--object",
        "--pidfile", "--device", "--qmp", "--config", "--log-level", "--trace",
        "--metrics", "--media-poll",
    }
)  # fmt: skip
_FLAG_OPTIONS = frozenset({"--help", "--version", "--daemonize", "--insecure-network"})
# Options that tune the embedded default rather than replace it.
_DEFAULT_KEEPING = frozenset({"--log-level", "--metrics", "--media-poll"})
_SHORT_OPTIONS = {"-h": "--help", "-V": "--version", "-T": "--trace"}

_DEVICE_DRIVERS = ("cd", "hd")
_BOOL_WORDS = {"on": True, "yes": True, "true": True, "y": True,
               "off": False, "no": False, "false": False, "n": False}  # fmt: skip

# QEMU chardev backends blockd knows of but does not serve QMP on.
_OTHER_CHARDEV_BACKENDS = frozenset(
    {
        "null", "file", "pipe", "pty", "stdio", "serial", "tty", "parallel", "parport",
        "udp", "ringbuf", "memory", "console", "msmouse", "wctablet", "braille",
        "testdev", "vc", "spicevmc", "spiceport", "qemu-vdagent", "dbus", "mux",
    }
)  # fmt: skip
# QEMU's socket chardev parameters that blockd does not implement.
_UNSUPPORTED_SOCKET_PARAMS = frozenset(
    {
        "to", "ipv4", "ipv6", "nodelay", "telnet", "tn3270", "websocket", "reconnect",
        "reconnect-ms", "tls-authz", "abstract", "tight", "fd", "logfile",
        "logappend", "mux", "keep-alive",
    }
)  # fmt: skip


class ConfigError(Exception):
    """The command line or a config file is wrong; ``str()`` is one line naming the option."""


@dataclass(frozen=True, slots=True)
class Limits:
    """``[limits]``: the bounds on what clients can make the daemon hold (see
    docs/reliability.md).  The defaults are the servers' own; timeouts in seconds."""

    nbd_in_flight_requests: int = 128
    nbd_in_flight_bytes: int = 64 << 20
    nbd_unsent_reply_bytes: int = 8 << 20
    device_in_flight: int = 64
    qmp_queued_reply_bytes: int = 64 << 20
    handshake_timeout: float = 10.0
    message_timeout: float = 10.0
    stall_timeout: float = 60.0
    open_timeout: float = 30.0
    shutdown_timeout: float = 10.0
    metrics_connections: int = 16
    qmp_partial_bytes: int = 128 << 20


_LIMIT_KEYS = {f.replace("_", "-"): f for f in Limits.__dataclass_fields__}


def _limits_from_table(table: Mapping[str, object], limits: Limits) -> Limits:
    """``limits`` with the values of a ``[limits]`` table; raises _OptionError naming
    the key (``[limits] KEY: ...``) for an unknown key or a wrong value."""
    changes: dict[str, object] = {}
    for key, value in table.items():
        name = _LIMIT_KEYS.get(key)
        if name is None:
            raise _OptionError(f"[limits] {key}: unknown key")
        if key.endswith("-timeout"):
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not 0 < value < float("inf")):
                raise _OptionError(f"[limits] {key}: expected a number of seconds above 0")
            changes[name] = float(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _OptionError(f"[limits] {key}: expected a whole number, 1 or more")
            changes[name] = value
    return replace(limits, **changes)  # type: ignore[arg-type]


class InfoRequested(Exception):
    """``-h`` or ``-V`` was given: print :attr:`text` to stdout and exit successfully."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass(frozen=True, slots=True)
class QmpListener:
    """Where to serve QMP: a UNIX socket ``path``, or TCP ``host``:``port``."""

    path: str | None = None
    host: str | None = None
    port: int | None = None
    pretty: bool = False
    tls_creds: str | None = None
    """The id of a ``tls-creds-x509`` object: TLS from the first byte, as QEMU's chardev."""


@dataclass(frozen=True, slots=True)
class MetricsListener:
    """Where to serve Prometheus metrics over HTTP (``port`` 0: any free port)."""

    host: str = _LOOPBACK
    port: int = _DEFAULT_METRICS_PORT


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One ``--blockdev``/``--device``/``--nbd-server``/``--export`` value, parsed.

    ``from_keyval`` says the leaves of ``args`` are strings from keyval syntax, which the
    QMP schema must coerce to the declared types; otherwise they came from JSON or TOML
    and already have their types.
    """

    args: Mapping[str, object]
    from_keyval: bool


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Everything the daemon needs to start, in the order the user gave it."""

    qmp: tuple[QmpListener, ...]
    blockdevs: tuple[OptionSpec, ...]
    devices: tuple[OptionSpec, ...]
    nbd_server: OptionSpec | None
    exports: tuple[OptionSpec, ...]
    pidfile: str | None
    log_level: str
    socket_mode: int = 0o600
    socket_group: str | None = None
    default_used: bool = False
    objects: tuple[OptionSpec, ...] = ()
    """``--object`` and ``[[object]]``: object-add's arguments (TLS credentials)."""
    insecure_network: bool = False
    """QMP and NBD may listen beyond loopback without TLS (``--insecure-network``)."""
    metrics: MetricsListener | None = MetricsListener()
    """Where to serve metrics; None when turned off (``--metrics none``)."""
    media_poll: float = DEFAULT_MEDIA_POLL
    """Seconds between drive-status reads of host drives; 0: off (``--media-poll``)."""
    scsi_allowed_opcodes: frozenset[int] | Literal["all"] | None = None
    """What blockd-scsi-command may send (``[scsi-passthrough]``); None: the safe default."""
    hotplug_rules: tuple[Rule, ...] = ()
    """``[[hotplug.rule]]``: which host devices udev events attach (none: hotplug is off)."""
    allowed_paths: tuple[str, ...] | None = None
    """``allowed-paths``: what QMP clients may open (None: see blockd.qmp.paths)."""
    limits: Limits = Limits()
    """``[limits]``: bounds on what clients can make the daemon hold, and timeouts."""


@dataclass(frozen=True, slots=True)
class _Chardev:
    """A ``--chardev`` waiting for its ``--monitor``."""

    path: str | None
    host: str | None
    port: int | None
    tls_creds: str | None = None


@dataclass(slots=True)
class _Builder:
    """Mutable accumulator while options are processed in order."""

    qmp: list[QmpListener] = field(default_factory=list)
    blockdevs: list[OptionSpec] = field(default_factory=list)
    devices: list[OptionSpec] = field(default_factory=list)
    nbd_server: OptionSpec | None = None
    exports: list[OptionSpec] = field(default_factory=list)
    objects: list[OptionSpec] = field(default_factory=list)
    insecure_network: bool = False
    pidfile: str | None = None
    log_level: str = "info"
    socket_mode: int = 0o600
    socket_group: str | None = None
    metrics: MetricsListener | None = MetricsListener()
    media_poll: float = DEFAULT_MEDIA_POLL
    scsi_allowed_opcodes: frozenset[int] | Literal["all"] | None = None
    hotplug_rules: tuple[Rule, ...] = ()
    allowed_paths: tuple[str, ...] | None = None
    limits: Limits = Limits()
    chardevs: dict[str, _Chardev] = field(default_factory=dict)
    used_chardevs: set[str] = field(default_factory=set)

    def build(self, *, default_used: bool = False) -> DaemonConfig:
        return DaemonConfig(
            qmp=tuple(self.qmp),
            blockdevs=tuple(self.blockdevs),
            devices=tuple(self.devices),
            nbd_server=self.nbd_server,
            exports=tuple(self.exports),
            pidfile=self.pidfile,
            log_level=self.log_level,
            socket_mode=self.socket_mode,
            socket_group=self.socket_group,
            default_used=default_used,
            objects=tuple(self.objects),
            insecure_network=self.insecure_network,
            metrics=self.metrics,
            media_poll=self.media_poll,
            scsi_allowed_opcodes=self.scsi_allowed_opcodes,
            hotplug_rules=self.hotplug_rules,
            allowed_paths=self.allowed_paths,
            limits=self.limits,
        )


class _OptionError(Exception):
    """An option's value is wrong; the caller adds which option it was."""


# --------------------------------------------------------------------------------------
# The command line


def parse_command_line(argv: Sequence[str]) -> DaemonConfig:
    """Turn the arguments (without the program name) into a :class:`DaemonConfig`.

    :raise ConfigError: for any mistake, with one line naming the option.
    :raise InfoRequested: for ``-h``/``--help`` and ``-V``/``--version``.
    """
    options = _split_options(argv)
    use_default = all(name in _DEFAULT_KEEPING for name, _ in options)
    builder = _Builder()
    for name, value in options:
        try:
            _apply_option(builder, name, value)
        except _OptionError as exc:
            shown = name if value is None else f"{name} {value}"
            raise ConfigError(f"{shown}: {exc}") from None
    if use_default:
        return replace(default_config(), log_level=builder.log_level, metrics=builder.metrics,
                       media_poll=builder.media_poll)
    return builder.build()


def _split_options(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    """Split argv into (long option name, value) pairs the way getopt_long would."""
    result: list[tuple[str, str | None]] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            if i < len(args):
                raise ConfigError(f"Unexpected argument: {args[i]}")
            break
        if arg.startswith("--"):
            name, equals, inline = arg.partition("=")
            value: str | None = inline if equals else None
            if name not in _VALUE_OPTIONS and name not in _FLAG_OPTIONS:
                raise ConfigError(f"unrecognized option '{name}'")
            if name in _FLAG_OPTIONS and equals:
                raise ConfigError(f"option '{name}' doesn't allow an argument")
        elif arg.startswith("-") and len(arg) > 1:
            short = arg[:2]
            if short not in _SHORT_OPTIONS:
                raise ConfigError(f"invalid option -- '{arg[1]}'")
            name = _SHORT_OPTIONS[short]
            value = arg[2:] or None
            if name in _FLAG_OPTIONS and value is not None:
                args.insert(i, "-" + value)  # bundled flags: -hV is -h -V
                value = None
        else:
            raise ConfigError(f"Unexpected argument: {arg}")
        if name in _VALUE_OPTIONS and value is None:
            if i >= len(args):
                raise ConfigError(f"option '{name}' requires an argument")
            value = args[i]
            i += 1
        if name == "--help":
            raise InfoRequested(USAGE)
        if name == "--version":
            raise InfoRequested(f"blockd {__version__}\n")
        result.append((name, value))
    return result


def _apply_option(builder: _Builder, name: str, value: str | None) -> None:
    """Apply one option to the builder; raise :class:`_OptionError` if it is wrong."""
    if name == "--daemonize":
        raise _OptionError(
            "not supported: blockd runs in the foreground, as systemd and other "
            "supervisors expect (use --pidfile or sd_notify to learn when it is ready)"
        )
    if name == "--insecure-network":
        builder.insecure_network = True
        return
    assert value is not None
    match name:
        case "--blockdev":
            builder.blockdevs.append(_keyval_spec(value, "driver"))
        case "--device":
            spec = _keyval_spec(value, "driver")
            _check_device(spec.args)
            builder.devices.append(spec)
        case "--export":
            builder.exports.append(_keyval_spec(value, "type"))
        case "--nbd-server":
            if builder.nbd_server is not None:
                raise _OptionError("an NBD server is already configured")
            builder.nbd_server = _keyval_spec(value, None)
        case "--object":
            builder.objects.append(_keyval_spec(value, "qom-type"))
        case "--chardev":
            _add_chardev(builder, value)
        case "--monitor":
            builder.qmp.append(_monitor_listener(builder, value))
        case "--qmp":
            builder.qmp.append(_parse_qmp_address(value))
        case "--metrics":
            builder.metrics = _parse_metrics_address(value)
        case "--media-poll":
            builder.media_poll = _parse_seconds(value)
        case "--pidfile":
            if not value:
                raise _OptionError("the pid file path is empty")
            builder.pidfile = value
        case "--log-level":
            if value not in LOG_LEVELS:
                raise _OptionError(f"expected one of {', '.join(LOG_LEVELS)}")
            builder.log_level = value
        case "--config":
            _apply_file(builder, value)
        case "--trace":
            raise _OptionError(
                "not supported: blockd has no QEMU trace events (use --log-level debug)"
            )
        case _:  # pragma: no cover - _split_options only yields known names
            raise AssertionError(name)


def _keyval_spec(value: str, implied_key: str | None) -> OptionSpec:
    try:
        args, from_keyval = parse_option(value, implied_key)
    except KeyvalError as exc:
        raise _OptionError(str(exc)) from None
    return OptionSpec(types.MappingProxyType(args), from_keyval)


def _check_device(args: Mapping[str, object]) -> None:
    """Check blockd's own ``--device``/``[[device]]``: a known driver and an id."""
    driver = args.get("driver")
    if driver is None:
        raise _OptionError("Parameter 'driver' is missing")
    if driver not in _DEVICE_DRIVERS:
        raise _OptionError(f"Parameter 'driver' does not accept value '{driver}'")
    device_id = args.get("id")
    if device_id is None:
        raise _OptionError("Parameter 'id' is missing")
    if not isinstance(device_id, str) or not device_id:
        raise _OptionError("Parameter 'id' expects a non-empty string")


def _add_chardev(builder: _Builder, value: str) -> None:
    """Record a ``--chardev``; only listening sockets are accepted."""
    try:
        opts = parse_qemu_opts(value, "backend")
    except KeyvalError as exc:
        raise _OptionError(str(exc)) from None
    chardev_id = opts.pop("id", None)
    backend = opts.pop("backend", None)
    if not chardev_id:
        raise _OptionError("chardev: no id specified")
    if backend is None:
        raise _OptionError(f'chardev: "{chardev_id}" missing backend')
    if backend in _OTHER_CHARDEV_BACKENDS:
        raise _OptionError(
            f"chardev backend '{backend}' is not supported by blockd "
            "(only 'socket' can carry a QMP monitor)"
        )
    if backend != "socket":
        raise _OptionError(f"'{backend}' is not a valid char driver name")
    if chardev_id in builder.chardevs:
        raise _OptionError(f"Duplicate ID '{chardev_id}' for chardev")

    for key in opts:
        if key in _UNSUPPORTED_SOCKET_PARAMS:
            raise _OptionError(f"Parameter '{key}' is not supported by blockd")
        if key not in {"path", "host", "port", "server", "wait", "tls-creds"}:
            raise _OptionError(f"Invalid parameter '{key}'")
    if not _qemu_bool("server", opts.get("server", "off")):
        raise _OptionError("blockd only listens: a QMP chardev needs server=on")
    if _qemu_bool("wait", opts.get("wait", "off")):
        raise _OptionError(
            "wait=on is not supported: blockd never waits for a QMP client before "
            "starting; use wait=off"
        )
    path = opts.get("path")
    host = opts.get("host")
    port_text = opts.get("port")
    tls_creds = opts.get("tls-creds") or None
    if path is not None:
        if host is not None or port_text is not None:
            raise _OptionError("chardev: socket: 'path' cannot be combined with 'host' or 'port'")
        if not path:
            raise _OptionError("chardev: socket: the path is empty")
        builder.chardevs[chardev_id] = _Chardev(path, None, None, tls_creds)
        return
    if port_text is None:
        if host is None:
            raise _OptionError("chardev: socket: no host given")
        raise _OptionError("chardev: socket: no port given")
    builder.chardevs[chardev_id] = _Chardev(
        None, host or _LOOPBACK, _port("port", port_text), tls_creds)


def _qemu_bool(name: str, text: str) -> bool:
    try:
        return _BOOL_WORDS[text]
    except KeyError:
        raise _OptionError(f"Parameter '{name}' expects 'on' or 'off'") from None


def _port(name: str, text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _OptionError(f"Parameter '{name}' expects a port number (1-65535)")
    return int(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class _MonitorOptions:
    """``--monitor``: QEMU's MonitorOptions, checked by the QMP schema (QEMU's texts)."""

    id: str | None = None
    mode: Literal["readline", "control"] = "control"
    pretty: bool = False
    chardev: str


def _monitor_listener(builder: _Builder, value: str) -> QmpListener:
    """Resolve a ``--monitor`` against the chardevs defined before it."""
    try:
        args, from_keyval = parse_option(value, "chardev")
        options = validate(_MonitorOptions, args, keyval=from_keyval)
    except (KeyvalError, SchemaError) as exc:
        raise _OptionError(str(exc)) from None
    if options.mode == "readline":
        raise _OptionError("Only QMP is supported")
    chardev = builder.chardevs.get(options.chardev)
    if chardev is None:
        raise _OptionError(f'chardev "{options.chardev}" not found')
    if options.chardev in builder.used_chardevs:
        raise _OptionError(f'chardev "{options.chardev}" is already used by another monitor')
    builder.used_chardevs.add(options.chardev)
    return QmpListener(chardev.path, chardev.host, chardev.port, options.pretty,
                       chardev.tls_creds)


def _parse_seconds(value: str) -> float:
    """A non-negative number of seconds (``--media-poll``)."""
    try:
        seconds = float(value)
    except ValueError:
        raise _OptionError(f"'{value}' is not a number of seconds") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise _OptionError("expected a finite number of seconds, 0 or more")
    return seconds


def _parse_metrics_address(value: str) -> MetricsListener | None:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, ``:PORT`` (loopback) or ``none``; port 0 is any
    free port.  Raises :class:`_OptionError`."""
    if value == "none":
        return None
    host, colon, port_text = value.rpartition(":")
    if not colon:
        raise _OptionError("expected HOST:PORT (for example 127.0.0.1:9580) or none")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise _OptionError("expected a port number (0-65535) after the colon")
    return MetricsListener(host=host or _LOOPBACK, port=int(port_text))


def _parse_qmp_address(value: str) -> QmpListener:
    """``PATH``, ``unix:PATH``, ``tcp:PORT``, ``tcp::PORT``, ``tcp:HOST:PORT``,
    ``tcp:[V6ADDR]:PORT``.  TCP without a host binds the loopback address."""
    if value.startswith("tcp:"):
        rest = value[4:]
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            host, port_text = "", rest
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return QmpListener(host=host or _LOOPBACK, port=_port("port", port_text))
    path = value.removeprefix("unix:")
    if not path:
        raise _OptionError("the socket path is empty")
    return QmpListener(path=path)


# --------------------------------------------------------------------------------------
# The TOML file


def load_config_file(path: str | os.PathLike[str]) -> DaemonConfig:
    """Read a TOML configuration file on its own (as ``--config FILE`` alone would).

    :raise ConfigError: if the file cannot be read or is wrong; the message starts with
        the file's path.
    """
    builder = _Builder()
    _apply_file(builder, os.fspath(path))
    return builder.build()


def _apply_file(builder: _Builder, path: str) -> None:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    _apply_table(builder, data, path)


def _apply_table(builder: _Builder, data: Mapping[str, object], source: str) -> None:
    """Apply a parsed TOML document; errors are prefixed with ``source``."""

    def fail(where: str, message: str) -> NoReturn:
        raise ConfigError(f"{source}: {where}: {message}")

    def section(key: str, value: object, keys: tuple[str, ...], expected: str
                ) -> dict[str, object]:
        """A ``[key]`` table whose members are all among ``keys``."""
        if not isinstance(value, dict):
            fail(key, expected)
        for name in value:
            if name not in keys:
                fail(f"[{key}] {name}", "unknown key")
        return value

    for key, value in data.items():
        match key:
            case "qmp":
                for n, table in enumerate(_tables(value, source, key), 1):
                    try:
                        builder.qmp.append(_qmp_from_table(table))
                    except _OptionError as exc:
                        fail(f"[[qmp]] #{n}", str(exc))
            case "object":
                for table in _tables(value, source, key):
                    builder.objects.append(OptionSpec(types.MappingProxyType(dict(table)), False))
            case "insecure-network":
                if not isinstance(value, bool):
                    fail(key, "expected true or false")
                builder.insecure_network = value
            case "blockdev" | "export":
                target = builder.blockdevs if key == "blockdev" else builder.exports
                for table in _tables(value, source, key):
                    target.append(OptionSpec(types.MappingProxyType(dict(table)), False))
            case "device":
                for n, table in enumerate(_tables(value, source, key), 1):
                    try:
                        _check_device(table)
                    except _OptionError as exc:
                        fail(f"[[device]] #{n}", str(exc))
                    builder.devices.append(OptionSpec(types.MappingProxyType(dict(table)), False))
            case "nbd-server":
                if not isinstance(value, dict):
                    fail(key, "expected a table ([nbd-server])")
                if builder.nbd_server is not None:
                    fail(key, "an NBD server is already configured")
                builder.nbd_server = OptionSpec(types.MappingProxyType(dict(value)), False)
            case "pidfile" | "socket-group":
                if not isinstance(value, str) or not value:
                    fail(key, "expected a non-empty string")
                if key == "pidfile":
                    builder.pidfile = value
                else:
                    builder.socket_group = value
            case "log-level":
                if value not in LOG_LEVELS:
                    fail(key, f"expected one of {', '.join(LOG_LEVELS)}")
                assert isinstance(value, str)
                builder.log_level = value
            case "socket-mode":
                try:
                    builder.socket_mode = _socket_mode(value)
                except _OptionError as exc:
                    fail(key, str(exc))
            case "media-poll":
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    fail(key, "expected a number of seconds (0 turns polling off)")
                builder.media_poll = float(value)
            case "metrics":
                value = section(key, value, ("listen",), "expected a table ([metrics])")
                listen = value.get("listen")
                if listen is None:
                    continue
                if not isinstance(listen, str):
                    fail("[metrics] listen", 'expected a string like "127.0.0.1:9580" or "none"')
                try:
                    builder.metrics = _parse_metrics_address(listen)
                except _OptionError as exc:
                    fail("[metrics] listen", str(exc))
            case "allowed-paths":
                if not isinstance(value, list) or not all(
                        isinstance(v, str) and v.startswith("/") for v in value):
                    fail(key, 'expected an array of absolute paths, directories or globs '
                              '(["/var/lib/images/", "/dev/sd*"])')
                builder.allowed_paths = tuple(value)
            case "limits":
                if not isinstance(value, dict):
                    fail(key, "expected a table ([limits])")
                try:
                    builder.limits = _limits_from_table(value, builder.limits)
                except _OptionError as exc:
                    raise ConfigError(f"{source}: {exc}") from None
            case "hotplug":
                value = section(key, value, ("rule",),
                                "expected a table ([[hotplug.rule]] arrays go in it)")
                try:
                    builder.hotplug_rules = parse_rules(value.get("rule", []))
                except RuleError as exc:
                    fail("hotplug", str(exc))
            case "scsi-passthrough":
                value = section(key, value, ("allowed-opcodes",),
                                "expected a table ([scsi-passthrough])")
                if "allowed-opcodes" in value:
                    try:
                        builder.scsi_allowed_opcodes = _opcodes(value["allowed-opcodes"])
                    except _OptionError as exc:
                        fail("[scsi-passthrough] allowed-opcodes", str(exc))
            case _:
                fail(key, "unknown key")


def _opcodes(value: object) -> frozenset[int] | Literal["all"]:
    """``"all"`` or an array of SCSI operation codes (0 to 255, e.g. ``0x12``)."""
    if value == "all":
        return "all"
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise _OptionError('expected "all" or an array of operation codes such as [0x12, 0x28]')
    bad = [v for v in value if not 0 <= v <= 0xFF]
    if bad:
        raise _OptionError(f"operation code {bad[0]} is outside 0..255 (0x00..0xff)")
    return frozenset(value)


def _tables(value: object, source: str, key: str) -> list[dict[str, object]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{source}: {key}: expected an array of tables ([[{key}]])")
    return value


def _qmp_from_table(table: Mapping[str, object]) -> QmpListener:
    for key in table:
        if key not in {"path", "host", "port", "pretty", "tls-creds"}:
            raise _OptionError(f"unknown key '{key}'")
    path, host, port = table.get("path"), table.get("host"), table.get("port")
    pretty = table.get("pretty", False)
    if not isinstance(pretty, bool):
        raise _OptionError("'pretty' must be true or false")
    tls_creds = table.get("tls-creds")
    if tls_creds is not None and (not isinstance(tls_creds, str) or not tls_creds):
        raise _OptionError("'tls-creds' must be the id of a tls-creds-x509 object")
    if path is not None:
        if host is not None or port is not None:
            raise _OptionError("give either 'path' or 'host'/'port', not both")
        if not isinstance(path, str) or not path:
            raise _OptionError("'path' must be a non-empty string")
        return QmpListener(path=path, pretty=pretty, tls_creds=tls_creds)
    if port is None:
        raise _OptionError("give 'path' (UNIX socket) or 'port' (TCP)")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _OptionError("'port' must be an integer from 1 to 65535")
    if host is not None and not isinstance(host, str):
        raise _OptionError("'host' must be a string")
    return QmpListener(host=host or _LOOPBACK, port=port, pretty=pretty, tls_creds=tls_creds)


def _socket_mode(value: object) -> int:
    """An octal string like ``"0660"`` (or a TOML integer such as ``0o660``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and value and all(c in "01234567" for c in value):
        mode = int(value, 8)
    else:
        raise _OptionError('expected an octal string like "0660"')
    if not 0 <= mode <= 0o777:
        raise _OptionError("expected permission bits from 0000 to 0777")
    return mode


# --------------------------------------------------------------------------------------
# The embedded default


def default_qmp_path(euid: int | None = None, run_dir: str = "/run") -> str:
    """Where the default configuration serves QMP.

    ``/run/blockd/qmp.sock`` when running as root and ``run_dir`` is writable (the daemon
    creates ``/run/blockd``), else ``blockd.sock`` in the current working directory, as
    an absolute path.
    """
    if euid is None:
        euid = os.geteuid()
    if euid == 0 and os.access(run_dir, os.W_OK):
        return os.path.join(run_dir, "blockd", "qmp.sock")
    return os.path.join(os.getcwd(), _USER_QMP_NAME)


def default_config(euid: int | None = None, run_dir: str = "/run") -> DaemonConfig:
    """The configuration from :data:`DEFAULT_CONFIG_TOML`, with ``default_used=True``
    and the QMP path chosen by :func:`default_qmp_path`."""
    builder = _Builder()
    _apply_table(builder, tomllib.loads(DEFAULT_CONFIG_TOML), "<embedded default>")
    path = default_qmp_path(euid, run_dir)
    builder.qmp = [replace(q, path=path) if q.path == _ROOT_QMP_PATH else q for q in builder.qmp]
    return builder.build(default_used=True)
