"""The gateway's Observer: metrics plus the access log."""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from gateway.interfaces import Direction, TransactionRecord, Verdict
from monitoring.accesslog import AccessLog
from monitoring.metrics import GatewayMetrics

log = Logger()


class MonitoringObserver:
    """Implements ``gateway.interfaces.Observer``.

    Called on the reactor thread for every connection and transaction, so it
    only increments pre-resolved metric children and, when an access log is
    configured, writes one line.  It never raises: a monitoring fault must
    not fail a request.
    """

    def __init__(
        self,
        metrics: GatewayMetrics,
        access_log: AccessLog | None = None,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.metrics = metrics
        self.access_log = access_log
        self._clock = clock
        self._faults = 0

    def connection_opened(self) -> None:
        try:
            self.metrics.connection_opened()
        except Exception:
            self._fault()

    def connection_closed(self) -> None:
        try:
            self.metrics.connection_closed()
        except Exception:
            self._fault()

    def connection_dropped(self, reason: str) -> None:
        try:
            self.metrics.connection_dropped(reason)
        except Exception:
            self._fault()

    def transaction_finished(self, record: TransactionRecord) -> None:
        try:
            self.metrics.request_finished(
                record.method, record.service, record.tenant, record.outcome, record.duration
            )
            if self.access_log is not None:
                self.access_log.write(record)
        except Exception:
            self._fault()

    def scan_finished(self, verdict: Verdict, direction: Direction) -> None:
        try:
            self.metrics.scan_finished(
                direction, verdict.outcome, verdict.scanned_bytes, verdict.duration, verdict.rules,
                cached=verdict.detail == "cached",
            )
        except Exception:
            self._fault()

    def auth_failed(self, reason: str) -> None:
        try:
            self.metrics.auth_failed(reason)
        except Exception:
            self._fault()

    def rules_loaded(self, ok: bool, rule_count: int, version: str) -> None:
        try:
            self.metrics.rules_loaded(ok, rule_count, self._clock())
        except Exception:
            self._fault()

    def _fault(self) -> None:
        # Log the first fault with its traceback, then only now and then:
        # a broken observer on every request would flood the log.
        self._faults += 1
        if self._faults == 1 or self._faults % 10000 == 0:
            log.failure("monitoring observer failed ({n} so far)", n=self._faults)


__all__ = ["MonitoringObserver"]
