"""Unscannable bodies in the metrics and the access log: one label and one
field per reason, from a fixed set."""

from __future__ import annotations

import io
import json

import pytest
from prometheus_client import CollectorRegistry

from gateway.interfaces import UNSCANNABLE_REASONS, TransactionRecord, Verdict
from monitoring.accesslog import AccessLog, AccessLogFile
from monitoring.metrics import GatewayMetrics, metrics_registry
from monitoring.observer import MonitoringObserver


def record(**kw: object) -> TransactionRecord:
    base: dict[str, object] = dict(
        started=1_700_000_000.25, duration=0.004, method="RESPMOD", service="yara", icap_status=200,
        client_ip="10.1.2.3", peer="127.0.0.1", tenant="acme", outcome="unscanned", direction="response",
    )
    base.update(kw)
    return TransactionRecord(**base)  # type: ignore[arg-type]


@pytest.fixture
def registry() -> CollectorRegistry:
    return metrics_registry(None)


def observer(registry: CollectorRegistry) -> MonitoringObserver:
    return MonitoringObserver(GatewayMetrics(registry), None, clock=lambda: 0.0)


def count(registry: CollectorRegistry, **labels: str) -> float | None:
    return registry.get_sample_value("icap_gateway_unscannable_total", labels)


@pytest.mark.parametrize("reason", sorted(UNSCANNABLE_REASONS))
def test_each_reason_has_its_label(registry: CollectorRegistry, reason: str) -> None:
    obs = observer(registry)
    obs.scan_finished(Verdict("unscannable", reason=reason, action="block", scanned_bytes=5), "response")
    obs.scan_finished(Verdict("unscannable", reason=reason, action="pass"), "request")
    obs.scan_finished(Verdict("blocked", rules=("sig.Eicar",), reason=reason), "response")
    assert count(registry, direction="response", reason=reason, action="block") == 1
    assert count(registry, direction="request", reason=reason, action="pass") == 1
    assert count(registry, direction="response", reason=reason, action="matched") == 1


def test_every_series_exists_from_the_start(registry: CollectorRegistry) -> None:
    observer(registry)
    assert count(registry, direction="response", reason="bomb", action="block") == 0


def test_labels_stay_bounded(registry: CollectorRegistry) -> None:
    obs = observer(registry)
    obs.scan_finished(Verdict("unscannable", reason="made-up", action="block"), "response")
    obs.scan_finished(Verdict("unscannable", reason="bomb", action="block"), "sideways")  # type: ignore[arg-type]
    assert count(registry, direction="response", reason="other", action="block") == 1
    assert count(registry, direction="response", reason="made-up", action="block") is None
    assert count(registry, direction="response", reason="bomb", action="block") == 0


def test_scanned_and_clean_bodies_are_not_counted(registry: CollectorRegistry) -> None:
    obs = observer(registry)
    obs.scan_finished(Verdict("clean", scanned_bytes=10), "response")
    obs.scan_finished(Verdict("blocked", rules=("sig.Eicar",)), "response")
    samples = [s for m in registry.collect() if m.name == "icap_gateway_unscannable" for s in m.samples
               if s.name.endswith("_total")]
    assert samples and all(s.value == 0 for s in samples)


def test_oversize_passed_before_a_scan_counts_from_the_record(registry: CollectorRegistry) -> None:
    obs = observer(registry)
    obs.transaction_finished(record(unscannable="too-large", icap_status=204, detail="too-large"))
    # a scanned one is counted by scan_finished, not twice
    obs.transaction_finished(record(unscannable="bomb", scan_duration=0.1))
    assert count(registry, direction="response", reason="too-large", action="pass") == 1
    assert count(registry, direction="response", reason="bomb", action="pass") == 0


def test_too_large_without_a_scan_adds_no_duration_sample(registry: CollectorRegistry) -> None:
    obs = observer(registry)
    obs.scan_finished(Verdict("unscannable", reason="too-large", action="pass", duration=0.0), "response")
    obs.scan_finished(Verdict("unscannable", reason="bomb", action="block", scanned_bytes=9, duration=0.2),
                      "response")
    assert registry.get_sample_value("icap_gateway_scan_duration_seconds_count",
                                     {"direction": "response"}) == 1


@pytest.mark.parametrize("reason", sorted(UNSCANNABLE_REASONS))
def test_access_log_field(reason: str) -> None:
    out = io.StringIO()
    AccessLog(AccessLogFile("stdout", stdout=out), users=False, redaction="full").write(
        record(unscannable=reason, detail=reason))
    assert json.loads(out.getvalue())["unscannable"] == reason
