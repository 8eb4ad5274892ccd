"""Tenant authentication at the ICAP layer.

``KeyAuthenticator.authenticate`` runs on the reactor thread for every
REQMOD/RESPMOD, so it is a dictionary lookup of the key's SHA-256 in a table
held in memory.  The table is loaded from the database in a thread
(``load_key_table``) and swapped in whole by ``replace_table`` on the reactor,
so a new or revoked key takes effect within ``[auth] refresh_interval``;
expiry is checked against the clock on every request.

A connection whose TLS client certificate (its SHA-256, from gateway.tls)
is bound to a tenant is that tenant without a key; a key it also sends must
be one of that tenant's.  A certificate not bound, or revoked, is refused 403
whatever key comes with it: a proxy that presents a certificate is judged by
it.  The failure record holds the fingerprint, never the certificate.

Failures go to the Recorder (the key is never recorded: only a tenant name,
and only one the register knows) and count towards a per-source-IP token
bucket; while a source is limited every request from it is refused with
403 "rate-limited" without looking at its key.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import select

from gateway.interfaces import (
    Authenticated,
    AuthFailure,
    Credentials,
    Recorder,
    Refused,
    Tenant,
)
from register.keys import bearer_key, claimed_tenant, hash_key
from register.models import ApiKey, ClientCertificate
from register.models import Tenant as TenantRow
from register.users import canonical_ip

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from register.settings import AuthSettings

OPEN_TENANT = Tenant(0, "")  # who every request is when [auth] required = false


class Clock(Protocol):
    def seconds(self) -> float: ...


@dataclass(frozen=True, slots=True)
class KeyEntry:
    tenant: Tenant
    tenant_active: bool
    expires_at: float | None  # POSIX seconds
    revoked: bool


@dataclass(frozen=True)
class KeyTable:
    by_hash: Mapping[str, KeyEntry] = field(default_factory=dict)
    tenant_names: frozenset[str] = frozenset()
    # client certificate SHA-256 (lower-case hex) -> its tenant; expires_at is
    # the certificate's notAfter (the handshake checks it too)
    by_certificate: Mapping[str, KeyEntry] = field(default_factory=dict)


def load_key_table(engine: Engine) -> KeyTable:
    """Read every key of every tenant not erased.  Blocking: call in a thread."""
    stmt = (
        select(ApiKey.key_hash, ApiKey.expires_at, ApiKey.revoked_at,
               TenantRow.id, TenantRow.name, TenantRow.status)
        .join(TenantRow, ApiKey.tenant_id == TenantRow.id)
        .where(TenantRow.status != "erased")
    )
    by_hash: dict[str, KeyEntry] = {}
    with engine.connect() as conn:
        for key_hash, expires_at, revoked_at, tid, tname, status in conn.execute(stmt):
            by_hash[key_hash] = KeyEntry(
                tenant=Tenant(tid, tname),
                tenant_active=status == "active",
                expires_at=_posix(expires_at),
                revoked=revoked_at is not None,
            )
        names = frozenset(conn.scalars(select(TenantRow.name).where(TenantRow.status != "erased")))
        by_certificate: dict[str, KeyEntry] = {}
        certs = (
            select(ClientCertificate.sha256, ClientCertificate.not_after, ClientCertificate.revoked_at,
                   TenantRow.id, TenantRow.name, TenantRow.status)
            .join(TenantRow, ClientCertificate.tenant_id == TenantRow.id)
            .where(TenantRow.status != "erased")
        )
        for sha256, not_after, revoked_at, tid, tname, status in conn.execute(certs):
            by_certificate[sha256] = KeyEntry(tenant=Tenant(tid, tname), tenant_active=status == "active",
                                              expires_at=_posix(not_after), revoked=revoked_at is not None)
    return KeyTable(by_hash, names, by_certificate)


def _posix(value: dt.datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC when read through Core
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


class FailureLimiter:
    """A token bucket per source IP: ``burst`` failures at once, then one more
    every ``interval`` seconds.  Sources whose bucket is full again are
    forgotten, and at most ``max_tracked`` sources are remembered."""

    def __init__(self, burst: int, interval: float, clock: Clock, max_tracked: int = 100_000) -> None:
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.max_tracked = max_tracked
        # ip -> [tokens, last update, refusal recorded while limited]
        self._buckets: dict[str, list[float]] = {}

    def _refill(self, ip: str, now: float) -> list[float] | None:
        b = self._buckets.get(ip)
        if b is None:
            return None
        b[0] = min(self.burst, b[0] + (now - b[1]) / self.interval)
        b[1] = now
        if b[0] >= self.burst:
            del self._buckets[ip]
            return None
        return b

    def limited(self, ip: str) -> bool:
        if self.burst <= 0:
            return False
        b = self._refill(ip, self.clock.seconds())
        if b is None:
            return False
        if b[0] >= 1.0:
            b[2] = 0.0  # out of the limited stretch: the next one is recorded again
            return False
        return True

    def failed(self, ip: str) -> None:
        if self.burst <= 0:
            return
        now = self.clock.seconds()
        b = self._refill(ip, now)
        if b is None:
            if len(self._buckets) >= self.max_tracked:
                self._prune(now)
            b = self._buckets[ip] = [float(self.burst), now, 0.0]
        b[0] -= 1.0

    def first_refusal(self, ip: str) -> bool:
        """True once per limited stretch: whether to record this refusal."""
        b = self._buckets.get(ip)
        if b is None or b[2]:
            return False
        b[2] = 1.0
        return True

    def _prune(self, now: float) -> None:
        for ip in list(self._buckets):
            self._refill(ip, now)
        while len(self._buckets) >= self.max_tracked:  # still full: forget the oldest
            del self._buckets[next(iter(self._buckets))]

    def tracked(self) -> int:
        return len(self._buckets)


class KeyAuthenticator:
    """``gateway.interfaces.Authenticator`` over the in-memory key table."""

    def __init__(
        self, settings: AuthSettings, recorder: Recorder, clock: Clock, table: KeyTable | None = None
    ) -> None:
        self.settings = settings
        self.recorder = recorder
        self.clock = clock
        self.table = table or KeyTable()
        self.limiter = FailureLimiter(settings.failure_burst, settings.failure_interval, clock)
        self.unrecorded_refusals = 0  # rate-limited refusals after the first of a stretch
        self._last_key = ""  # the last key checked, and its hash (see _check_key)
        self._last_hash = hash_key("")

    def replace_table(self, table: KeyTable) -> None:
        self.table = table

    def _presented(self, credentials: Credentials) -> str | None:
        # A bound certificate names its tenant (even revoked: the tenant's
        # export shows the refusal).
        cert = self.table.by_certificate.get(credentials.client_cert_sha256 or "")
        if cert is not None:
            return cert.tenant.name
        # Only a name the register knows is recorded: a hint that is junk, or
        # a key of some other format, could be (part of) a secret.
        names = self.table.tenant_names
        for hint in (credentials.tenant_hint, credentials.key and claimed_tenant(credentials.key)):
            if hint and hint in names:
                return hint
        return None

    def _check(self, credentials: Credentials, now: float) -> Authenticated | Refused:
        if credentials.client_cert_sha256 is not None:
            return self._check_certificate(credentials, now)
        if not credentials.key:
            return Refused(401, "missing-key")
        return self._check_key(credentials.key, now)

    def _check_key(self, key: str, now: float) -> Authenticated | Refused:
        # A proxy sends the same key on every request: its hash is kept (one
        # key, so nothing grows).  The table is looked up every time, so a
        # revoked, expired or rotated key stops working as fast as without it.
        if key != self._last_key:
            self._last_key, self._last_hash = key, hash_key(key)
        entry = self.table.by_hash.get(self._last_hash)
        if entry is None:
            return Refused(403, "unknown-key")
        return _valid(entry, now, "key")

    def _check_certificate(self, credentials: Credentials, now: float) -> Authenticated | Refused:
        entry = self.table.by_certificate.get(credentials.client_cert_sha256 or "")
        if entry is None:
            return Refused(403, "unknown-certificate")
        result = _valid(entry, now, "certificate")
        if isinstance(result, Refused) or not credentials.key:
            return result
        by_key = self._check_key(credentials.key, now)
        if isinstance(by_key, Refused):
            return by_key
        if by_key.tenant.id != entry.tenant.id:
            return Refused(403, "key-not-certificate-tenant")
        return result

    def authenticate(self, credentials: Credentials) -> Authenticated | Refused:
        ip = credentials.source_ip
        now = self.clock.seconds()
        if self.limiter.limited(ip):
            if self.limiter.first_refusal(ip):
                self._record(credentials, now, "rate-limited")
            else:
                self.unrecorded_refusals += 1
            return Refused(403, "rate-limited")
        result = self._check(credentials, now)
        if isinstance(result, Refused):
            self.limiter.failed(ip)
            self._record(credentials, now, result.reason)
        return result

    def _record(self, credentials: Credentials, now: float, reason: str) -> None:
        self.recorder.record(AuthFailure(
            at=now, source_ip=credentials.source_ip,
            tenant_presented=self._presented(credentials), reason=reason,
            client_cert_sha256=credentials.client_cert_sha256))


def _valid(entry: KeyEntry, now: float, what: str) -> Authenticated | Refused:
    """A key's or certificate's entry: its tenant, unless revoked, expired or disabled."""
    if entry.revoked:
        return Refused(403, f"revoked-{what}")
    if entry.expires_at is not None and now >= entry.expires_at:
        return Refused(403, f"expired-{what}")
    if not entry.tenant_active:
        return Refused(403, "tenant-disabled")
    return Authenticated(entry.tenant)


class OpenAuthenticator:
    """``[auth] required = false``: everyone is the built-in tenant 0, no keys."""

    def authenticate(self, credentials: Credentials) -> Authenticated | Refused:
        return Authenticated(OPEN_TENANT)


def credentials_from_headers(
    headers: Mapping[str, str], peer_ip: str, settings: AuthSettings
) -> Credentials:
    """Credentials of an ICAP request (header names lower-cased)."""
    hint = headers.get(settings.tenant_header.lower()) if settings.tenant_header else None
    return Credentials(
        key=bearer_key(headers.get("authorization")),
        # Canonical, as the register stores addresses: a dual-stack listener
        # sees ::ffff:a.b.c.d, which must be the same source as a.b.c.d to
        # the rate limiter and in the register.
        source_ip=canonical_ip(peer_ip) or peer_ip,
        tenant_hint=hint.strip() if hint else None,
    )
