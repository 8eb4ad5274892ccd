"""Counts wait in memory and are folded into the metric children: when the
gateway is quiet, when its last connection closes, before an in-process
scrape, at the latest FLUSH_INTERVAL after the first, and at stop."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram
from twisted.internet import task
from twisted.web import resource
from twisted.web.test.requesthelper import DummyRequest

from gateway.config import GatewayConfig
from gateway.interfaces import TransactionRecord, Verdict
from monitoring.health import FoldFirst
from monitoring.metrics import (
    FLUSH_INTERVAL,
    QUIET_INTERVAL,
    REQUEST_BUCKETS,
    SCAN_BUCKETS,
    GatewayMetrics,
    metrics_registry,
)
from monitoring.observer import MonitoringObserver
from monitoring.service import build_monitoring
from monitoring.settings import MonitoringSettings

REQUESTS = "icap_gateway_requests_total"
LABELS = {"method": "RESPMOD", "service": "respmod", "tenant": "acme", "outcome": "clean"}


def requests(registry: CollectorRegistry) -> float:
    return registry.get_sample_value(REQUESTS, LABELS) or 0.0


def make(clock: task.Clock) -> tuple[GatewayMetrics, CollectorRegistry]:
    registry = metrics_registry(None)
    return GatewayMetrics(registry, clock=clock), registry


def finish(metrics: GatewayMetrics, duration: float = 0.001) -> None:
    metrics.request_finished("RESPMOD", "respmod", "acme", "clean", duration)


def test_counts_wait_for_a_quiet_tick() -> None:
    clock = task.Clock()
    metrics, registry = make(clock)
    finish(metrics)
    finish(metrics)
    assert requests(registry) == 0.0  # waiting in memory
    clock.advance(QUIET_INTERVAL)
    assert requests(registry) == 0.0  # the second came in the first tick: not quiet yet
    clock.advance(QUIET_INTERVAL)
    assert requests(registry) == 2.0
    assert registry.get_sample_value("icap_gateway_request_duration_seconds_count", {"method": "RESPMOD"}) == 2.0
    assert not clock.getDelayedCalls()  # nothing waits: no timer either


def test_a_busy_gateway_is_folded_at_most_flush_interval_late() -> None:
    clock = task.Clock()
    metrics, registry = make(clock)
    step = QUIET_INTERVAL / 2  # never quiet
    done = 0
    history: list[tuple[float, int]] = []  # (time, records finished by then)
    while clock.seconds() < 5 * FLUSH_INTERVAL:
        finish(metrics)
        done += 1
        history.append((clock.seconds(), done))
        clock.advance(step)
        # Whatever finished FLUSH_INTERVAL (plus a tick) ago is visible now.
        due = max((n for t, n in history if t <= clock.seconds() - FLUSH_INTERVAL - 2 * QUIET_INTERVAL),
                  default=0)
        assert due <= requests(registry) <= done
    for _ in range(3):  # the load stops: a quiet tick folds the rest
        clock.advance(QUIET_INTERVAL)
    assert requests(registry) == done


def test_the_last_connection_closing_folds_at_once() -> None:
    clock = task.Clock()
    metrics, registry = make(clock)
    metrics.connection_opened()
    metrics.connection_opened()
    finish(metrics)
    metrics.connection_closed()
    assert requests(registry) == 0.0  # another connection is still open
    metrics.connection_closed()
    assert requests(registry) == 1.0
    assert registry.get_sample_value("icap_gateway_connections_total") == 2.0
    assert registry.get_sample_value("icap_gateway_active_connections") == 0.0


def test_one_connection_per_request_keeps_one_timer() -> None:
    clock = task.Clock()
    metrics, registry = make(clock)
    for n in range(1, 101):
        metrics.connection_opened()
        finish(metrics)
        metrics.connection_closed()
        assert requests(registry) == n  # each close folds ...
        assert len(clock.getDelayedCalls()) == 1  # ... but schedules nothing new
    clock.advance(QUIET_INTERVAL)
    assert not clock.getDelayedCalls()  # the tick found nothing waiting and ended


def test_stop_folds_and_later_counts_are_written_at_once() -> None:
    clock = task.Clock()
    metrics, registry = make(clock)
    finish(metrics)
    metrics.auth_failed("no-credentials")
    metrics.stop()
    assert requests(registry) == 1.0
    assert registry.get_sample_value("icap_gateway_auth_failures_total", {"reason": "no-credentials"}) == 1.0
    finish(metrics)
    assert requests(registry) == 2.0
    assert not clock.getDelayedCalls()


def test_the_service_stop_folds_what_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    config = GatewayConfig(monitoring=MonitoringSettings(access_log="none"))
    c = build_monitoring(config, task.Clock(), ready=lambda: (True, ""), serve_http=False)
    c.observer.transaction_finished(TransactionRecord(
        started=0.0, duration=0.01, method="RESPMOD", service="respmod", icap_status=204,
        client_ip="10.0.0.1", peer="127.0.0.1", tenant="acme", outcome="clean"))
    c.observer.scan_finished(Verdict("clean", scanned_bytes=100, duration=0.002, cache="miss"), "response")
    c.observer.scan_finished(Verdict("clean", scanned_bytes=50, duration=0.001, inline=True, cache="miss"), "response")
    # A cached verdict scanned nothing; one the cache never saw counts as a bypass.
    c.observer.scan_finished(Verdict("clean", scanned_bytes=0, duration=0.0001, detail="cached", cache="hit"),
                             "response")
    c.observer.scan_finished(Verdict("clean", scanned_bytes=30, duration=0.0001), "response")
    c.observer.inline_scans_closed("v1")
    assert (c.registry.get_sample_value(REQUESTS, LABELS) or 0.0) == 0.0
    c.service.stopService()
    assert c.registry.get_sample_value(REQUESTS, LABELS) == 1.0
    assert c.registry.get_sample_value("icap_gateway_scanned_bytes_total", {"direction": "response"}) == 180.0
    assert c.registry.get_sample_value("icap_gateway_scan_cache_total", {"result": "miss"}) == 2.0
    assert c.registry.get_sample_value("icap_gateway_scan_cache_total", {"result": "hit"}) == 1.0
    assert c.registry.get_sample_value("icap_gateway_scan_cache_total", {"result": "bypass"}) == 1.0
    assert c.registry.get_sample_value("icap_gateway_scan_thread_total", {"thread": "reactor"}) == 1.0
    assert c.registry.get_sample_value("icap_gateway_scan_thread_total", {"thread": "pool"}) == 3.0
    assert c.registry.get_sample_value("icap_gateway_inline_scans_closed_total") == 1.0


def test_no_increment_is_lost_whatever_the_timing() -> None:
    rng = random.Random(9)
    clock = task.Clock()
    metrics, registry = make(clock)
    expected = 0
    for _ in range(5000):
        action = rng.random()
        if action < 0.6:
            finish(metrics)
            expected += 1
        elif action < 0.7:
            metrics.connection_opened()
        elif action < 0.8:
            metrics.connection_closed()
        elif action < 0.9:
            metrics.flush()
        else:
            clock.advance(rng.choice((0.0, QUIET_INTERVAL / 3, QUIET_INTERVAL, FLUSH_INTERVAL)))
        assert requests(registry) <= expected
    metrics.stop()
    assert requests(registry) == expected


# Bounds themselves (observe() counts a value equal to a bound in that
# bucket), values between, beyond the last, zero, negative and infinite.
ODD_VALUES = [*REQUEST_BUCKETS, *SCAN_BUCKETS, 0.0, -1.0, 1e-9, 0.00075, 7.5, 59.999, 60.0001, 1e9, math.inf]


def _samples(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> dict[str, float]:
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.startswith(name) and not s.name.endswith("_created") \
                    and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.name + str(sorted(s.labels.items()))] = s.value
    return out


@pytest.mark.parametrize("flush_every", [1, 3, len(ODD_VALUES)])
def test_folded_histograms_equal_observe(flush_every: int) -> None:
    clock = task.Clock()
    metrics, registry = make(clock)
    direct_registry = CollectorRegistry()
    direct = Histogram("icap_gateway_request_duration_seconds", "x", ["method"], buckets=REQUEST_BUCKETS,
                       registry=direct_registry).labels("RESPMOD")
    direct_scan = Histogram("icap_gateway_scan_duration_seconds", "x", ["direction"], buckets=SCAN_BUCKETS,
                            registry=direct_registry).labels("response")
    for i, value in enumerate(ODD_VALUES):
        finish(metrics, value)
        metrics.scan_finished("response", "clean", 1, value, ())
        direct.observe(value)
        direct_scan.observe(value)
        if i % flush_every == 0:
            metrics.flush()
    metrics.flush()
    for name, labels in (("icap_gateway_request_duration_seconds", {"method": "RESPMOD"}),
                         ("icap_gateway_scan_duration_seconds", {"direction": "response"})):
        folded, observed = _samples(registry, name, labels), _samples(direct_registry, name, labels)
        assert folded.keys() == observed.keys() and len(folded) > 3
        for key, value in observed.items():
            if key.startswith(name + "_sum"):
                assert folded[key] == value  # both inf here: the inf value
            else:
                assert folded[key] == value, key


def test_folded_histogram_sum_matches_observe_for_finite_values() -> None:
    clock = task.Clock()
    metrics, registry = make(clock)
    values = [0.0003, 0.02, 1.5, 0.0000123]
    for v in values:
        finish(metrics, v)
    clock.pump([QUIET_INTERVAL] * 2)
    got = registry.get_sample_value("icap_gateway_request_duration_seconds_sum", {"method": "RESPMOD"})
    assert got == pytest.approx(sum(values))
    assert registry.get_sample_value("icap_gateway_request_duration_seconds_bucket",
                                     {"method": "RESPMOD", "le": "0.0005"}) == 2.0


def test_nan_is_counted_as_observe_counts_it() -> None:
    metrics, registry = make(task.Clock())
    finish(metrics, math.nan)
    metrics.flush()
    assert registry.get_sample_value("icap_gateway_request_duration_seconds_count", {"method": "RESPMOD"}) == 0.0
    assert math.isnan(registry.get_sample_value(  # type: ignore[arg-type]
        "icap_gateway_request_duration_seconds_sum", {"method": "RESPMOD"}))


def test_without_a_clock_counts_are_written_at_once() -> None:
    registry = metrics_registry(None)
    metrics = GatewayMetrics(registry)
    finish(metrics)
    assert requests(registry) == 1.0


def test_observer_counts_reach_the_registry_after_a_quiet_tick() -> None:
    clock = task.Clock()
    metrics, registry = make(clock)
    observer = MonitoringObserver(metrics, None, clock=clock.seconds)
    observer.scan_finished(Verdict("blocked", rules=("sig.Eicar",), scanned_bytes=68, duration=0.001), "response")
    observer.auth_failed("bad-key")
    observer.internal_error()
    observer.late_block("remembered")
    observer.connection_dropped("head-timeout")
    assert not registry.get_sample_value("icap_gateway_rule_matches_total", {"rule": "sig.Eicar"})
    clock.advance(QUIET_INTERVAL)
    assert registry.get_sample_value("icap_gateway_rule_matches_total", {"rule": "sig.Eicar"}) == 1.0
    assert registry.get_sample_value("icap_gateway_auth_failures_total", {"reason": "bad-key"}) == 1.0
    assert registry.get_sample_value("icap_gateway_internal_errors_total") == 1.0
    assert registry.get_sample_value("icap_gateway_late_block_total", {"event": "remembered"}) == 1.0
    assert registry.get_sample_value("icap_gateway_connections_dropped_total", {"reason": "head-timeout"}) == 1.0


class _Inner(resource.Resource):
    isLeaf = True

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def render(self, request: Any) -> bytes:
        self.log.append("render")
        return b"ok"


def test_a_scrape_folds_first_and_survives_a_failing_fold() -> None:
    log: list[str] = []
    assert FoldFirst(_Inner(log), lambda: log.append("fold")).render(DummyRequest([b""])) == b"ok"
    assert log == ["fold", "render"]

    def broken() -> None:
        raise RuntimeError("boom")

    log.clear()
    assert FoldFirst(_Inner(log), broken).render(DummyRequest([b""])) == b"ok"
    assert log == ["render"]
