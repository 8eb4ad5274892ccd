"""Wire everything in one place: ``makeService(config, reactor)``.

The ICAP listeners, the scanning pool and rules, the register (key table,
batched writer, purge timer) and monitoring (metrics listener, access log)
become one ``MultiService``.  Nothing else constructs these objects, so a
test builds the real gateway exactly as ``serve`` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from gateway.blockpage import BlockPage
from gateway.config import GatewayConfig, resolve_path
from gateway.connections import count_from_environment
from gateway.handoff import Handoff, HandoffReceiverService
from gateway.lateblock import LateBlockMemory
from gateway.policy import Policies, RulesetScanners
from gateway.protocol import GatewayContext, ICAPFactory
from gateway.proxyprotocol import inner_endpoint, listener_factory
from gateway.scanning.cache import VerdictCache
from gateway.scanning.engine import Engine
from gateway.scanning.rules import RulesManager, make_rules_pool
from gateway.scanning.scanner import YaraScanner, make_scan_pool
from gateway.scanning.spool import BodySpool, MemoryBudget, purge_stale
from gateway.scanning.yara_engine import YaraEngine
from gateway.scanning.yarax import YaraXEngine
from gateway.tls import TLSListeners, client_policy, plain_endpoint
from gateway.workers import (
    AdoptedListenerService,
    AdoptedSocket,
    accept_backlog,
    describe_address,
    wrap_adopted_factory,
)
from monitoring.service import build_monitoring
from register.auth import credentials_from_headers
from register.service import build_register

log = Logger()


class ThreadPoolService(Service):
    """Starts a thread pool with the service and stops it (joining its
    threads) at shutdown, after the listeners stopped feeding it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class RulesService(Service):
    def __init__(self, rules: RulesManager) -> None:
        self.rules = rules

    def startService(self) -> None:
        super().startService()
        self.rules.start()

    def stopService(self) -> None:
        super().stopService()
        self.rules.stop()


class EngineService(Service):
    """Closes the scanning engine (YARA-X's worker processes).
    Parented before the thread pool, so it stops after it: no scanning thread
    is still waiting on a worker then."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def stopService(self) -> None:
        super().stopService()
        self.engine.close()


class ListenerService(StreamServerEndpointService):
    """A listener from ``[server] listen`` that, when stopped, first accepts
    the connections the kernel already queued (see ``accept_backlog``)."""

    port: Any = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: Any) -> Any:
        self.port = port
        return port

    def address(self) -> str:
        return describe_address(self.port.getHost()) if self.port is not None else str(self.endpoint)

    def stopService(self) -> Any:
        if self.port is not None:
            accept_backlog(self.port)
        return super().stopService()


class GatewayService(MultiService):
    """The whole gateway; it stops in order (SIGTERM): the listeners stop
    accepting, every open connection answers what its peer already sent
    (``ICAPFactory.drain``, at most ``[server] shutdown_timeout``), then the
    other services stop, the register's writer flushing the queue last."""

    def __init__(self, shutdown_timeout: float) -> None:
        super().__init__()
        self.factory: ICAPFactory | None = None  # set once the context is built
        self.shutdown_timeout = shutdown_timeout
        # The ICAP listeners; parented last (build_gateway), so they start
        # accepting only once everything else runs.
        self.listeners = MultiService()

    def listening(self) -> list[str]:
        """The endpoints actually accepted on (an adopted socket's, port 0's number)."""
        return [listener.address() for listener in self.listeners]  # type: ignore[attr-defined]

    def stopService(self) -> defer.Deferred[Any]:
        Service.stopService(self)
        d = defer.maybeDeferred(self.listeners.stopService)
        d.addCallback(lambda _: self.factory.drain(self.shutdown_timeout) if self.factory else 0)
        d.addCallback(self._drained)
        return d

    def _drained(self, aborted: int) -> defer.Deferred[Any]:
        if aborted:
            log.warn("shutdown: {count} connections aborted at the {timeout}s deadline", count=aborted,
                     timeout=self.shutdown_timeout)
        else:
            log.info("shutdown: every connection finished")
        rest = [s for s in reversed(list(self)) if s is not self.listeners]
        return defer.DeferredList([defer.maybeDeferred(s.stopService) for s in rest])


