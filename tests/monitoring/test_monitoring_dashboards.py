"""The Grafana dashboard, the alert rules and docs/metrics.md match the metrics.

promtool comes from the Debian prometheus package.  Without it the promtool
tests skip on a workstation and fail in CI (``CI`` set), where it must be
installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway.interfaces import TransactionRecord, Verdict
from gateway.workers import SupervisorCollector
from monitoring.metrics import GatewayMetrics, metrics_registry
from monitoring.observer import MonitoringObserver

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "monitoring" / "prometheus" / "alerts.yml"
ALERT_TESTS = Path(__file__).with_name("alerts_test.yml")
DASHBOARD = ROOT / "monitoring" / "grafana" / "icap-gateway.json"
DOCS = ROOT / "docs" / "metrics.md"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (install the prometheus package)")
        pytest.skip("promtool not installed")
    return path


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=120)


def populated_registry() -> CollectorRegistry:
    """A registry where every labelled metric has at least one child."""
    registry = metrics_registry(None)
    observer = MonitoringObserver(GatewayMetrics(registry), None, clock=lambda: 1.0)
    observer.connection_opened()
    observer.transaction_finished(TransactionRecord(
        started=0.0, duration=0.01, method="RESPMOD", service="yara", icap_status=200,
        client_ip="10.0.0.1", peer="127.0.0.1", tenant="acme", outcome="blocked", rules=("ns.r",)))
    observer.scan_finished(Verdict("blocked", rules=("ns.r",), scanned_bytes=10, duration=0.001), "response")
    observer.auth_failed("unknown-key")
    observer.rules_loaded(True, 3, "v1")
    # The supervisor's own figures, on its /metrics in multi-worker mode.
    supervisor = SimpleNamespace(restarts=1, ready_workers=lambda: 2, worker_connections=lambda: {0: 3, 1: 2},
                                 handed_off=5, handoffs_dropped=0)
    registry.register(SupervisorCollector(supervisor))  # type: ignore[arg-type]
    return registry


def exposed_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a scrape can show, whether or not it has samples yet."""
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
    for family in registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


# --- PromQL and YAML reading ------------------------------------------------

PROMQL_WORDS = {
    # aggregations, keywords and modifiers: names that are not metrics
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
    "or", "unless", "offset", "bool", "inf", "nan", "atan2",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery durations
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", " ", s)  # Grafana variables
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in PROMQL_WORDS or re.fullmatch(r"\d+[smhdwy]", name):
            continue
        names.add(name)
    return names


def yaml_values(path: Path, key: str) -> list[str]:
    """Values of ``key:`` in a YAML file: plain, quoted or block scalars.

    Enough for the files here (promtool validates them as YAML); avoids a
    YAML dependency.
    """
    lines = path.read_text().splitlines()
    out = []
    i = 0
    pattern = re.compile(rf"^(\s*)(?:-\s+)?{key}:\s*(.*)$")
    while i < len(lines):
        m = pattern.match(lines[i])
        i += 1
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value[:1] in ("|", ">"):
            block = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i].strip())
                i += 1
            out.append(" ".join(block).strip())
        else:
            if value[:1] in ("'", '"') and value[-1:] == value[:1]:
                value = value[1:-1]
            out.append(value)
    return out


def dashboard_exprs(d: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in d["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
        for sub in panel.get("panels", []):
            exprs += [t["expr"] for t in sub.get("targets", [])]
    for var in d["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if var.get("type") == "query" and q:
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", q))
    exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    return exprs


# --- tests ------------------------------------------------------------------


def test_metric_name_parser() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(foo_bucket{a="x{y}",le!="1"}[5m])))'
            ' / on(instance) group_left(version) bar_info or absent(up{job="j"}) > 5 and time() - baz'
            ' offset 1h + sum without (tenant) (qux{x=~"$instance"}[$__rate_interval])')
    assert metric_names(expr) == {"foo_bucket", "bar_info", "up", "baz", "qux"}


def test_alert_rules_pass_promtool() -> None:
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rules_unit_tests() -> None:
    # Series in, alerts out: each alert fires when it should and stays quiet when it should.
    result = run_promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_exposition_passes_promtool_check_metrics() -> None:
    text = generate_latest(populated_registry()).decode()
    result = run_promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", "lint findings"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool has no expression checker; recording rules are checked as PromQL.
    d = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(d)
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(exprs):
        concrete = (expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
                    .replace("$instance", ".*").replace("$job", "icap-gateway"))
        rules += [f"      - record: dashboard:expr{i}", f"        expr: {json.dumps(concrete)}"]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text("\n".join(rules) + "\n")
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_referenced_metric_exists() -> None:
    available = exposed_names(populated_registry()) | {"up"}  # up: Prometheus' own per target
    d = json.loads(DASHBOARD.read_text())
    sources = {
        "dashboard": dashboard_exprs(d),
        "alerts": yaml_values(ALERTS, "expr"),
        "alert tests": [re.sub(r"\{.*", "", s) for s in yaml_values(ALERT_TESTS, "series")],
    }
    assert len(sources["alerts"]) >= 8 and len(sources["dashboard"]) >= 20
    referenced: set[str] = set()
    for where, exprs in sources.items():
        for expr in exprs:
            names = metric_names(expr)
            assert names, f"{where}: no metric found in {expr!r}"
            missing = names - available
            assert not missing, f"{where}: {sorted(missing)} not exposed (in {expr!r})"
            referenced |= names
    # the dashboard covers what the issue asks for
    for name in ("icap_gateway_requests_total", "icap_gateway_request_duration_seconds_bucket",
                 "icap_gateway_scanned_bytes_total", "icap_gateway_auth_failures_total",
                 "icap_gateway_register_queue_depth", "icap_gateway_rules_loaded",
                 "icap_gateway_scan_duration_seconds_bucket"):
        assert name in referenced


def test_dashboard_structure() -> None:
    d = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert d["uid"] == "icap-gateway"
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["targets"] and all(t["refId"] for t in p["targets"])
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24


def test_docs_describe_every_metric() -> None:
    docs = DOCS.read_text()
    documented = set(re.findall(r"`(icap_gateway_[a-z0-9_]+)", docs))
    families = {f.name + ("_total" if f.type == "counter" else "")
                for f in populated_registry().collect() if f.name.startswith("icap_gateway_")}
    assert families - documented == set(), "metrics missing from docs/metrics.md"
    available = exposed_names(populated_registry()) | {f.name for f in populated_registry().collect()}
    assert documented - available == set(), "docs/metrics.md names metrics that do not exist"
    assert "process_" in docs  # the process collector is mentioned
