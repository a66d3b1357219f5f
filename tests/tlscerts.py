"""Test certificates made with the openssl command, in QEMU's tls-creds-x509 layout.

``make_pki(tmp)`` writes directories a server and clients point ``dir=`` at:

* ``server``: ca-cert.pem, server-cert.pem, server-key.pem (SAN 127.0.0.1, localhost);
* ``client``: ca-cert.pem, client-cert.pem, client-key.pem (signed by the same CA);
* ``client-other-ca``: a client trusting, and signed by, an unrelated CA;
* ``client-no-cert``: the right CA and no client certificate.

Certificates carry the extensions QEMU's sanity checks want (CA basic
constraints and keyCertSign; digitalSignature and keyEncipherment with the
server or client purpose), so qemu-img and qemu-storage-daemon accept them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["make_pki"]

_CA_CONFIG = """\
[req]
distinguished_name = dn
x509_extensions = v3
[dn]
[v3]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
_LEAF_EXT = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = {purpose}
subjectAltName = {san}
"""


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(work: Path, name: str) -> tuple[Path, Path]:
    key, cert = work / f"{name}-key.pem", work / f"{name}-cert.pem"
    config = work / f"{name}.cnf"
    config.write_text(_CA_CONFIG)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "30", "-subj", f"/CN=blockd test {name}",
             "-config", str(config), cwd=work)
    return key, cert


def _leaf(work: Path, name: str, ca: tuple[Path, Path], purpose: str, san: str) -> None:
    key, cert, csr, ext = (work / f"{name}-key.pem", work / f"{name}-cert.pem",
                           work / f"{name}.csr", work / f"{name}.ext")
    ext.write_text(_LEAF_EXT.format(purpose=purpose, san=san))
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
             "-out", str(csr), "-subj", f"/CN={name}", "-config", str(work / "ca.cnf"),
             cwd=work)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-out", str(cert), "-days", "30", "-extfile", str(ext),
             cwd=work)


def _dir(root: Path, name: str, files: dict[str, Path]) -> Path:
    path = root / name
    path.mkdir()
    for target, source in files.items():
        shutil.copy(source, path / target)
    return path


def make_pki(root: Path) -> dict[str, Path]:
    """Write the directories described in the module docstring; return them by name."""
    work = root / "work"
    work.mkdir(parents=True)
    ca, other = _ca(work, "ca"), _ca(work, "other-ca")
    _leaf(work, "server", ca, "serverAuth", "IP:127.0.0.1, DNS:localhost")
    _leaf(work, "client", ca, "clientAuth", "DNS:client")
    _leaf(work, "intruder", other, "clientAuth", "DNS:intruder")
    return {
        "server": _dir(root, "server", {"ca-cert.pem": ca[1],
                                        "server-cert.pem": work / "server-cert.pem",
                                        "server-key.pem": work / "server-key.pem"}),
        "client": _dir(root, "client", {"ca-cert.pem": ca[1],
                                        "client-cert.pem": work / "client-cert.pem",
                                        "client-key.pem": work / "client-key.pem"}),
        "client-other-ca": _dir(root, "client-other-ca", {
            "ca-cert.pem": other[1], "client-cert.pem": work / "intruder-cert.pem",
            "client-key.pem": work / "intruder-key.pem"}),
        "client-no-cert": _dir(root, "client-no-cert", {"ca-cert.pem": ca[1]}),
    }
