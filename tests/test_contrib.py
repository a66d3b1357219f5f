"""contrib/'s monitoring files: valid for promtool, rules that fire when they should, and a
Grafana dashboard whose queries parse and use only the metrics blockd exports.

The same files against a live blockd and a real Prometheus server are tested in
tests/host/test_prometheus_server.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_support import (
    ALERT_RULES,
    ALL_SELECTED,
    DAEMON_METRICS,
    DEVICE_METRICS,
    HISTOGRAMS,
    PROMETHEUS_CONFIG,
    dashboard_queries,
    grafana_variables,
    iter_panels,
    known_series,
    load_dashboard,
    metric_names,
    parse_label_values,
    promtool,
    substitute,
)

DASHBOARD_VARIABLES = {"datasource", "job", "instance", "device"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


def ok(result: Any) -> None:
    assert result.returncode == 0, f"{result.args}:\n{result.stdout}{result.stderr}"


# --------------------------------------------------------------------------------------
# Prometheus configuration and alerting rules
# --------------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    ok(result)
    assert "1 rule files found" in result.stdout  # blockd-alerts.yml, found beside it


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERT_RULES))
    ok(result)
    assert "SUCCESS: 5 rules found" in result.stdout


def test_prometheus_config_scrapes_blockd_default_address() -> None:
    text = PROMETHEUS_CONFIG.read_text()
    assert re.search(r"^\s*- job_name: blockd$", text, re.M)
    assert re.search(r"^\s*- targets: \[\"127\.0\.0\.1:9580\"\]$", text, re.M)
    assert re.search(r"^\s*scrape_interval: 15s$", text, re.M)
    assert re.search(r"^rule_files:\n\s*- blockd-alerts.yml$", text, re.M)


def test_alert_rules_use_known_metrics() -> None:
    text = ALERT_RULES.read_text()
    exprs = re.findall(r"^\s*expr: (?:>-\n)?((?:.+\n)+?)\s*(?:for|labels):", text, re.M)
    assert len(exprs) == 5
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= known_series(), expr


def test_alert_rules_annotate_the_device() -> None:
    text = ALERT_RULES.read_text()
    rules = text.split("- alert: ")[1:]
    assert len(rules) == 5
    for rule in rules:
        name = rule.split()[0]
        assert "severity:" in rule and "summary:" in rule and "description:" in rule, name
        if name != "BlockdDown":
            assert "{{ $labels.device }}" in rule, name


# promtool test rules: series over time and the alerts that must fire (and no others).
# Each (alert, time) pair lists every alert of that name firing then, with all labels and
# the rendered annotations, so the templates are checked too.
TARGET = {"job": "blockd", "instance": "host1:9580"}


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    sel = ", ".join(f'{k}="{v}"' for k, v in {**TARGET, **labels}.items())
    return {"series": f"{metric}{{{sel}}}", "values": values}


def alert(severity: str, summary: str, description: str, **labels: str) -> dict[str, Any]:
    return {"exp_labels": {"severity": severity, **TARGET, **labels},
            "exp_annotations": {"summary": summary, "description": description}}


def promtool_unit_tests(rules: Path) -> dict[str, Any]:
    hd0 = {"device": "hd0", "node": "disk0"}
    hd1 = {"device": "hd1", "node": "disk1"}
    cd0 = {"device": "cd0", "node": "iso0"}
    cd1 = {"device": "cd1", "node": "iso1"}
    inputs = [
        series("up", "1 1 0x10"),
        series("up", "1x12", instance="host2:9580"),
        # hd0 stops on an I/O error at 2m; hd1 stays ok.
        series("blockd_device_io_status", "1 1 0x10", **hd0, blockd_device_io_status="ok"),
        series("blockd_device_io_status", "0 0 1x10", **hd0,
               blockd_device_io_status="failed"),
        series("blockd_device_io_status", "0x12", **hd0, blockd_device_io_status="nospace"),
        series("blockd_device_io_status", "1x12", **hd1, blockd_device_io_status="ok"),
        series("blockd_device_io_status", "0x12", **hd1, blockd_device_io_status="failed"),
        series("blockd_device_io_status", "0x12", **hd1, blockd_device_io_status="nospace"),
        # cd0's tray opens at 1m while it is exported (twice); cd1's is open, unexported;
        # hd0 is exported with its tray (it has none) closed.
        series("blockd_device_tray_open", "0 1x11", **cd0),
        series("blockd_device_tray_open", "1x12", **cd1),
        series("blockd_device_tray_open", "0x12", **hd0),
        series("blockd_nbd_export_info", "1x12", export="e0", name="cd", device="cd0",
               node="iso0", writable="false"),
        series("blockd_nbd_export_info", "1x12", export="e1", name="cd-again", device="cd0",
               node="iso0", writable="false"),
        series("blockd_nbd_export_info", "1x12", export="e2", name="disk", device="hd0",
               node="disk0", writable="true"),
        # hd0: 10 reads/s, and from 1m on 1 failed read/s (9 % of requests fail).
        # hd1: 100 reads/s and 1 failed write a minute (0.02 %).
        series("blockd_device_reads_completed_total", "0+600x12", **hd0),
        series("blockd_device_failed_operations_total", "0 0 60+60x10", **hd0,
               operation="read"),
        series("blockd_device_reads_completed_total", "0+6000x12", **hd1),
        series("blockd_device_failed_operations_total", "0 0 1+1x10", **hd1,
               operation="write"),
    ]
    for dev in (hd0, hd1):
        for op in ("write", "flush", "discard") if dev is hd0 else ("read", "flush",
                                                                     "discard"):
            inputs.append(series("blockd_device_failed_operations_total", "0x12", **dev,
                                 operation=op))
        for name in ("writes_completed", "flush_requests", "discards_completed"):
            inputs.append(series(f"blockd_device_{name}_total", "0x12", **dev))

    down = ("blockd on host1:9580 is down",
            "Prometheus has not been able to scrape blockd's metrics on host1:9580 for 1 "
            "minute. Either blockd is not running (its devices and NBD exports are gone "
            "with it) or its metrics endpoint is unreachable.")
    not_ok = ("blockd device hd0 I/O status is failed",
              'Device hd0 (node disk0) on host1:9580 has had I/O status "failed" for 1 '
              "minute. Its error policy (rerror/werror=stop or enospc) stopped it after an "
              'I/O error ("failed") or a full backing ("nospace"); requests wait until the '
              "cause is fixed and QMP `cont` resumes it.")
    tray = ("blockd device cd0 has its tray open while exported over NBD",
            "The tray of device cd0 on host1:9580 has been open for 1 minute while an NBD "
            "export serves it: every request from the export's clients fails (no medium). "
            "Close the tray (blockdev-close-tray) or remove the export (block-export-del).")

    def errors(dev: dict[str, str], op: str, rate: str) -> dict[str, Any]:
        return alert("warning", f"blockd device {dev['device']}: failed {op} requests",
                     f"Device {dev['device']} on host1:9580 completed {rate} {op} requests "
                     "per second with an error over the last 5 minutes. See blockd's log "
                     "and the backing device.", device=dev["device"], operation=op)

    ratio = ("blockd device hd0: 9.091% of requests fail",
             "More than 5 % of the requests to device hd0 on host1:9580 have failed for 5 "
             "minutes (now 9.091%). The backing is likely broken or gone.")
    tests = [
        ("BlockdDown", "2m", []),  # pending: down for less than 1m
        ("BlockdDown", "5m", [alert("critical", *down)]),
        ("BlockdDeviceIOStatusNotOk", "2m", []),
        ("BlockdDeviceIOStatusNotOk", "5m", [alert(
            "critical", *not_ok, **hd0, blockd_device_io_status="failed")]),
        ("BlockdDeviceTrayOpenWhileExported", "1m", []),
        ("BlockdDeviceTrayOpenWhileExported", "5m", [alert("warning", *tray, **cd0)]),
        ("BlockdDeviceIOErrors", "1m", []),
        ("BlockdDeviceIOErrors", "6m", [errors(hd0, "read", "1"),
                                        errors(hd1, "write", "0.0167")]),
        ("BlockdDeviceHighIOErrorRatio", "5m", []),  # pending: not yet 5m above 5 %
        ("BlockdDeviceHighIOErrorRatio", "10m", [alert(
            "critical", *ratio, device="hd0")]),
    ]
    return {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [{"eval_time": t, "alertname": name, "exp_alerts": exp}
                                for name, t, exp in tests],
        }],
    }


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    spec = tmp_path / "blockd-alerts.test.yml"
    spec.write_text(json.dumps(promtool_unit_tests(ALERT_RULES), indent=1))  # JSON is YAML
    ok(promtool("test", "rules", str(spec)))


# --------------------------------------------------------------------------------------
# Grafana dashboard
# --------------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard() -> None:
    doc = load_dashboard()
    assert doc["schemaVersion"] >= 36 and doc["uid"] == "blockd" and doc["title"]
    panels = list(iter_panels(doc["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    types = {p["type"] for p in panels}
    assert {"timeseries", "heatmap", "stat", "state-timeline", "table", "row"} <= types
    occupied: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                 for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_dashboard_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert set(variables) == DASHBOARD_VARIABLES
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance", "device"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert v["definition"] == v["query"]["query"]
        selector, label = parse_label_values(v["definition"])
        assert label == name
        assert metric_names(selector) <= {"blockd_build_info", "blockd_device_info"}
    device = variables["device"]
    assert device["definition"].startswith("label_values(blockd_device_info")
    assert device["multi"] and device["includeAll"] and device["allValue"] == ".*"


def test_dashboard_queries_use_blockd_metrics_and_variables() -> None:
    queries = dashboard_queries()
    assert len(queries) >= 30
    for q in queries:
        names = metric_names(q.expr)
        assert names, q.id
        assert names <= known_series(), f"{q.id}: unknown {names - known_series()}"
        assert grafana_variables(q.expr) <= DASHBOARD_VARIABLES | GRAFANA_BUILTINS, q.id
        # Every series is filtered by the selected job and instance; device series by
        # the selected devices too.
        for sel in re.findall(r"\b(\w+)\{([^}]*)\}", q.expr):
            assert 'job=~"$job"' in sel[1] and 'instance=~"$instance"' in sel[1], q.id
            if sel[0].startswith("blockd_device_"):
                assert 'device=~"$device"' in sel[1], q.id
        # Ranges follow Grafana's scrape-aware interval, never a fixed one.
        assert set(re.findall(r"\[([^]]+)\]", q.expr)) <= {"$__rate_interval"}, q.id


def test_dashboard_covers_the_metrics() -> None:
    used: set[str] = set()
    for q in dashboard_queries():
        used |= {re.sub(r"_(bucket|sum|count)$", "", n) if re.sub(
            r"_(bucket|sum|count)$", "", n) in HISTOGRAMS else n for n in metric_names(q.expr)}
    # Shown elsewhere: uptime instead of the start time, exports by count (the alert
    # uses blockd_nbd_export_info).
    missing = (DEVICE_METRICS | DAEMON_METRICS) - used
    assert missing == {"blockd_start_time_seconds", "blockd_nbd_export_info"}


def test_dashboard_heatmaps_read_histogram_buckets() -> None:
    heatmaps = [p for p in iter_panels(load_dashboard()["panels"]) if p["type"] == "heatmap"]
    assert {p["title"] for p in heatmaps} == {"Read latency", "Write latency", "Flush latency"}
    for p in heatmaps:
        assert p["options"]["calculate"] is False  # Prometheus buckets, not Grafana's
        assert p["options"]["yAxis"]["unit"] == "s"
        (t,) = p["targets"]
        assert t["format"] == "heatmap" and t["legendFormat"] == "{{le}}"
        assert re.fullmatch(r"sum by \(le\) \(rate\(blockd_device_(read|write|flush)"
                            r"_latency_seconds_bucket\{[^}]*\}\[\$__rate_interval\]\)\)",
                            t["expr"]), t["expr"]


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every query, variables filled in as Grafana would, is valid PromQL for promtool."""
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": substitute(q.expr, ALL_SELECTED)}
        for i, q in enumerate(queries)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps(rules, indent=1))
    result = promtool("check", "rules", str(path))
    ok(result)
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


@pytest.mark.parametrize("values", [ALL_SELECTED, {
    **ALL_SELECTED, "instance": "(host1:9580|host2:9580)", "device": "(hd0|cd0)"}])
def test_substitute(values: dict[str, str]) -> None:
    expr = 'rate(x{job=~"$job", device=~"${device}"}[$__rate_interval])'
    assert substitute(expr, values) == (
        f'rate(x{{job=~"blockd", device=~"{values["device"]}"}}[1m])')
    with pytest.raises(KeyError):
        substitute("x{a=~\"$nope\"}", values)
