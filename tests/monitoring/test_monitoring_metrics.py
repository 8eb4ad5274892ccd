"""The observer turns gateway events into the documented metrics."""

from __future__ import annotations

import inspect
import math

import pytest
from prometheus_client import CollectorRegistry

from gateway.interfaces import Observer, TransactionRecord, Verdict
from monitoring.metrics import (
    MAX_LABEL_VALUE_LENGTH,
    OTHER,
    SERVED_SERVICES,
    GatewayMetrics,
    LabelCap,
    metrics_registry,
)
from monitoring.observer import MonitoringObserver


def record(**kw: object) -> TransactionRecord:
    base: dict[str, object] = dict(
        started=1_700_000_000.25, duration=0.004, method="RESPMOD", service="yara",
        icap_status=200, client_ip="10.1.2.3", peer="127.0.0.1", tenant="acme", outcome="clean",
    )
    base.update(kw)
    return TransactionRecord(**base)  # type: ignore[arg-type]


@pytest.fixture
def registry() -> CollectorRegistry:
    return metrics_registry(None)


def make(registry: CollectorRegistry, **kw: object) -> tuple[MonitoringObserver, GatewayMetrics]:
    metrics = GatewayMetrics(registry, **kw)  # type: ignore[arg-type]
    return MonitoringObserver(metrics, None, clock=lambda: 1234.5), metrics


