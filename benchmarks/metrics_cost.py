"""What recording costs on the request path: ns per Observer call.

    .venv/bin/python benchmarks/metrics_cost.py [--calls N]

Prints the cost of ``transaction_finished`` (metrics only, and with the JSON
access log written to /dev/null), ``scan_finished`` and a connection's
open+close, against a NullObserver baseline.  Single-threaded, bounded
(default 200 000 calls per case: a few seconds).

As the gateway runs them: the metrics fold their waiting counts on a clock
(advanced by QUIET_INTERVAL every 64 calls, so the folds are in the figures)
and the access log batches its lines.  ``--multiprocess`` uses
prometheus_client's multiprocess mode (mmap files in a temporary directory),
as worker processes do.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from collections.abc import Callable

from twisted.internet import task

from gateway.interfaces import NullObserver, TransactionRecord, Verdict
from monitoring.accesslog import AccessLog, AccessLogFile
from monitoring.metrics import QUIET_INTERVAL, GatewayMetrics, metrics_registry
from monitoring.observer import MonitoringObserver


def measure(fn: Callable[[], object], calls: int) -> float:
    """Best of three runs, ns per call (the best filters out scheduler noise)."""
    best = float("inf")
    for _ in range(3):
        gc.collect()
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--multiprocess", action="store_true",
                        help="prometheus_client multiprocess mode (mmap files), as with worker processes")
    args = parser.parse_args()
    mp_dir = tempfile.mkdtemp(prefix="metrics-cost-") if args.multiprocess else None
    try:
        run(args.calls, mp_dir)
    finally:
        if mp_dir is not None:
            shutil.rmtree(mp_dir, ignore_errors=True)


def run(n: int, mp_dir: str | None) -> None:

    tenants = [f"tenant{i}" for i in range(20)]
    records = [
        TransactionRecord(
            started=1_700_000_000.0, duration=0.003, method="RESPMOD", service="yara", icap_status=200,
            client_ip="10.0.0.1", peer="127.0.0.1", tenant=t, user="alice",
            url="http://example.com/download/file.bin?session=abc", http_status=200,
            outcome="clean", direction="response", body_bytes=65536, scan_duration=0.001,
        )
        for t in tenants
    ]
    verdict = Verdict("clean", scanned_bytes=65536, duration=0.001)
    blocked = Verdict("blocked", rules=("sig.Eicar",), scanned_bytes=68, duration=0.0005)

    clock = task.Clock()
    null = NullObserver()
    metrics_only = MonitoringObserver(GatewayMetrics(metrics_registry(mp_dir), clock=clock), None, clock=time.time)
    with_log = MonitoringObserver(
        GatewayMetrics(metrics_registry(mp_dir), clock=clock),
        # a file, as deployed: batched lines, one write() per batch
        AccessLog(AccessLogFile("/dev/null", clock=clock), users=True, redaction="no-query"),
        clock=time.time,
    )

    i = 0

    def tick() -> None:
        # every 64 calls the reactor turns: the metrics fold what waits
        if i % 64 == 0:
            clock.advance(QUIET_INTERVAL)

    def cycle(observer: MonitoringObserver | NullObserver) -> Callable[[], None]:
        def call() -> None:
            nonlocal i
            i = (i + 1) % len(records)
            observer.transaction_finished(records[i])
            tick()
        return call

    def scan(observer: MonitoringObserver, v: Verdict) -> Callable[[], None]:
        def call() -> None:
            nonlocal i
            i = (i + 1) % len(records)
            observer.scan_finished(v, "response")
            tick()
        return call

    def connection(observer: MonitoringObserver | NullObserver) -> Callable[[], None]:
        def call() -> None:
            observer.connection_opened()
            observer.connection_closed()
        return call

    baseline = measure(cycle(null), n)
    rows = [
        ("transaction_finished, NullObserver (baseline)", baseline),
        ("transaction_finished, metrics only", measure(cycle(metrics_only), n)),
        ("transaction_finished, metrics + JSON access log", measure(cycle(with_log), n)),
        ("scan_finished, clean", measure(scan(metrics_only, verdict), n)),
        ("scan_finished, 1 rule matched", measure(scan(metrics_only, blocked), n)),
        ("connection_opened + connection_closed", measure(connection(metrics_only), n)),
    ]
    print(f"{n} calls per case, best of 3, {'multiprocess' if mp_dir else 'single-process'} metrics")
    for name, ns in rows:
        extra = "" if name.endswith("(baseline)") or not name.startswith("transaction") else \
            f"  ({ns - baseline:,.0f} ns over baseline)"
        print(f"{name:<50} {ns:>8,.0f} ns/call{extra}")


if __name__ == "__main__":
    main()
