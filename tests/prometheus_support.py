"""The monitoring files in contrib/ as tests see them, promtool, and a real Prometheus.

contrib/ ships a Prometheus configuration (``prometheus.yml``), alerting rules
(``blockd-alerts.yml``) and a Grafana dashboard (``grafana-dashboard.json``).
This module extracts the dashboard's PromQL queries with Grafana's variables
filled in, lists the metric names blockd promises, runs ``promtool`` and starts
a throw-away Prometheus server (Debian package ``prometheus``) on a free
loopback port with its storage in a test directory.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
PROMETHEUS_CONFIG = CONTRIB / "prometheus.yml"
ALERT_RULES = CONTRIB / "blockd-alerts.yml"
DASHBOARD = CONTRIB / "grafana-dashboard.json"

# The metric names blockd exports (DESIGN.md section 5), without the _bucket, _sum and
# _count series of the histograms.
DEVICE_METRICS = frozenset({
    "blockd_device_read_bytes_total",
    "blockd_device_written_bytes_total",
    "blockd_device_discarded_bytes_total",
    "blockd_device_reads_completed_total",
    "blockd_device_writes_completed_total",
    "blockd_device_flush_requests_total",
    "blockd_device_discards_completed_total",
    "blockd_device_failed_operations_total",
    "blockd_device_invalid_operations_total",
    "blockd_device_read_time_seconds_total",
    "blockd_device_write_time_seconds_total",
    "blockd_device_flush_time_seconds_total",
    "blockd_device_discard_time_seconds_total",
    "blockd_device_read_latency_seconds",
    "blockd_device_write_latency_seconds",
    "blockd_device_flush_latency_seconds",
    "blockd_device_io_now",
    "blockd_device_write_highest_offset_bytes",
    "blockd_device_idle_seconds",
    "blockd_device_tray_open",
    "blockd_device_locked",
    "blockd_device_medium_inserted",
    "blockd_device_removable",
    "blockd_device_size_bytes",
    "blockd_device_io_status",
    "blockd_device_info",
})
DAEMON_METRICS = frozenset({
    "blockd_build_info",
    "blockd_start_time_seconds",
    "blockd_uptime_seconds",
    "blockd_qmp_sessions",
    "blockd_qmp_sessions_accepted_total",
    "blockd_qmp_commands_total",
    "blockd_nbd_connections",
    "blockd_nbd_connections_accepted_total",
    "blockd_nbd_poll_hits_total",
    "blockd_nbd_poll_seconds_total",
    "blockd_nbd_poll_paused_total",
    "blockd_nbd_exports",
    "blockd_nbd_export_info",
    "blockd_hotplug_events_total",
    "blockd_devices",
})
HISTOGRAMS = frozenset({"blockd_device_read_latency_seconds",
                        "blockd_device_write_latency_seconds",
                        "blockd_device_flush_latency_seconds"})
# prometheus_client's process collector, and Prometheus's own per-target series.
OTHER_METRICS = frozenset({
    "process_cpu_seconds_total", "process_resident_memory_bytes",
    "process_virtual_memory_bytes", "process_open_fds", "process_max_fds",
    "process_start_time_seconds", "up",
})


def known_series() -> frozenset[str]:
    """Every series name a query may use."""
    names = set(DEVICE_METRICS | DAEMON_METRICS | OTHER_METRICS)
    for h in HISTOGRAMS:
        names |= {f"{h}_bucket", f"{h}_sum", f"{h}_count"}
    return frozenset(names)


# --------------------------------------------------------------------------------------
# The dashboard
# --------------------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    with open(DASHBOARD) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


@dataclass(frozen=True)
class Query:
    """One PromQL query of a dashboard panel."""

    panel_id: int
    panel: str
    ref: str
    expr: str
    format: str  # time_series, table or heatmap
    instant: bool

    @property
    def id(self) -> str:
        return f"{self.panel_id}:{self.panel}/{self.ref}"


def dashboard_queries(doc: Mapping[str, Any] | None = None) -> list[Query]:
    doc = load_dashboard() if doc is None else doc
    queries = []
    for panel in iter_panels(doc["panels"]):
        for t in panel.get("targets", []):
            queries.append(Query(panel["id"], panel["title"], t["refId"], t["expr"],
                                 t.get("format", "time_series"), bool(t.get("instant"))))
    return queries


_VAR = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def grafana_variables(expr: str) -> set[str]:
    """The Grafana variables (``$name``, ``${name}``) an expression uses."""
    return {m.group(1) or m.group(2) for m in _VAR.finditer(expr)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Fill in Grafana's variables as Grafana would (``device=~".*"`` for All)."""
    def fill(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]
    return _VAR.sub(fill, expr)