def val(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_observer_implements_every_method_of_the_protocol(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    _typed: Observer = observer  # for type checkers
    wanted = {name: inspect.signature(f) for name, f in vars(Observer).items()
              if callable(f) and not name.startswith("_")}
    assert len(wanted) >= 6
    for name, signature in wanted.items():
        mine = inspect.signature(getattr(MonitoringObserver, name))
        assert list(mine.parameters) == list(signature.parameters), name


def test_transactions_counted_by_method_service_tenant_outcome(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    observer.transaction_finished(record())
    observer.transaction_finished(record())
    observer.transaction_finished(record(outcome="blocked", method="REQMOD", duration=0.2))
    observer.transaction_finished(record(tenant="", outcome="unauthenticated", icap_status=401))
    observer.transaction_finished(record(method="OPTIONS", tenant="", outcome=None))

    total = "icap_gateway_requests_total"
    assert val(registry, total, method="RESPMOD", service="yara", tenant="acme", outcome="clean") == 2
    assert val(registry, total, method="REQMOD", service="yara", tenant="acme", outcome="blocked") == 1
    assert val(registry, total, method="RESPMOD", service="yara", tenant="none",
               outcome="unauthenticated") == 1
    assert val(registry, total, method="OPTIONS", service="yara", tenant="none", outcome="none") == 1

    hist = "icap_gateway_request_duration_seconds"
    assert val(registry, hist + "_count", method="RESPMOD") == 3
    assert val(registry, hist + "_sum", method="REQMOD") == pytest.approx(0.2)
    # 0.2 s falls in the 0.25 bucket but not the 0.1 one
    assert val(registry, hist + "_bucket", method="REQMOD", le="0.1") == 0
    assert val(registry, hist + "_bucket", method="REQMOD", le="0.25") == 1


def test_unknown_method_and_outcome_are_bounded(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    observer.transaction_finished(record(method="BREW", outcome="weird"))
    assert val(registry, "icap_gateway_requests_total", method=OTHER, service="yara", tenant="acme",
               outcome=OTHER) == 1
    assert val(registry, "icap_gateway_request_duration_seconds_count", method=OTHER) == 1


def test_scans_bytes_durations_and_rule_matches(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    observer.scan_finished(Verdict("clean", scanned_bytes=1000, duration=0.003), "response")
    observer.scan_finished(Verdict("blocked", rules=("sig.Eicar", "rl.Mal"), scanned_bytes=500,
                                   duration=0.03), "request")
    observer.scan_finished(Verdict("blocked", rules=("sig.Eicar",), scanned_bytes=10), "response")
    # too large and passed: no YARA ran, so no latency sample
    observer.scan_finished(Verdict("unscanned", detail="too-large"), "response")

    assert val(registry, "icap_gateway_scanned_bytes_total", direction="response") == 1010
    assert val(registry, "icap_gateway_scanned_bytes_total", direction="request") == 500
    assert val(registry, "icap_gateway_scan_duration_seconds_count", direction="response") == 2
    assert val(registry, "icap_gateway_scan_duration_seconds_sum", direction="request") == pytest.approx(0.03)
    assert val(registry, "icap_gateway_rule_matches_total", rule="sig.Eicar") == 2
    assert val(registry, "icap_gateway_rule_matches_total", rule="rl.Mal") == 1
    # a rule gets a label only once it matched
    assert val(registry, "icap_gateway_rule_matches_total", rule="sig.Other") is None


def test_connections_gauge_and_counter(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    for _ in range(3):
        observer.connection_opened()
    observer.connection_closed()
    assert val(registry, "icap_gateway_active_connections") == 2
    assert val(registry, "icap_gateway_connections_total") == 3


def test_auth_failures_by_reason(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    observer.auth_failed("unknown-key")
    observer.auth_failed("unknown-key")
    observer.auth_failed("missing-key")
    assert val(registry, "icap_gateway_auth_failures_total", reason="unknown-key") == 2
    assert val(registry, "icap_gateway_auth_failures_total", reason="missing-key") == 1


def test_rules_loaded_gauge_and_reload_results(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    assert val(registry, "icap_gateway_rules_loaded") == 0  # nothing loaded yet
    assert val(registry, "icap_gateway_rules_reload_total", result="failure") == 0  # pre-created
    observer.rules_loaded(True, 1834, "v1")
    assert val(registry, "icap_gateway_rules_loaded") == 1834
    assert val(registry, "icap_gateway_rules_last_success_timestamp_seconds") == 1234.5
    # a failed reload keeps the old rules in force and the gauge with them
    assert val(registry, "icap_gateway_rules_last_reload_success") == 1
    observer.rules_loaded(False, 0, "v1")
    assert val(registry, "icap_gateway_rules_loaded") == 1834
    assert val(registry, "icap_gateway_rules_last_reload_success") == 0
    assert val(registry, "icap_gateway_rules_reload_total", result="success") == 1
    assert val(registry, "icap_gateway_rules_reload_total", result="failure") == 1
    observer.rules_loaded(True, 1900, "v2")
    assert val(registry, "icap_gateway_rules_last_reload_success") == 1
    assert val(registry, "icap_gateway_rules_loaded") == 1900


def test_register_figures_read_at_scrape_time(registry: CollectorRegistry) -> None:
    state = {"depth": 7, "errors": 2}
    make(registry, queue_depth=lambda: state["depth"], write_errors=lambda: state["errors"])
    assert val(registry, "icap_gateway_register_queue_depth") == 7
    assert val(registry, "icap_gateway_register_write_errors_total") == 2
    state.update(depth=0, errors=5)
    assert val(registry, "icap_gateway_register_queue_depth") == 0
    assert val(registry, "icap_gateway_register_write_errors_total") == 5


def test_failing_register_callable_does_not_break_a_scrape(registry: CollectorRegistry) -> None:
    def broken() -> int:
        raise RuntimeError("register gone")

    make(registry, queue_depth=broken)
    depth = val(registry, "icap_gateway_register_queue_depth")
    assert depth is not None and math.isnan(depth)
    assert val(registry, "icap_gateway_register_write_errors_total") == 0


def test_tenant_and_rule_cardinality_is_capped(registry: CollectorRegistry) -> None:
    observer, metrics = make(registry, max_tenants=3, max_rules=2)
    for i in range(10):
        observer.transaction_finished(record(tenant=f"t{i}"))
    observer.transaction_finished(record(tenant="t0"))  # an early tenant keeps its label
    observer.scan_finished(Verdict("blocked", rules=[f"ns.r{i}" for i in range(5)]), "response")

    samples = [s for m in registry.collect() if m.name == "icap_gateway_requests" for s in m.samples
               if s.name.endswith("_total")]
    tenants = {s.labels["tenant"]: s.value for s in samples}
    assert tenants == {"t0": 2, "t1": 1, "t2": 1, OTHER: 7}
    rules = {s.labels["rule"]: s.value for m in registry.collect() if m.name == "icap_gateway_rule_matches"
             for s in m.samples if s.name.endswith("_total")}
    assert rules == {"ns.r0": 1, "ns.r1": 1, OTHER: 3}
    assert len(metrics.tenant_label) == 4  # 3 tenants + the fixed "none"; no growth past the cap


def test_service_label_is_capped(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    for i in range(100):  # a client may name any ICAP service path
        observer.transaction_finished(record(service=f"svc{i}", outcome="error", icap_status=404))
    services = {s.labels["service"] for m in registry.collect() if m.name == "icap_gateway_requests"
                for s in m.samples if s.name.endswith("_total")}
    assert OTHER in services and len(services) <= 17


def test_hostile_label_values_are_other_and_use_no_slot(registry: CollectorRegistry) -> None:
    observer, metrics = make(registry)
    observer.transaction_finished(record(service="x" * 10_000, outcome="error", icap_status=404))
    observer.transaction_finished(record(service="svc\nfake_metric 1", outcome="error", icap_status=404))
    observer.scan_finished(Verdict("blocked", rules=["ns\x00.r", "ns.r" + "x" * 200]), "response")
    values = {v for m in registry.collect() for s in m.samples for v in s.labels.values()}
    assert not [v for v in values if len(v) > MAX_LABEL_VALUE_LENGTH or "\n" in v or "\x00" in v]
    # the caps are not used up (the served services' fixed labels aside)
    assert len(metrics.service_label) == len(SERVED_SERVICES) and len(metrics.rule_label) == 0
    assert val(registry, "icap_gateway_rule_matches_total", rule=OTHER) == 2


def test_bad_headers_counted_by_a_fixed_label_set(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    observer.transaction_finished(record(bad_headers=("x-client-ip",)))
    observer.transaction_finished(record(bad_headers=("x-client-ip", "x-authenticated-user")))
    observer.transaction_finished(record(bad_headers=("x-made-up",)))  # not ours: not a label
    assert val(registry, "icap_gateway_bad_header_total", header="x-client-ip") == 2
    assert val(registry, "icap_gateway_bad_header_total", header="x-authenticated-user") == 1
    assert val(registry, "icap_gateway_bad_header_total", header="x-made-up") is None


def test_internal_errors_counted(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)
    assert val(registry, "icap_gateway_internal_errors_total") == 0
    observer.internal_error()
    assert val(registry, "icap_gateway_internal_errors_total") == 1


def test_label_cap_fixed_values_do_not_use_the_limit() -> None:
    cap = LabelCap(1, fixed=("none",))
    assert cap("none") == "none"
    assert cap("a") == "a"
    assert cap("b") == OTHER
    assert cap("none") == "none"
    assert cap("a") == "a"


def test_observer_swallows_faults(registry: CollectorRegistry) -> None:
    observer, _ = make(registry)

    class Boom:
        def write(self, record: TransactionRecord) -> None:
            raise RuntimeError("disk on fire")

    observer.access_log = Boom()  # type: ignore[assignment]
    observer.transaction_finished(record())  # must not raise
    # metrics were still updated before the access log failed
    assert val(registry, "icap_gateway_requests_total", method="RESPMOD", service="yara",
               tenant="acme", outcome="clean") == 1
    # a Verdict that is not one: nothing raised either
    observer.scan_finished(None, "response")  # type: ignore[arg-type]
    assert observer._faults == 2


def test_registries_are_isolated() -> None:
    a, b = metrics_registry(None), metrics_registry(None)
    oa, _ = make(a)
    make(b)
    oa.connection_opened()
    assert a.get_sample_value("icap_gateway_active_connections") == 1
    assert b.get_sample_value("icap_gateway_active_connections") == 0


def test_process_collector_present(registry: CollectorRegistry) -> None:
    make(registry)
    assert (val(registry, "process_resident_memory_bytes") or 0) > 0
