"""Real NBD clients for tests: libnbd's Python bindings and the command-line tools."""

from __future__ import annotations

import importlib
import shutil
import sys
from types import ModuleType

import pytest

DEBIAN_DIST_PACKAGES = "/usr/lib/python3/dist-packages"


def libnbd() -> ModuleType:
    """libnbd's ``nbd`` module (Debian python3-libnbd), or skip saying how to get it."""
    try:
        return importlib.import_module("nbd")
    except ImportError:
        pass
    # Debian installs it for the system Python 3.11; the module is ABI-compatible
    # with any CPython 3.11, so a venv can use it from there.
    if DEBIAN_DIST_PACKAGES not in sys.path:
        sys.path.append(DEBIAN_DIST_PACKAGES)
    try:
        return importlib.import_module("nbd")
    except ImportError:
        pytest.skip("libnbd's Python bindings are missing (Debian package python3-libnbd)")


def need(*tools: str) -> None:
    """Skip unless every command-line tool is installed."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def uri(socket: str, name: str) -> str:
    return f"nbd+unix:///{name}?socket={socket}"
