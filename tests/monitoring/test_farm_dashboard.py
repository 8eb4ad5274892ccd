"""The dashboard's farm row: per-node (by instance) and farm-total panels.
(Its queries are checked with promtool and against the exposed metrics by
test_monitoring_dashboards, which reads every panel.)"""

from __future__ import annotations

import json
import re

from tests.monitoring.test_monitoring_dashboards import DASHBOARD


def farm_panels() -> list[dict[str, object]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    [row] = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"].startswith("Farm")]
    following = [i for i, p in enumerate(panels) if i > row and p["type"] == "row"]
    return panels[row + 1: following[0] if following else None]


def exprs(panel: dict[str, object]) -> list[str]:
    return [t["expr"] for t in panel["targets"]]  # type: ignore[attr-defined, index]


def test_farm_row_shows_each_node_and_the_total_of_the_key_figures() -> None:
    panels = farm_panels()
    for metric in ("icap_gateway_requests_total", "icap_gateway_active_connections"):
        queries = [e for p in panels for e in exprs(p) if metric in e]
        per_node = [e for e in queries if e.startswith("sum by (instance)")]
        total = [e for e in queries if re.match(r"sum\((?!.*by \(instance\))", e)]
        assert per_node and total, (metric, queries)


def test_farm_panels_follow_the_instance_selector_and_legend_by_instance() -> None:
    for panel in farm_panels():
        for target in panel["targets"]:  # type: ignore[attr-defined]
            assert 'instance=~"$instance"' in target["expr"], target["expr"]
            if target["expr"].startswith("sum by (instance)"):
                assert target["legendFormat"] == "{{instance}}"


def test_share_panel_divides_each_node_by_the_farm_total() -> None:
    [share] = [p for p in farm_panels() if "Share" in str(p["title"])]
    [expr] = exprs(share)
    node, _, total = expr.partition(" / ignoring(instance) group_left ")
    assert node.startswith("sum by (instance) (rate(icap_gateway_requests_total")
    assert total.startswith("sum(rate(icap_gateway_requests_total")