# What Grafana puts in with every device and instance selected ("All" is ".*").
ALL_SELECTED = {"job": "blockd", "instance": ".*", "device": ".*",
                "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

def metric_names(expr: str) -> set[str]:
    """Series names an expression selects (not label names, not functions)."""
    stripped = re.sub(r"\{[^}]*\}|\[[^]]*\]", " ", expr)  # label matchers, ranges
    return {m.group(1) for m in re.finditer(r"\b((?:blockd|process)_\w+|up)\b", stripped)
            if not re.match(r"\s*\(", stripped[m.end():])}


def parse_label_values(query: str) -> tuple[str, str]:
    """``label_values(SELECTOR, LABEL)`` -> (SELECTOR, LABEL)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    if m is None:
        raise ValueError(f"not a label_values() query: {query!r}")
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------------------
# promtool and a Prometheus server
# --------------------------------------------------------------------------------------


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package prometheus)")
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_tool("promtool"), *args], capture_output=True, text=True,
                          timeout=60, check=False, cwd=cwd)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def derived_config(target: str, metrics_path: str, rule_file: Path,
                   interval: str = "1s") -> str:
    """contrib/prometheus.yml, its target and intervals rewritten for a test.

    A textual rewrite (no YAML library needed), checked to change exactly what it
    should: the target, every ``*_interval: 15s`` and the rule file's path.
    """
    text = PROMETHEUS_CONFIG.read_text()
    replacements = [
        ('"127.0.0.1:9580"', json.dumps(target), 1),
        ("scrape_interval: 15s", f"scrape_interval: {interval}", 2),
        ("evaluation_interval: 15s", f"evaluation_interval: {interval}", 1),
        ("scrape_timeout: 10s", f"scrape_timeout: {interval}", 1),
        ("metrics_path: /metrics", f"metrics_path: {metrics_path}", 1),
        ("  - blockd-alerts.yml", f"  - {json.dumps(str(rule_file))}", 1),
    ]
    for old, new, count in replacements:
        found = text.count(old)
        if found != count:
            raise AssertionError(f"contrib/prometheus.yml has {old!r} {found} times, "
                                 f"expected {count}")
        text = text.replace(old, new)
    return text


class PrometheusError(RuntimeError):
    pass


# Loopback only: never through an HTTP proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout: float = 10) -> bytes:
    with _opener.open(url, timeout=timeout) as r:
        data: bytes = r.read()
        return data


class PrometheusServer:
    """``prometheus`` on a free loopback port, with its data in ``workdir``."""

    def __init__(self, config: str, workdir: Path) -> None:
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(config)
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30) -> None:
        binary = need_tool("prometheus")
        for _attempt in range(3):  # the free port may be taken before prometheus binds it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [binary, f"--config.file={self.config_path}",
                     f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address=127.0.0.1:{port}",
                     "--web.enable-lifecycle", "--log.level=warn"],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.workdir)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    http_get(f"{self.url}/-/ready", timeout=2)
                    return
                except OSError:  # URLError, HTTPError (503 while starting), refused
                    pass
                time.sleep(0.05)
            else:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout:g} s:\n"
                                      f"{self.log()}")
            if "address already in use" not in self.log():
                raise PrometheusError(f"prometheus exited {self.proc.returncode}:\n"
                                      f"{self.log()}")
        raise PrometheusError(f"prometheus found no free port:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; the ``data`` of a successful answer."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            doc = json.loads(http_get(url))
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            raise PrometheusError(f"{path} {params}: HTTP {err.code}: {body}") from err
        if doc.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {doc}")
        if doc.get("warnings"):
            raise PrometheusError(f"{path} {params}: warnings {doc['warnings']}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (scalars come back as one sample)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "vector":
            return data["result"]  # type: ignore[no-any-return]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        raise PrometheusError(f"{expr}: unexpected result type {data['resultType']}")

    def wait_for(self, expr: str, timeout: float = 20,
                 what: str | None = None) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns at least one sample."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if self.proc is None or self.proc.poll() is not None:
                raise PrometheusError(f"prometheus is gone:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {what or expr} after {timeout:g} s")
            time.sleep(0.1)


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(s["value"][1]) for s in result]
