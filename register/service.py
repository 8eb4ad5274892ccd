"""What ``gateway.service.makeService`` takes from the register.

``build_register(config, reactor)`` opens the register (checking or upgrading
its schema: a gateway refuses to start on a schema it cannot use), loads the
key table once, synchronously, so the first request already authenticates,
and returns the pieces the protocol and monitoring need plus one Twisted
service that runs the background parts:

- the key-table refresh every ``[auth] refresh_interval`` (in a thread),
- on PostgreSQL, a reload as soon as keys or tenants change: the
  ``register.listener`` thread hears the database's NOTIFY (the timer stays
  as the fallback while that link is down),
- the batched writer thread of the Recorder,
- the retention purge every ``[register] purge_interval`` (in a thread).

``stopService`` stops the timers and returns a Deferred that fires when the
writer has flushed its queue (or given up after its shutdown timeout).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.interfaces import Authenticator, Credentials, Identity, Recorder
from register import auth, users
from register.db import database_url, open_register, redacted
from register.gdpr import purge_engine
from register.recorder import BatchRecorder

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from gateway.config import GatewayConfig
    from register.listener import KeyChangeListener

log = Logger()

DeferToThread = Callable[..., "defer.Deferred[Any]"]


@dataclass
class RegisterComponents:
    authenticator: Authenticator
    recorder: Recorder
    # (lower-cased ICAP headers, peer ip) -> username, canonical client ip, refused headers
    identify: Callable[[Mapping[str, str], str], Identity]
    service: Service
    queue_depth: Callable[[], int]
    write_errors: Callable[[], int]
    dropped: Callable[[], int]
    healthy: Callable[[], bool]
    # (lower-cased ICAP headers, peer ip) -> Credentials: the Bearer key and the
    # tenant hint of [auth] tenant_header, so the protocol need not parse them.
    credentials: Callable[[Mapping[str, str], str], Credentials] | None = None
    engine: Engine | None = None


class RegisterService(Service):
    name = "register"

    def __init__(
        self,
        engine: Engine,
        config: GatewayConfig,
        recorder: BatchRecorder,
        authenticator: auth.KeyAuthenticator | None,
        clock: Any,
        defer_to_thread: DeferToThread,
    ) -> None:
        self.engine = engine
        self.config = config
        self.recorder = recorder
        self.authenticator = authenticator
        self.clock = clock
        self.defer_to_thread = defer_to_thread
        self.keys_ok = True
        self.last_purge: dict[str, int] | None = None
        self._loops: list[LoopingCall] = []
        self.listener: KeyChangeListener | None = None
        # Key-table loads are numbered as they start; a load that finishes
        # after a later one is not applied, so a slow timer load that read
        # the table before a revocation cannot undo the reload it caused.
        self._loads_started = 0
        self._load_applied = 0
        self._change_reload: defer.Deferred[Any] | None = None
        self._change_again = False

    def startService(self) -> None:
        super().startService()
        self.recorder.start()
        if self.authenticator is not None:
            self._every(self.config.auth.refresh_interval, self.refresh_keys)
            if self.engine.dialect.name == "postgresql":
                # Imported here: psycopg is about 8 MiB of every worker's
                # memory, and a SQLite register never needs it.
                from register.listener import KeyChangeListener

                self.listener = KeyChangeListener(self.engine, self._heard_change)
                self.listener.start()
        if self.config.register.purge_interval > 0:
            self._every(self.config.register.purge_interval, self.purge)

    def _every(self, interval: float, f: Callable[[], defer.Deferred[Any]]) -> None:
        loop = LoopingCall(f)
        loop.clock = self.clock
        # A tick returns its Deferred: the next waits for it, so slow DB calls never pile up.
        loop.start(interval, now=False)
        self._loops.append(loop)

    def _heard_change(self) -> None:
        """In the listener's thread: the reload runs on the reactor."""
        self.clock.callFromThread(self.keys_changed)

    def keys_changed(self) -> None:
        """Reload the key table now.  A burst of changes costs at most one
        reload running and one more after it (which reads them all)."""
        if not self.running:
            return  # heard after stopService: nobody authenticates any more
        if self._change_reload is not None:
            self._change_again = True
            return
        self._change_again = False

        def done(result: Any) -> Any:
            self._change_reload = None
            if self._change_again and self.running:
                self.keys_changed()
            return result

        d = self.refresh_keys()
        self._change_reload = d
        d.addBoth(done)

    def refresh_keys(self) -> defer.Deferred[Any]:
        assert self.authenticator is not None
        authenticator = self.authenticator
        self._loads_started += 1
        load = self._loads_started

        def loaded(table: auth.KeyTable) -> None:
            if load < self._load_applied:
                return  # a later load (started after a change) is already in use
            self._load_applied = load
            authenticator.replace_table(table)
            if not self.keys_ok:
                log.info("register: key table reloaded again ({n} keys)", n=len(table.by_hash))
            self.keys_ok = True

        def failed(f: Any) -> None:
            if self.keys_ok:  # log the change, not every tick of an outage
                log.error("register: cannot reload the key table, keeping the last one: {err}",
                          err=f.getErrorMessage().splitlines()[0])
            self.keys_ok = False

        d = self.defer_to_thread(auth.load_key_table, self.engine)
        d.addCallbacks(loaded, failed)
        return d

    def purge(self) -> defer.Deferred[Any]:
        now = dt.datetime.fromtimestamp(self.clock.seconds(), dt.UTC)

        def done(counts: dict[str, int]) -> None:
            self.last_purge = counts
            if any(counts.values()):
                log.info("register: retention purge deleted {counts}", counts=counts)

        def failed(f: Any) -> None:
            log.error("register: retention purge failed: {err}", err=f.getErrorMessage())

        d = self.defer_to_thread(purge_engine, self.engine, self.config.register, now)
        d.addCallbacks(done, failed)
        return d

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self.listener is not None:
            self.listener.stop()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        d: defer.Deferred[None] = defer.Deferred()
        reactor = self.clock

        def stopped() -> None:
            call = getattr(reactor, "callFromThread", None)
            if call is not None:
                call(d.callback, None)
            else:  # a test Clock: the writer was never threaded
                d.callback(None)

        self.recorder.stop(stopped)
        d.addBoth(self._dispose)
        return d

    def _dispose(self, result: Any) -> Any:
        self.engine.dispose()
        return result


