"""sd_notify over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockd.daemon.sdnotify import notify, notify_socket_address


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def test_sends_to_a_path(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert notify("READY=1\nSTATUS=serving", {"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_uses_os_environ_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("STOPPING=1") is True
    assert sock.recv(4096) == b"STOPPING=1"


def test_sends_to_an_abstract_address() -> None:
    name = f"blockd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert notify("READY=1", {}) is False


@pytest.mark.parametrize("value", ["", "relative.sock", "@"])
def test_unusable_addresses_are_ignored(value: str) -> None:
    assert notify_socket_address({"NOTIFY_SOCKET": value}) is None
    assert notify("READY=1", {"NOTIFY_SOCKET": value}) is False


def test_address_forms() -> None:
    assert notify_socket_address({"NOTIFY_SOCKET": "/run/x"}) == "/run/x"
    assert notify_socket_address({"NOTIFY_SOCKET": "@abc"}) == b"\0abc"


def test_send_failure_returns_false(tmp_path: Path) -> None:
    # Nobody listens there: the send fails and notify reports it instead of raising.
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False
