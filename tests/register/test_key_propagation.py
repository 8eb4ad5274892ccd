"""A key created or revoked with the CLI is live on every node within 2 s:
PostgreSQL NOTIFYs the change (migration 0002), each gateway process LISTENs
(register.listener) and reloads its key table at once (issue 11)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from gateway.interfaces import Authenticated, Credentials, Refused, Tenant
from register import ops
from register.listener import KeyChangeListener
from register.service import RegisterComponents, RegisterService
from tests.register.conftest import _pg_admin
from tests.register.helpers import ADMIN, T0, add_tenant, utc
from tests.register.test_service import FakeReactor, start, stop

PROPAGATION_LIMIT = 2.0  # seconds: the bound for a key change to reach every node
# The fallback timer must not be what makes these tests pass.
NO_TIMER = {"refresh_interval": 3600.0}

pytestmark = pytest.mark.parametrize(
    "db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)


def wait_for(condition: Callable[[], bool], reactor: FakeReactor, limit: float) -> float | None:
    """Run the reactor's calls from other threads until ``condition`` holds;
    the seconds it took, or None after ``limit``."""
    began = time.monotonic()
    while time.monotonic() - began < limit:
        reactor.drain()
        if condition():
            return time.monotonic() - began
        time.sleep(0.005)
    return None


def listener_of(parts: RegisterComponents) -> KeyChangeListener:
    service = parts.service
    assert isinstance(service, RegisterService) and service.listener is not None
    return service.listener


def revoke_all(engine: Engine, tenant: str) -> None:
    with Session(engine) as s, s.begin():  # as `icap-gateway key revoke` does
        for k in ops.list_keys(s, ADMIN, utc(T0), tenant):
            ops.revoke_key(s, ADMIN, k.id, utc(T0))


def test_revoked_and_created_keys_reach_a_running_node_within_2s(
        engine: Engine, db_url: str) -> None:
    tid, key = add_tenant(engine, "acme")
    parts, reactor = start(db_url, **NO_TIMER)
    authenticate = parts.authenticator.authenticate
    try:
        assert wait_for(lambda: listener_of(parts).listening, reactor, 10.0) is not None
        assert authenticate(Credentials(key, "192.0.2.1")) == Authenticated(Tenant(tid, "acme"))
        revoke_all(engine, "acme")
        took = wait_for(lambda: authenticate(Credentials(key, "192.0.2.1")) == Refused(403, "revoked-key"),
                        reactor, PROPAGATION_LIMIT)
        assert took is not None, "a revoked key still worked 2 s after the commit"
        with Session(engine) as s, s.begin():
            _k, new_key = ops.create_key(s, ADMIN, "acme", utc(T0))
        took = wait_for(lambda: isinstance(authenticate(Credentials(new_key, "192.0.2.1")), Authenticated),
                        reactor, PROPAGATION_LIMIT)
        assert took is not None, "a new key was still unknown 2 s after the commit"
        with Session(engine) as s, s.begin():
            ops.set_tenant_status(s, ADMIN, "acme", "disabled", utc(T0))
        took = wait_for(lambda: authenticate(Credentials(new_key, "192.0.2.1")) == Refused(403, "tenant-disabled"),
                        reactor, PROPAGATION_LIMIT)
        assert took is not None, "a disabled tenant's key still worked 2 s after the commit"
    finally:
        stop(parts, reactor)
        listener_of(parts).join(10)


def test_a_dropped_listen_connection_recovers(engine: Engine, db_url: str) -> None:
    tid, key = add_tenant(engine, "acme")
    parts, reactor = start(db_url, **NO_TIMER)
    listener = listener_of(parts)
    authenticate = parts.authenticator.authenticate
    try:
        assert wait_for(lambda: listener.listening, reactor, 10.0) is not None
        first_pid = listener.backend_pid
        with _pg_admin().connect() as c:  # the server ends the link, as a restart or failover would
            assert c.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first_pid}).scalar()
        # Back within the first back-off step (0.5 s) plus a connect.
        assert wait_for(lambda: listener.connects >= 2 and listener.listening, reactor, 10.0) is not None
        assert listener.backend_pid != first_pid
        assert authenticate(Credentials(key, "192.0.2.1")) == Authenticated(Tenant(tid, "acme"))
        revoke_all(engine, "acme")
        took = wait_for(lambda: authenticate(Credentials(key, "192.0.2.1")) == Refused(403, "revoked-key"),
                        reactor, PROPAGATION_LIMIT)
        assert took is not None, "after the link came back a revoked key still worked 2 s later"
    finally:
        stop(parts, reactor)
        listener.join(10)


def test_a_change_made_while_the_link_was_down_is_read_when_it_returns(
        engine: Engine, db_url: str) -> None:
    """NOTIFYs sent while nobody listens are lost: the listener reloads on
    every (re)connect."""
    _tid, key = add_tenant(engine, "acme")
    parts, reactor = start(db_url, **NO_TIMER)
    listener = listener_of(parts)
    authenticate = parts.authenticator.authenticate
    try:
        assert wait_for(lambda: listener.listening, reactor, 10.0) is not None
        listener.stop()
        listener.join(10)
        revoke_all(engine, "acme")  # nobody hears this one
        assert wait_for(lambda: False, reactor, 0.2) is None
        assert isinstance(authenticate(Credentials(key, "192.0.2.1")), Authenticated)
        listener._thread = None  # start a new thread, as after a lost link
        listener.start()
        took = wait_for(lambda: authenticate(Credentials(key, "192.0.2.1")) == Refused(403, "revoked-key"),
                        reactor, PROPAGATION_LIMIT)
        assert took is not None
    finally:
        stop(parts, reactor)
        listener.join(10)


def test_only_this_registers_changes_wake_the_node(db_url: str) -> None:
    """Registers in other schemas of the same database share the channel:
    their changes do not reload this node; a NOTIFY sent by hand does."""
    parts, reactor = start(db_url, **NO_TIMER)
    listener = listener_of(parts)
    try:
        assert wait_for(lambda: listener.listening, reactor, 10.0) is not None
        with _pg_admin().connect() as c:
            c.execute(text("SELECT pg_notify('icap_gateway_keys', 'some_other_schema')"))
            c.execute(text("SELECT pg_notify('icap_gateway_keys', '')"))
        assert wait_for(lambda: listener.notifications >= 1, reactor, PROPAGATION_LIMIT) is not None
        assert wait_for(lambda: listener.notifications > 1, reactor, 0.3) is None
    finally:
        stop(parts, reactor)
        listener.join(10)


def test_a_revocation_by_hand_in_psql_is_heard_too(engine: Engine, db_url: str) -> None:
    """The trigger, not the CLI, announces a change: an admin's UPDATE from a
    session with another search_path (schema-qualified) reaches the node."""
    _tid, key = add_tenant(engine, "acme")
    with engine.connect() as c:
        schema = c.execute(text("SELECT current_schema()")).scalar()
    parts, reactor = start(db_url, **NO_TIMER)
    listener = listener_of(parts)
    authenticate = parts.authenticator.authenticate
    try:
        assert wait_for(lambda: listener.listening, reactor, 10.0) is not None
        assert isinstance(authenticate(Credentials(key, "192.0.2.1")), Authenticated)
        with _pg_admin().connect() as c:  # autocommit, search_path "$user", public
            c.execute(text(f'UPDATE "{schema}".api_keys SET revoked_at = now()'))
        took = wait_for(lambda: authenticate(Credentials(key, "192.0.2.1")) == Refused(403, "revoked-key"),
                        reactor, PROPAGATION_LIMIT)
        assert took is not None
    finally:
        stop(parts, reactor)
        listener.join(10)
