"""Tenant authentication: the in-memory key table, refusals, rate limiting."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from twisted.internet.task import Clock

from gateway.interfaces import Authenticated, AuthFailure, Credentials, Refused, Tenant
from register import ops
from register.auth import (
    KeyAuthenticator,
    KeyEntry,
    KeyTable,
    OpenAuthenticator,
    credentials_from_headers,
    load_key_table,
)
from register.keys import bearer_key, claimed_tenant, generate_key, hash_key, valid_tenant_name
from register.settings import AuthSettings
from tests.register.helpers import ADMIN, T0, ListRecorder, add_tenant, utc

ACME = Tenant(7, "acme")


def make(table_keys: dict[str, KeyEntry], **settings: object) -> tuple[KeyAuthenticator, Clock, ListRecorder]:
    clock = Clock()
    clock.advance(T0)
    rec = ListRecorder()
    table = KeyTable({hash_key(k): v for k, v in table_keys.items()}, frozenset({"acme", "beta"}))
    a = KeyAuthenticator(dataclasses.replace(AuthSettings(), **settings), rec, clock, table)  # type: ignore[arg-type]
    return a, clock, rec


KEY = generate_key("acme")
GOOD = {KEY: KeyEntry(ACME, True, None, False)}


def creds(key: str | None, ip: str = "192.0.2.10", hint: str | None = None) -> Credentials:
    return Credentials(key=key, source_ip=ip, tenant_hint=hint)


def test_generated_keys_are_random_prefixed_and_parse() -> None:
    a, b = generate_key("acme"), generate_key("acme")
    assert a != b and a.startswith("icgw.acme.") and len(a.split(".", 2)[2]) >= 43
    assert claimed_tenant(a) == "acme"
    assert claimed_tenant("junk") is None
    assert bearer_key("Bearer  " + a) == a
    assert bearer_key("bearer " + a) == a
    assert bearer_key("Basic dXNlcjpwdw==") is None
    assert bearer_key(None) is None


def test_valid_key_authenticates_and_records_nothing() -> None:
    a, _clock, rec = make(GOOD)
    assert a.authenticate(creds(KEY)) == Authenticated(ACME)
    assert rec.events == []


def test_missing_key_is_401_and_recorded() -> None:
    a, _clock, rec = make(GOOD)
    assert a.authenticate(creds(None)) == Refused(401, "missing-key")
    assert rec.events == [AuthFailure(T0, "192.0.2.10", None, "missing-key")]


def test_unknown_key_records_only_a_known_tenant_never_the_key() -> None:
    a, _clock, rec = make(GOOD)
    forged = "icgw.acme." + "A" * 43
    assert a.authenticate(creds(forged)) == Refused(403, "unknown-key")
    # A claimed tenant that does not exist, or a key of another format, is not recorded.
    secretish = "icgw." + "s3cretpart" + ".x"
    assert a.authenticate(creds(secretish)) == Refused(403, "unknown-key")
    assert a.authenticate(creds("0123456789abcdef", hint="nosuch")) == Refused(403, "unknown-key")
    assert a.authenticate(creds("0123456789abcdef", hint="beta")) == Refused(403, "unknown-key")
    assert [e.tenant_presented for e in rec.events] == ["acme", None, None, "beta"]
    for event in rec.events:
        text = repr(event) + str(dataclasses.asdict(event))
        assert forged not in text and "s3cretpart" not in text and "0123456789abcdef" not in text


def test_revoked_expired_and_disabled() -> None:
    revoked, expiring, disabled = generate_key("acme"), generate_key("acme"), generate_key("acme")
    a, clock, rec = make({
        revoked: KeyEntry(ACME, True, None, True),
        expiring: KeyEntry(ACME, True, T0 + 60, False),
        disabled: KeyEntry(ACME, False, None, False),
    })
    assert a.authenticate(creds(revoked)) == Refused(403, "revoked-key")
    assert a.authenticate(creds(disabled)) == Refused(403, "tenant-disabled")
    assert a.authenticate(creds(expiring)) == Authenticated(ACME)
    clock.advance(60)  # expiry needs no table reload
    assert a.authenticate(creds(expiring)) == Refused(403, "expired-key")
    assert [e.reason for e in rec.events] == ["revoked-key", "tenant-disabled", "expired-key"]


def test_a_key_accepted_again_and_again_stops_at_once_when_revoked_or_rotated() -> None:
    # The authenticator keeps the last key's hash: the table is still asked
    # every time, so a new table (revocation, rotation) applies to the next request.
    a, _clock, rec = make(GOOD)
    assert a.authenticate(creds(KEY)) == a.authenticate(creds(KEY)) == Authenticated(ACME)
    a.replace_table(KeyTable({hash_key(KEY): KeyEntry(ACME, True, None, True)}, frozenset({"acme"})))
    assert a.authenticate(creds(KEY)) == Refused(403, "revoked-key")
    rotated = generate_key("acme")
    a.replace_table(KeyTable({hash_key(rotated): KeyEntry(ACME, True, None, False)}, frozenset({"acme"})))
    assert a.authenticate(creds(KEY)) == Refused(403, "unknown-key")
    assert a.authenticate(creds(rotated)) == Authenticated(ACME)
    assert a.authenticate(creds(KEY)) == Refused(403, "unknown-key")  # the other key's hash is not reused
    assert [e.reason for e in rec.events] == ["revoked-key", "unknown-key", "unknown-key"]


def test_repeated_failures_are_rate_limited_per_source_ip() -> None:
    a, clock, rec = make(GOOD, failure_burst=3, failure_interval=10.0)
    for _ in range(3):
        assert a.authenticate(creds("bad")).reason == "unknown-key"  # type: ignore[union-attr]
    # Limited now: even the right key is refused, so guessing learns nothing.
    assert a.authenticate(creds(KEY)) == Refused(403, "rate-limited")
    for _ in range(50):
        assert a.authenticate(creds("bad")) == Refused(403, "rate-limited")
    # Another source is not affected.
    assert a.authenticate(creds(KEY, ip="192.0.2.99")) == Authenticated(ACME)
    # One failure is earned back per interval.
    clock.advance(10)
    assert a.authenticate(creds(KEY)) == Authenticated(ACME)
    assert a.authenticate(creds("bad")).reason == "unknown-key"  # type: ignore[union-attr]
    assert a.authenticate(creds("bad")).reason == "rate-limited"  # type: ignore[union-attr]
    # Only the first refusal of each limited stretch is recorded, the rest counted.
    reasons = [e.reason for e in rec.events]
    assert reasons == ["unknown-key"] * 3 + ["rate-limited", "unknown-key", "rate-limited"]
    assert a.unrecorded_refusals == 50
    clock.advance(1000)
    assert a.limiter.limited("192.0.2.10") is False
    assert a.limiter.tracked() == 0  # full buckets are forgotten


def test_rate_limit_can_be_disabled() -> None:
    a, _clock, rec = make(GOOD, failure_burst=0)
    for _ in range(100):
        a.authenticate(creds("bad"))
    assert a.authenticate(creds(KEY)) == Authenticated(ACME)
    assert len(rec.events) == 100


def test_limiter_memory_is_bounded() -> None:
    a, _clock, _rec = make(GOOD, failure_burst=5)
    a.limiter.max_tracked = 100
    for i in range(1000):
        a.authenticate(creds("bad", ip=f"10.0.{i // 256}.{i % 256}"))
    assert a.limiter.tracked() <= 100


def test_open_authenticator_is_tenant_zero() -> None:
    assert OpenAuthenticator().authenticate(creds(None)) == Authenticated(Tenant(0, ""))


def test_credentials_from_headers() -> None:
    settings = AuthSettings(tenant_header="X-Tenant")
    c = credentials_from_headers(
        {"authorization": f"Bearer {KEY}", "x-tenant": " acme "}, "192.0.2.1", settings)
    assert c == Credentials(KEY, "192.0.2.1", "acme")
    assert KEY not in repr(c)
    assert credentials_from_headers({}, "192.0.2.1", AuthSettings()).key is None


def test_key_table_from_database(engine: Engine) -> None:
    acme_id, acme_key = add_tenant(engine, "acme")
    _beta_id, beta_key = add_tenant(engine, "beta")
    with Session(engine) as s, s.begin():
        extra, extra_key = ops.create_key(s, ADMIN, "acme", utc(T0), expires=utc(T0 + 3600))
        ops.revoke_key(s, ADMIN, extra.id, utc(T0))
        ops.set_tenant_status(s, ADMIN, "beta", "disabled", utc(T0))
    table = load_key_table(engine)
    assert table.tenant_names == {"acme", "beta"}
    assert table.by_hash[hash_key(acme_key)] == KeyEntry(Tenant(acme_id, "acme"), True, None, False)
    assert table.by_hash[hash_key(beta_key)].tenant_active is False
    assert table.by_hash[hash_key(extra_key)] == KeyEntry(Tenant(acme_id, "acme"), True, T0 + 3600, True)
    clock = Clock()
    clock.advance(T0)
    a = KeyAuthenticator(AuthSettings(), ListRecorder(), clock, table)
    assert a.authenticate(creds(acme_key)) == Authenticated(Tenant(acme_id, "acme"))
    assert a.authenticate(creds(beta_key)) == Refused(403, "tenant-disabled")
    assert a.authenticate(creds(extra_key)) == Refused(403, "revoked-key")
    # Keys are stored as hashes only.
    with engine.connect() as c:
        dump = str(c.exec_driver_sql("SELECT * FROM api_keys").fetchall())
    assert acme_key not in dump and acme_key.split(".")[2] not in dump


@pytest.mark.parametrize("header", ["authorization", "proxy-authorization"])
def test_no_credential_header_reaches_a_failure_record(header: str) -> None:
    a, _clock, rec = make(GOOD, tenant_header="X-Tenant")
    c = credentials_from_headers({header: "Bearer icgw.zzz.topsecret"}, "192.0.2.1", a.settings)
    a.authenticate(c)
    assert "topsecret" not in repr(rec.events)


def test_hostile_headers_never_reach_a_failure_record() -> None:
    # What reaches the register for a refusal: the socket's peer address
    # (canonical), a tenant name the register knows, a reason from a fixed set.
    a, _clock, rec = make(GOOD, tenant_header="X-Tenant")
    hostile = {
        "authorization": "Bearer icgw.acme\r\nX-Evil: 1." + "A" * 3000,
        "x-tenant": "acme\r\nX-Evil: 1",
        "x-client-ip": "fe80::1%\rX-Evil: 1",
    }
    a.authenticate(credentials_from_headers(hostile, "::ffff:192.0.2.1", a.settings))
    [event] = rec.events
    assert event == AuthFailure(T0, "192.0.2.1", None, "unknown-key")


def test_rate_limit_counts_a_v4_mapped_peer_as_its_ipv4_address() -> None:
    a, _clock, _rec = make(GOOD, failure_burst=2)
    for peer in ("192.0.2.1", "::ffff:192.0.2.1"):
        a.authenticate(credentials_from_headers({}, peer, a.settings))
    assert a.authenticate(credentials_from_headers({}, "::ffff:192.0.2.1", a.settings)) == Refused(403, "rate-limited")


@pytest.mark.parametrize("name", ["acme\n", "acme\r", "Acme", "-acme", "", "a" * 64, "ac me"])
def test_tenant_names_are_checked_whole(name: str) -> None:
    # "^...$" with re.match let a trailing newline through ("acme\n").
    assert not valid_tenant_name(name)
    assert claimed_tenant(f"icgw.{name}.secret") is None


def test_good_tenant_names() -> None:
    assert valid_tenant_name("acme") and valid_tenant_name("a" * 63) and valid_tenant_name("acme-oy_2")