@dataclass
class Gateway:
    """What ``makeService`` built, for ``serve`` (signals) and tests."""

    service: GatewayService
    context: GatewayContext
    rules: RulesManager
    reopen_logs: Any
    register: Any
    monitoring: Any
    tls: TLSListeners  # the ssl: listeners' certificates, reloaded on SIGHUP
    policies: Policies  # [tenants.NAME] over [scan], reloaded on SIGHUP
    rulesets: dict[str, RulesManager]  # [rulesets], by name


def build_gateway(
    config: GatewayConfig, reactor: Any, *, adopted: list[AdoptedSocket] | None = None,
    handoff: Handoff | None = None,
) -> Gateway:
    """Build every part; raises RulesError, ConfigErrors or the register's
    SchemaError with a message fit for an admin.

    ``adopted``: (fd, address family) of listening sockets inherited from a
    supervising parent (``gateway.workers``); the worker then accepts on
    those instead of binding ``[server] listen``, and leaves /metrics to the
    parent.  ``handoff``: the parent accepts and hands connections down this
    pipe instead (``gateway.handoff``); the worker is a worker all the same."""
    worker = adopted is not None or handoff is not None
    state_dir = Path(config.server.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    spool_dir = state_dir / "spool"
    spool_dir.mkdir(exist_ok=True)
    purge_stale(spool_dir)  # temp files a crashed run left behind

    server = config.server
    top = GatewayService(server.shutdown_timeout)
    engine: Engine = YaraXEngine(config.scan.threads) if config.scan.engine == "yara-x" else YaraEngine()
    EngineService(engine).setServiceParent(top)
    pool = make_scan_pool(config.scan)
    ThreadPoolService(pool).setServiceParent(top)
    rules_pool = make_rules_pool()
    ThreadPoolService(rules_pool).setServiceParent(top)

    # A supervised worker falls back to the last good rules when the directory
    # does not compile (a restart next to a broken file: gateway.scanning.snapshot).
    last_good = state_dir / "rules-last-good" if worker else None
    rules = RulesManager(resolve_path(config.scan.rules, config), reactor, rules_pool, config.scan.reload_interval,
                         engine=engine, snapshot_store=last_good)
    register = build_register(config, reactor)

    def ready() -> tuple[bool, str]:
        if top.factory is not None and top.factory.draining:
            return False, "shutting down"
        if rules.current is None:
            return False, "no rules loaded"
        unloaded = [name for name, manager in rulesets.items() if manager.current is None]
        if unloaded:
            return False, f"ruleset {unloaded[0]} not loaded"
        if not register.healthy():
            return False, "register unreachable and its queue is full"
        return True, "ok"

    monitoring = build_monitoring(
        config, reactor, ready=ready, queue_depth=register.queue_depth, write_errors=register.write_errors,
        serve_http=not worker,
    )
    rules.add_observer(monitoring.observer.rules_loaded)
    rules.load_now()
    RulesService(rules).setServiceParent(top)
    # [rulesets]: each its own directory, watch, compile and last-good copy
    # (the metrics' rules gauges describe [scan] rules only).
    rulesets: dict[str, RulesManager] = {}
    for name, directory in config.rulesets.items():
        rulesets[name] = manager = RulesManager(
            resolve_path(directory, config), reactor, rules_pool, config.scan.reload_interval, engine=engine,
            snapshot_store=state_dir / f"rules-last-good.{name}" if worker else None)
        manager.load_now()  # RulesError, naming the file, as for [scan] rules
        RulesService(manager).setServiceParent(top)

    cache = VerdictCache(config.scan.cache_entries) if config.scan.cache_entries else None
    closed = monitoring.observer.inline_scans_closed
    default_scanner = YaraScanner(rules, reactor, pool, config.scan, spool_dir, cache=cache, on_inline_closed=closed)
    ruleset_scanners = {name: YaraScanner(manager, reactor, pool, config.scan, spool_dir, cache=cache,
                                          on_inline_closed=closed)
                        for name, manager in rulesets.items()}  # the cache keys on each set's version
    scanner = RulesetScanners(default_scanner, ruleset_scanners)
    late_blocks = None
    if config.scan.late_block_ttl and config.scan.late_block_entries:
        late_blocks = LateBlockMemory(ttl=config.scan.late_block_ttl, max_entries=config.scan.late_block_entries,
                                      clock=reactor.seconds, count=monitoring.observer.late_block)
    block_page = BlockPage(resolve_path(config.scan.block_page, config) if config.scan.block_page else None)
    # A tenant's template that does not load: ValueError or KeyError (string.Template).
    policies = Policies(config, block_page, scanners=ruleset_scanners)
    context = GatewayContext(
        scanner=scanner,
        authenticator=register.authenticator,
        recorder=register.recorder,
        observer=monitoring.observer,
        new_spool=partial(BodySpool, config.scan.memory_threshold, spool_dir,
                          budget=MemoryBudget(server.body_memory_budget)),
        block_page=block_page,
        clock=reactor,
        identify=register.identify,
        credentials=partial(credentials_from_headers, settings=config.auth),
        service_id=server.service_id,
        max_connections=server.max_connections,
        options_ttl=server.options_ttl,
        preview_size=server.preview_size,
        head_timeout=server.head_timeout,
        read_timeout=server.read_timeout,
        min_body_rate=server.min_body_rate,
        idle_timeout=server.idle_timeout,
        max_connection_age=server.max_connection_age,
        max_connection_transactions=server.max_connection_transactions,
        # What the transaction decides itself (an oversize body passed before
        # it is all read, a scanner that failed to answer): the same policy.
        error_policy=policies.table.default.decision.error_policy,
        oversize_policy=policies.table.default.decision.oversize_policy,
        write_timeout=server.write_timeout,
        max_pipelined_bytes=server.max_pipelined_bytes,
        # A worker of several shares the gateway's count (gateway.workers).
        connection_count=count_from_environment(os.environ if worker else {}),
        max_scan_size=config.scan.max_scan_size,
        early_response_after=server.early_response_after,
        skip_types=list(config.scan.skip_types),
        late_blocks=late_blocks,
        policy_for=policies.policy_for,
    )
    top.factory = factory = ICAPFactory(context)
    # The register first: it stops last, after the connections drained, so
    # its writer flushes what the final transactions recorded.
    register.service.setServiceParent(top)
    monitoring.service.setServiceParent(top)
    # ssl: listeners are TCP ones whose factory speaks TLS (gateway.tls); a
    # worker's listeners (adopted or handed off) come in the order of [server] listen.
    tls = TLSListeners(client_policy(config.tls), reactor, server.listen, config.source)  # ConfigErrors
    if handoff is not None:
        HandoffReceiverService(reactor, handoff, lambda index: tls.wrap(index, factory), context.connection_count,
                               wrap_adopted_factory).setServiceParent(top.listeners)
    elif adopted is not None:
        for index, sock in enumerate(adopted):
            AdoptedListenerService(reactor, sock.fd, sock.family, tls.wrap(index, factory),
                                   proxy_protocol=sock.proxy_protocol).setServiceParent(top.listeners)
    else:
        for index, description in enumerate(server.listen):
            endpoint = endpoints.serverFromString(reactor, inner_endpoint(plain_endpoint(description)))
            listener = ListenerService(endpoint, listener_factory(description, tls.wrap(index, factory), reactor))
            listener._raiseSynchronously = True  # a port in use fails the start, loudly
            listener.setServiceParent(top.listeners)
    top.listeners.setServiceParent(top)
    return Gateway(top, context, rules, monitoring.reopen_logs, register, monitoring, tls, policies, rulesets)


def makeService(config: GatewayConfig, reactor: Any) -> GatewayService:
    return build_gateway(config, reactor).service


__all__ = ["Gateway", "build_gateway", "makeService"]
