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

    def late_block(self, event: str) -> None:
        try:
            self.metrics.late_block(event)
        except Exception:
            self._fault()

    def inline_scans_closed(self, version: str) -> None:
        """A stall ended inline scans of ruleset ``version`` (not a label:
        versions are many over a gateway's life)."""
        try:
            self.metrics.inline_scans_closed()
        except Exception:
            self._fault()

    def transaction_finished(self, record: TransactionRecord) -> None:
        try:
            self.metrics.request_finished(
                record.method, record.service, record.tenant, record.outcome, record.duration
            )
            for header in record.bad_headers:
                self.metrics.bad_header(header)
            if record.unscannable and record.scan_duration is None:
                # Passed before any scan (too large, answered while it arrived):
                # scan_finished never saw it.
                self.metrics.unscannable_body(record.direction, record.unscannable, "pass")
            if self.access_log is not None:
                self.access_log.write(record)
        except Exception:
            self._fault()

    def scan_finished(self, verdict: Verdict, direction: Direction) -> None:
        try:
            # Too large to scan at all: no YARA ran, as the older "unscanned".
            # Not a cache hit: that scanned nothing either, but was asked for
            # (a match in the part decoded before max_scan_size, kept).
            outcome = ("unscanned" if verdict.reason == "too-large" and not verdict.scanned_bytes
                       and verdict.cache != "hit" else verdict.outcome)
            self.metrics.scan_finished(
                direction, outcome, verdict.scanned_bytes, verdict.duration, verdict.rules,
                cache=verdict.cache, inline=verdict.inline,
            )
            if verdict.reason:
                action = "matched" if verdict.outcome == "blocked" else verdict.action or "block"
                self.metrics.unscannable_body(direction, verdict.reason, action)
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

    def internal_error(self) -> None:
        try:
            self.metrics.internal_error()
        except Exception:
            self._fault()

    def _fault(self) -> None:
        # Log the first fault with its traceback, then only now and then:
        # a broken observer on every request would flood the log.
        self._faults += 1
        if self._faults == 1 or self._faults % 10000 == 0:
            log.failure("monitoring observer failed ({n} so far)", n=self._faults)


__all__ = ["MonitoringObserver"]