def build_register(
    config: GatewayConfig,
    reactor: Any,
    *,
    defer_to_thread: DeferToThread | None = None,
    engine: Engine | None = None,
) -> RegisterComponents:
    """Open the register and wire its parts.  Raises ``register.db.RegisterError``
    (an admin-readable message) when the database or its schema is unusable."""
    if engine is None:
        engine = open_register(database_url(config), upgrade=config.register.auto_upgrade)
    if defer_to_thread is None:
        def defer_to_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    rs = config.register
    recorder = BatchRecorder(
        engine, idle_gap=rs.login_idle_gap, batch_size=rs.batch_size,
        max_queue=rs.max_queue, flush_interval=rs.flush_interval)
    key_auth: auth.KeyAuthenticator | None = None
    authenticator: Authenticator
    if config.auth.required:
        key_auth = auth.KeyAuthenticator(config.auth, recorder, reactor, auth.load_key_table(engine))
        authenticator = key_auth
    else:
        authenticator = auth.OpenAuthenticator()
    service = RegisterService(engine, config, recorder, key_auth, reactor, defer_to_thread)
    log.info("register: {url} ({keys} keys loaded)", url=redacted(str(engine.url)),
             keys=len(key_auth.table.by_hash) if key_auth else "auth not required,")
    return RegisterComponents(
        authenticator=authenticator,
        recorder=recorder,
        identify=functools.partial(users.identify, settings=config.auth),
        service=service,
        queue_depth=recorder.queue_depth,
        write_errors=lambda: recorder.write_errors,
        dropped=lambda: recorder.dropped,
        healthy=recorder.healthy,
        credentials=functools.partial(auth.credentials_from_headers, settings=config.auth),
        engine=engine,
    )

