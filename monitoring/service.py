"""Wiring of monitoring: what ``gateway.service.makeService`` asks for.

``build_monitoring(config, reactor, ready=...)`` returns the Observer the
protocol reports to, the Service that serves /metrics, /healthz and /readyz
(and owns the access-log file), the registry and the log-reopen hook.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.interfaces import Observer
from gateway.settings import ConfigError, ConfigErrors
from monitoring.accesslog import AccessLog, AccessLogFile
from monitoring.health import QuietSite, ReadyCheck, build_root
from monitoring.metrics import GatewayMetrics, MultiProcessRegistry, metrics_registry
from monitoring.observer import MonitoringObserver

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

log = Logger()

# Multiprocess mode copies the register writer's figures into the metric
# files this often; a scrape interval is typically 15 s or more.
REGISTER_REFRESH_SECONDS = 1.0


@dataclass
class MonitoringComponents:
    observer: Observer
    service: Service
    registry: CollectorRegistry
    reopen_logs: Callable[[], None]


class MonitoringService(Service):
    """Listens for /metrics, /healthz, /readyz and owns the access-log file.

    ``endpoint`` may be None (no HTTP listener: e.g. every worker but one in a
    multi-worker setup).  Listening failures at start (port taken) raise from
    ``startService`` like ``twistd`` strports do, so the gateway does not run
    half-monitored without noticing.
    """

    name = "monitoring"

    def __init__(
        self,
        reactor: Any,
        endpoint: str | None,
        site: QuietSite | None,
        *,
        access_file: AccessLogFile | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._reactor = reactor
        self.endpoint = endpoint
        self.site = site
        self.access_file = access_file
        self.metrics = metrics
        self.port: IListeningPort | None = None
        self._failure: Failure | None = None
        self._waiters: list[defer.Deferred[IListeningPort]] = []
        self._refresh: task.LoopingCall | None = None

    def startService(self) -> None:
        if self.endpoint is not None and self.site is not None:
            self._listen()  # first: a port in use raises before anything else started
        super().startService()
        if self.access_file is not None and not self.access_file.is_open:
            self.access_file.open()
        if self.metrics is not None and self.metrics.multiprocess:
            self._refresh = task.LoopingCall(self.metrics.refresh_register)
            self._refresh.clock = self._reactor
            self._refresh.start(REGISTER_REFRESH_SECONDS, now=True)

    def _listen(self) -> None:
        assert self.endpoint is not None and self.site is not None
        self._failure = None
        started = [True]  # False once listen() returned: later failures are logged, not raised

        def listening(port: IListeningPort) -> None:
            self.port = port
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.callback(port)

        def failed(f: Failure) -> None:
            self._failure = f
            if not started[0]:
                log.failure("monitoring listener {endpoint} failed", f, endpoint=self.endpoint)
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                w.errback(f)

        ep = endpoints.serverFromString(self._reactor, self.endpoint)
        ep.listen(self.site).addCallbacks(listening, failed)
        started[0] = False
        if self._failure is not None:  # synchronous, e.g. the port is in use
            self._failure.raiseException()

    def whenListening(self) -> defer.Deferred[IListeningPort]:
        """Fires with the listening port (tests use it to learn port 0's number)."""
        if self.port is not None:
            return defer.succeed(self.port)
        if self._failure is not None:
            return defer.fail(self._failure)
        d: defer.Deferred[IListeningPort] = defer.Deferred()
        self._waiters.append(d)
        return d

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self._refresh is not None and self._refresh.running:
            self._refresh.stop()
        self._refresh = None
        if self.metrics is not None:
            self.metrics.stop()  # counts waiting in memory reach the files before exit
        if self.access_file is not None:
            self.access_file.close()
        port, self.port = self.port, None
        if port is not None:
            return defer.maybeDeferred(port.stopListening)
        return None


def multiprocess_dir(config: GatewayConfig) -> str | None:
    """Where worker metric files go, or None for single-process metrics."""
    # Only a supervised worker (the parent sets the variable, see
    # gateway.workers) or an explicit setting means several processes.
    configured = config.monitoring.multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return configured or None


def build_monitoring(
    config: GatewayConfig,
    reactor: Any,
    *,
    ready: ReadyCheck,
    queue_depth: Callable[[], int] = lambda: 0,
    write_errors: Callable[[], int] = lambda: 0,
    serve_http: bool = True,
) -> MonitoringComponents:
    """Build the observer, the monitoring service and the registry.

    ``ready()`` returns (ok, reason) for /readyz.  ``queue_depth`` and
    ``write_errors`` read the register writer.  ``serve_http=False`` builds
    everything but the HTTP listener (a worker whose parent serves /metrics).
    Raises ConfigErrors naming ``[monitoring] access_log`` when the access
    log file cannot be opened.
    """
    settings = config.monitoring
    registry = metrics_registry(multiprocess_dir(config))
    metrics = GatewayMetrics(
        registry,
        max_tenants=settings.max_tenant_labels,
        max_rules=settings.max_rule_labels,
        queue_depth=queue_depth,
        write_errors=write_errors,
        clock=reactor,  # folds counts at intervals (monitoring.metrics.FLUSH_INTERVAL)
    )

    access_file: AccessLogFile | None = None
    access: AccessLog | None = None
    if settings.access_log != "none":
        try:
            access_file = AccessLogFile(settings.access_log, clock=reactor)
        except OSError as e:
            raise ConfigErrors([ConfigError(
                config.source, "[monitoring] access_log",
                f"cannot open {settings.access_log!r}: {e.strerror or e}",
            )]) from None
        access = AccessLog(access_file, users=settings.access_log_users, redaction=settings.url_redaction)

    observer = MonitoringObserver(metrics, access, clock=reactor.seconds)
    # A scrape this process serves sees every count so far (see FLUSH_INTERVAL).
    site = QuietSite(build_root(registry, ready, before_scrape=metrics.flush)) if serve_http else None
    service = MonitoringService(
        reactor, settings.metrics_listen if serve_http else None, site,
        access_file=access_file, metrics=metrics,
    )
    reopen = access_file.reopen if access_file is not None else _nothing
    return MonitoringComponents(observer=observer, service=service, registry=registry, reopen_logs=reopen)


def build_metrics_service(
    config: GatewayConfig, reactor: Any, *, ready: ReadyCheck, multiprocess_dir: str,
    collectors: Sequence[Any] = (),
) -> MonitoringService:
    """The monitoring listener of a supervising parent in multi-worker mode.

    It serves /metrics summed over the workers' files, /healthz and /readyz,
    and records nothing itself: a parent with metric objects of its own would
    add a live process whose gauges never move (``rules_loaded`` would read
    0 through livemin).  Workers then call ``build_monitoring(...,
    serve_http=False)``.  Call ``prepare_multiprocess_dir`` first.
    """
    registry = MultiProcessRegistry(multiprocess_dir)
    for collector in collectors:  # the parent's own figures (worker restarts), read at each scrape
        registry.register(collector)
    site = QuietSite(build_root(registry, ready))
    return MonitoringService(reactor, config.monitoring.metrics_listen, site)


def _nothing() -> None:
    pass


__all__ = [
    "MonitoringComponents",
    "MonitoringService",
    "build_metrics_service",
    "build_monitoring",
    "multiprocess_dir",
]
