"""Every metric selector the README quotes names a real label value."""

from __future__ import annotations

import re
from pathlib import Path

from monitoring.metrics import GatewayMetrics, metrics_registry
from monitoring.observer import MonitoringObserver

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_metric_labels_exist() -> None:
    registry = metrics_registry(None)
    observer = MonitoringObserver(GatewayMetrics(registry), None, clock=lambda: 1.0)
    observer.rules_loaded(True, 3, "v1")
    observer.rules_loaded(False, 3, "v1")  # a refused reload
    samples = {(s.name, label, value) for f in registry.collect() for s in f.samples
               for label, value in s.labels.items()}
    quoted = re.findall(r'`(icap_gateway_[a-z_]+)\{(\w+)="([^"]*)"\}`', README.read_text())
    assert quoted, "the README quotes no labelled metric any more: update this test"
    for name, label, value in quoted:
        # Before: icap_gateway_rules_reload_total{result="error"}, a value never set.
        assert (name, label, value) in samples, f"README: {name}{{{label}={value!r}}} is never exposed"
