"""The data subject's rights and the retention periods (notice section 7).

- ``export``: everything held about a tenant or one of its users (GDPR Art. 15).
- ``erase``: deletes the personal data, keeps only what law or contract
  requires, and says what was kept, why and until when.
- ``purge``: deletes what has outlived its retention period; the CLI runs it
  by hand and a running gateway on a timer (``purge_engine``).

Audit records about a user survive the user's erasure for accountability
(GDPR Art. 5(2)), but the username in them is replaced by a pseudonym.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from sqlalchemy import Engine, delete, exists, func, select, update
from sqlalchemy.orm import Session

from register.access import SYSTEM_RETENTION, Actor, Conflict, NotFound, audit
from register.models import (
    ApiKey,
    AuditRecord,
    AuthFailureRecord,
    ClientCertificate,
    LoginRecord,
    Order,
    Tenant,
    User,
)
from register.ops import billing_dict, certificate_dict, find_tenant, key_dict, order_dict, tenant_dict
from register.settings import RegisterSettings

ACCOUNTING_REASON = (
    "accounting law: bookkeeping records (invoices, orders, the buyer's name and address) "
    "are kept six years after the end of the financial year (Finnish Accounting Act 2:10)")


def pseudonym(tenant: str, username: str) -> str:
    digest = hashlib.sha256(f"{tenant}\x00{username}".encode()).hexdigest()[:16]
    return f"sha256:{digest}"


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _login_dict(r: LoginRecord) -> dict[str, Any]:
    return {"client_ip": r.client_ip, "login_at": _iso(r.login_at), "last_seen": _iso(r.last_seen)}


def _access_log(s: Session, tenant: str, user: str | None) -> list[dict[str, Any]]:
    stmt = select(AuditRecord).where(AuditRecord.tenant == tenant).order_by(AuditRecord.id)
    if user is not None:
        stmt = stmt.where(AuditRecord.subject_user == user)
    return [{"at": _iso(a.at), "operator": a.operator, "action": a.action,
             "user": a.subject_user} for a in s.scalars(stmt)]


def _find_user(s: Session, t: Tenant, username: str) -> User:
    u = s.scalar(select(User).where(User.tenant_id == t.id, User.username == username))
    if u is None:
        raise NotFound(f"no user {username!r} in tenant {t.name!r}")
    return u


def export(s: Session, actor: Actor, tenant: str, now: dt.datetime, user: str | None = None) -> dict[str, Any]:
    """Everything the register holds about ``tenant`` (or one of its users)."""
    t = find_tenant(s, tenant, erased=True)
    out: dict[str, Any] = {"generated_at": now.isoformat()}
    if user is not None:
        u = _find_user(s, t, user)
        out.update({
            "tenant": t.name,
            "user": {"username": u.username, "logins": [_login_dict(r) for r in u.logins]},
            "access_log": _access_log(s, t.name, u.username),
        })
    else:
        failures = s.scalars(select(AuthFailureRecord).where(
            AuthFailureRecord.tenant_presented == t.name).order_by(AuthFailureRecord.at))
        out.update({
            "tenant": tenant_dict(t),
            "billing": billing_dict(t.billing),
            "orders": [order_dict(o) for o in t.orders],
            "keys": [key_dict(k, now) for k in t.keys],
            "client_certificates": [certificate_dict(c, now) for c in t.certificates],
            "users": [{"username": u.username, "logins": [_login_dict(r) for r in u.logins]}
                      for u in sorted(t.users, key=lambda u: u.username)],
            "auth_failures": [{"at": _iso(f.at), "source_ip": f.source_ip, "reason": f.reason,
                               "client_cert_sha256": f.client_cert_sha256} for f in failures],
            "access_log": _access_log(s, t.name, None),
        })
    audit(s, actor, "export", now, tenant=t.name, user=user)
    return out


def erase(
    s: Session, actor: Actor, tenant: str, now: dt.datetime, settings: RegisterSettings,
    user: str | None = None,
) -> dict[str, Any]:
    """Erase a user, or a (disabled) tenant; returns what was deleted and what kept."""
    t = find_tenant(s, tenant, erased=True)
    audit_until = now + dt.timedelta(seconds=settings.audit_retention)
    audit_kept = {
        "data": "audit records of operators' access to this data (the username pseudonymised)",
        "why": "accountability of the controller (GDPR Art. 5(2), notice section 9)",
        "until": audit_until.isoformat(),
    }
    if user is not None:
        u = _find_user(s, t, user)
        logins = len(u.logins)
        s.delete(u)
        alias = pseudonym(t.name, user)
        s.execute(update(AuditRecord).where(
            AuditRecord.tenant == t.name, AuditRecord.subject_user == user).values(subject_user=alias))
        audit(s, actor, "erase", now, tenant=t.name, user=alias, login_records=logins)
        return {
            "tenant": t.name, "user": user,
            "deleted": {"users": 1, "login_records": logins},
            "kept": [audit_kept],
            "note": "the user is recorded again if they keep using the service through "
                    "the tenant's proxy (providing the service, notice section 7)",
        }
    if t.status == "active":
        raise Conflict(
            f"tenant {t.name!r} is active: erasing it ends the service; run "
            f"`icap-gateway tenant disable {t.name}` first")
    usernames = [u.username for u in t.users]
    deleted = {
        "users": len(usernames),
        "login_records": s.scalar(select(func.count()).select_from(LoginRecord).join(User)
                                  .where(User.tenant_id == t.id)) or 0,
        "keys": len(t.keys),
        "client_certificates": len(t.certificates),
        "auth_failures": s.execute(delete(AuthFailureRecord).where(
            AuthFailureRecord.tenant_presented == t.name)).rowcount,  # type: ignore[attr-defined]
    }
    for name in usernames:  # before the deletes below: these statements autoflush
        s.execute(update(AuditRecord).where(
            AuditRecord.tenant == t.name, AuditRecord.subject_user == name
        ).values(subject_user=pseudonym(t.name, name)))
    # Core deletes: the database cascades (users -> login records) do the rest.
    s.execute(delete(User).where(User.tenant_id == t.id))
    s.execute(delete(ApiKey).where(ApiKey.tenant_id == t.id))
    s.execute(delete(ClientCertificate).where(ClientCertificate.tenant_id == t.id))
    s.expire(t, ["users", "keys", "certificates"])
    kept: list[dict[str, Any]] = []
    last = _last_accounting_event(t)
    retain_until = last + dt.timedelta(seconds=settings.billing_retention) if last else None
    if retain_until is not None and retain_until > now:
        t.status = "erased"
        t.retain_until = retain_until
        kept.append({
            "data": "company name and address, billing data and orders",
            "why": ACCOUNTING_REASON,
            "until": retain_until.isoformat(),
        })
    else:
        deleted["tenant"] = 1
        deleted["orders"] = len(t.orders)
        deleted["billing"] = 1 if t.billing else 0
        s.execute(delete(Tenant).where(Tenant.id == t.id))
    kept.append(audit_kept)
    audit(s, actor, "erase", now, tenant=tenant, deleted=deleted)
    return {"tenant": tenant, "deleted": deleted, "kept": kept}


def _last_accounting_event(t: Tenant) -> dt.datetime | None:
    stamps: list[dt.datetime] = []
    for o in t.orders:
        stamps.append(o.ordered_at)
        day = o.ends_on or o.starts_on
        stamps.append(dt.datetime.combine(day, dt.time(), dt.UTC))
    if t.billing is not None:
        stamps.append(t.billing.updated_at)
    return max(stamps) if stamps else None


def purge(
    s: Session, settings: RegisterSettings, now: dt.datetime, actor: Actor | str = SYSTEM_RETENTION,
) -> dict[str, int]:
    """Delete what has outlived its retention period; returns counts per kind."""

    def ago(seconds: float) -> dt.datetime:
        return now - dt.timedelta(seconds=seconds)

    counts: dict[str, int] = {}

    def run(name: str, stmt: Any) -> None:
        counts[name] = s.execute(stmt).rowcount

    run("login_records", delete(LoginRecord).where(LoginRecord.last_seen < ago(settings.login_retention)))
    # A username with no login record left is kept for nothing.
    run("users", delete(User).where(~exists().where(LoginRecord.user_id == User.id)))
    run("auth_failures", delete(AuthFailureRecord).where(
        AuthFailureRecord.at < ago(settings.failure_retention)))
    billing_cutoff = ago(settings.billing_retention)
    # An order that ended longer ago than the accounting period is needed no more;
    # open-ended ones stay as long as their tenant.
    run("orders", delete(Order).where(Order.ends_on < billing_cutoff.date()))
    # Erased tenants whose accounting retention is over go entirely.
    run("tenants", delete(Tenant).where(Tenant.status == "erased", Tenant.retain_until <= now))
    run("audit_records", delete(AuditRecord).where(AuditRecord.at < ago(settings.audit_retention)))
    # The timer's empty runs would only fill the audit log; an operator's always counts.
    if any(counts.values()) or actor != SYSTEM_RETENTION:
        audit(s, actor, "purge", now, deleted=counts)
    return counts


def purge_engine(engine: Engine, settings: RegisterSettings, now: dt.datetime) -> dict[str, int]:
    """``purge`` in its own transaction, for the gateway's timer (run it in a thread)."""
    with Session(engine) as s, s.begin():
        return purge(s, settings, now)


__all__ = ["erase", "export", "pseudonym", "purge", "purge_engine"]
