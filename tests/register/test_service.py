"""build_register: the wiring makeService uses, driven by an injected clock."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from twisted.internet import defer
from twisted.internet.task import Clock

from gateway.config import GatewayConfig, with_overrides
from gateway.interfaces import Authenticated, AuthFailure, Credentials, Refused, Tenant, UserSeen
from register import ops
from register.auth import KeyTable
from register.db import SchemaError, create_register_engine
from register.models import AuthFailureRecord, LoginRecord
from register.service import RegisterComponents, build_register
from tests.register.helpers import ADMIN, T0, add_tenant, utc


class FakeReactor(Clock):
    """A Clock that also takes calls from other threads, run by ``drain``."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.advance(T0)

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.from_threads.append((f, args))

    def drain(self) -> None:
        while self.from_threads:
            f, args = self.from_threads.pop(0)
            f(*args)


def sync_thread(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


def config_for(url: str, **auth: Any) -> GatewayConfig:
    config = with_overrides(GatewayConfig(), register__database=url, register__purge_interval=3600.0,
                            register__failure_retention=86400.0)
    return dataclasses.replace(config, auth=dataclasses.replace(config.auth, **auth)) if auth else config


def start(url: str, **auth: Any) -> tuple[RegisterComponents, FakeReactor]:
    reactor = FakeReactor()
    parts = build_register(config_for(url, **auth), reactor, defer_to_thread=sync_thread)
    parts.service.startService()
    return parts, reactor


def stop(parts: RegisterComponents, reactor: FakeReactor) -> None:
    d = parts.service.stopService()
    parts.recorder.join(10)  # type: ignore[attr-defined]
    reactor.drain()
    assert d.called


def test_keys_revoked_or_created_take_effect_after_refresh(engine: Engine, db_url: str) -> None:
    tid, key = add_tenant(engine, "acme")
    parts, reactor = start(db_url, refresh_interval=10.0)
    try:
        assert parts.authenticator.authenticate(Credentials(key, "192.0.2.1")) == Authenticated(Tenant(tid, "acme"))
        with Session(engine) as s, s.begin():
            k = ops.list_keys(s, ADMIN, utc(T0), "acme")[0]
            ops.revoke_key(s, ADMIN, k.id, utc(T0))
            _, new_key = ops.create_key(s, ADMIN, "acme", utc(T0))
        assert parts.authenticator.authenticate(Credentials(new_key, "192.0.2.1")).reason == "unknown-key"  # type: ignore[union-attr]
        reactor.advance(10)
        assert parts.authenticator.authenticate(Credentials(key, "192.0.2.1")) == Refused(403, "revoked-key")
        assert parts.authenticator.authenticate(Credentials(new_key, "192.0.2.1")) == Authenticated(Tenant(tid, "acme"))
    finally:
        stop(parts, reactor)


def test_refresh_failure_keeps_the_last_table(engine: Engine, db_url: str) -> None:
    _tid, key = add_tenant(engine, "acme")
    parts, reactor = start(db_url)
    try:
        service: Any = parts.service
        good = service.engine
        service.engine = create_register_engine("postgresql+psycopg://postgres@127.0.0.1:1/down")
        reactor.advance(10)
        assert service.keys_ok is False
        assert isinstance(parts.authenticator.authenticate(Credentials(key, "192.0.2.1")), Authenticated)
        service.engine = good
        reactor.advance(10)
        assert service.keys_ok is True
    finally:
        stop(parts, reactor)


def test_records_flow_to_the_database_and_stop_flushes(engine: Engine, db_url: str) -> None:
    tid, _key = add_tenant(engine, "acme")
    parts, reactor = start(db_url)
    # A refused request lands in the register through the recorder.
    assert parts.authenticator.authenticate(Credentials("icgw.acme.wrong", "192.0.2.9")).status == 403  # type: ignore[union-attr]
    username, ip, _bad = parts.identify({"x-authenticated-user": "Ym9i", "x-client-ip": "10.0.0.5"}, "192.0.2.1")
    assert (username, ip) == ("bob", "10.0.0.5")
    parts.recorder.record(UserSeen(tid, username, ip, T0))
    assert parts.healthy() and parts.dropped() == 0
    stop(parts, reactor)
    assert parts.queue_depth() == 0
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(LoginRecord)) == 1
        failure = s.scalars(select(AuthFailureRecord)).one()
    assert (failure.source_ip, failure.tenant_presented, failure.reason) == ("192.0.2.9", "acme", "unknown-key")
    assert parts.credentials is not None
    assert parts.credentials({"authorization": "Bearer x"}, "192.0.2.1").key == "x"


def test_purge_runs_on_the_timer(engine: Engine, db_url: str) -> None:
    add_tenant(engine, "acme")
    parts, reactor = start(db_url)
    try:
        parts.recorder.record(AuthFailure(T0 - 2 * 86400, "192.0.2.9", None, "missing-key"))
        parts.recorder.flush_all()  # type: ignore[attr-defined]
        reactor.advance(3600)
        assert parts.service.last_purge["auth_failures"] == 1  # type: ignore[attr-defined]
    finally:
        stop(parts, reactor)


def test_auth_not_required_is_tenant_zero(db_url: str) -> None:
    parts, reactor = start(db_url, required=False)
    try:
        assert parts.authenticator.authenticate(Credentials(None, "192.0.2.1")) == Authenticated(Tenant(0, ""))
        parts.recorder.record(UserSeen(0, "bob", "10.0.0.5", T0))  # no tenant row: not recorded
        assert parts.queue_depth() == 0
    finally:
        stop(parts, reactor)


def test_refuses_to_start_on_an_old_schema(fresh_url: str) -> None:
    config = with_overrides(GatewayConfig(), register__database=fresh_url, register__auto_upgrade=False)
    with pytest.raises(SchemaError, match="register upgrade"):
        build_register(config, FakeReactor(), defer_to_thread=sync_thread)


def test_a_load_finishing_after_a_later_one_is_not_applied(db_url: str) -> None:
    """A timer load that read the table before a revocation, and finishes
    after the reload the revocation's NOTIFY caused, must not undo it."""
    pending: list[defer.Deferred[Any]] = []

    def held(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        pending.append(d)
        return d

    reactor = FakeReactor()
    parts = build_register(config_for(db_url, refresh_interval=3600.0), reactor, defer_to_thread=held)
    service: Any = parts.service
    service.running = True  # the timers and threads are not wanted here
    old, new = KeyTable(tenant_names=frozenset({"old"})), KeyTable(tenant_names=frozenset({"new"}))
    service.refresh_keys()  # the timer's load, started first
    service.keys_changed()  # the change's load
    service.keys_changed()  # more changes meanwhile: one more load, after this one
    service.keys_changed()
    assert len(pending) == 2
    pending[1].callback(new)
    assert len(pending) == 3  # the one more load has started
    pending[0].callback(old)
    assert parts.authenticator.table is new  # type: ignore[attr-defined]
    pending[2].callback(new)
    assert len(pending) == 3
    service.engine.dispose()


def test_only_postgresql_registers_are_listened_to(db_url: str) -> None:
    parts, reactor = start(db_url)
    try:
        listener = parts.service.listener  # type: ignore[attr-defined]
        assert (listener is not None) == db_url.startswith("postgresql")
    finally:
        stop(parts, reactor)
        if listener is not None:
            listener.join(10)
