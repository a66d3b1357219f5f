"""``[limits]``: the bounds in the configuration file, checked like the other tables,
and passed to the servers that enforce them."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockd.block.device import DEFAULT_MAX_IN_FLIGHT
from blockd.block.opens import DEFAULT_OPEN_TIMEOUT
from blockd.daemon.config import ConfigError, Limits, load_config_file
from blockd.daemon.root import Daemon
from blockd.monitoring.http import MAX_CONNECTIONS
from blockd.nbd.connection import HANDSHAKE_TIMEOUT, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES
from blockd.nbd.replies import MAX_UNSENT
from blockd.qmp.server import MAX_QUEUED_BYTES, MESSAGE_TIMEOUT, STALL_TIMEOUT


def _load(tmp_path: Path, text: str) -> Limits:
    path = tmp_path / "blockd.toml"
    path.write_text(text)
    return load_config_file(path).limits


def test_the_defaults_are_the_servers_own() -> None:
    assert Limits() == Limits(
        nbd_in_flight_requests=MAX_IN_FLIGHT, nbd_in_flight_bytes=MAX_IN_FLIGHT_BYTES,
        nbd_unsent_reply_bytes=MAX_UNSENT, device_in_flight=DEFAULT_MAX_IN_FLIGHT,
        qmp_queued_reply_bytes=MAX_QUEUED_BYTES, handshake_timeout=HANDSHAKE_TIMEOUT,
        message_timeout=MESSAGE_TIMEOUT, stall_timeout=STALL_TIMEOUT,
        open_timeout=DEFAULT_OPEN_TIMEOUT,
        shutdown_timeout=10.0, metrics_connections=MAX_CONNECTIONS)


def test_every_key_is_read(tmp_path: Path) -> None:
    limits = _load(tmp_path, """
[limits]
nbd-in-flight-requests = 32
nbd-in-flight-bytes = 8388608
nbd-unsent-reply-bytes = 1048576
device-in-flight = 8
qmp-queued-reply-bytes = 4194304
handshake-timeout = 5
message-timeout = 2.5
stall-timeout = 90
open-timeout = 60
shutdown-timeout = 20
metrics-connections = 4
""")
    assert limits == Limits(32, 8 << 20, 1 << 20, 8, 4 << 20, 5.0, 2.5, 90.0, 60.0, 20.0, 4)


@pytest.mark.parametrize(("line", "message"), [
    ("open-timout = 5", "[limits] open-timout: unknown key"),
    ('device-in-flight = "64"', "[limits] device-in-flight: expected a whole number"),
    ("device-in-flight = 0", "[limits] device-in-flight: expected a whole number, 1 or more"),
    ("metrics-connections = 2.5", "[limits] metrics-connections: expected a whole number"),
    ("nbd-in-flight-requests = true", "[limits] nbd-in-flight-requests: expected a whole"),
    ("open-timeout = 0", "[limits] open-timeout: expected a number of seconds above 0"),
    ('shutdown-timeout = "10s"', "[limits] shutdown-timeout: expected a number of seconds"),
    ("handshake-timeout = inf", "[limits] handshake-timeout: expected a number of seconds"),
])
def test_wrong_keys_and_values_are_named(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f"[limits]\n{line}\n")
    assert str(caught.value).startswith(str(tmp_path / "blockd.toml"))
    assert message in str(caught.value)


def test_limits_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"limits: expected a table \(\[limits\]\)"):
        _load(tmp_path, "limits = 5\n")


def test_the_daemon_hands_the_limits_to_its_servers(tmp_path: Path) -> None:
    path = tmp_path / "blockd.toml"
    path.write_text('[[qmp]]\npath = "q.sock"\n[limits]\nnbd-in-flight-requests = 7\n'
                    "nbd-unsent-reply-bytes = 4096\ndevice-in-flight = 5\nopen-timeout = 3\n"
                    "handshake-timeout = 4\nshutdown-timeout = 2\n")
    daemon = Daemon(load_config_file(path))
    assert (daemon.nbd.limits.in_flight, daemon.nbd.limits.unsent) == (7, 4096)
    assert daemon.nbd.limits.handshake_timeout == 4.0
    assert daemon.registry.device_max_in_flight == 5
    assert daemon.registry.opens.timeout == 3.0
    reported = daemon._limits()["limits"]
    assert isinstance(reported, dict)
    assert reported["nbd-in-flight-requests"] == 7 and reported["device-in-flight"] == 5
    assert reported["open-timeout-ms"] == 3000 and reported["shutdown-timeout-ms"] == 2000
    assert reported["qmp-handshake-timeout-ms"] == reported["nbd-handshake-timeout-ms"] == 4000
