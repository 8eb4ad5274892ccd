"""Export, erasure and retention (notice section 7), with audit records."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from gateway.interfaces import AuthFailure, UserSeen
from register import gdpr, ops
from register.access import Conflict, NotFound
from register.models import (
    ApiKey,
    AuditRecord,
    AuthFailureRecord,
    BillingAccount,
    LoginRecord,
    Order,
    Tenant,
    User,
)
from register.recorder import BatchRecorder
from register.settings import RegisterSettings
from tests.register.helpers import ADMIN, T0, add_tenant, utc

DAY = 86400.0
SETTINGS = RegisterSettings()


def populate(engine: Engine) -> int:
    tid, _key = add_tenant(engine, "acme", company="Acme Oy", address="Katu 1, Helsinki")
    add_tenant(engine, "beta")
    with Session(engine) as s, s.begin():
        ops.set_billing(s, ADMIN, "acme", utc(T0), contact="laskutus@acme.example",
                        address="PL 1, Helsinki", payment_ref="invoice")
        ops.add_order(s, ADMIN, "acme", utc(T0), product="av-gateway", quantity=50,
                      starts_on=dt.date(2027, 1, 1))
    rec = BatchRecorder(engine)
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0))
    rec.record(UserSeen(tid, "bob", "10.0.0.5", T0 + 60))
    rec.record(UserSeen(tid, "carol", "10.0.0.6", T0))
    rec.record(AuthFailure(T0, "192.0.2.7", "acme", "unknown-key"))
    rec.record(AuthFailure(T0, "192.0.2.8", "beta", "unknown-key"))
    rec.flush_all()
    return tid


def count(engine: Engine, model: type) -> int:
    with Session(engine) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def test_export_tenant_holds_everything(engine: Engine) -> None:
    populate(engine)
    with Session(engine) as s, s.begin():
        out = gdpr.export(s, ADMIN, "acme", utc(T0 + 100))
    assert out["tenant"]["company_name"] == "Acme Oy"
    assert out["tenant"]["company_address"] == "Katu 1, Helsinki"
    assert out["billing"]["contact"] == "laskutus@acme.example"
    assert out["orders"][0]["product"] == "av-gateway" and out["orders"][0]["quantity"] == 50
    assert [u["username"] for u in out["users"]] == ["bob", "carol"]
    assert out["users"][0]["logins"] == [{"client_ip": "10.0.0.5", "login_at": utc(T0).isoformat(),
                                          "last_seen": utc(T0 + 60).isoformat()}]
    assert [f["source_ip"] for f in out["auth_failures"]] == ["192.0.2.7"]  # not beta's
    assert len(out["keys"]) == 1 and "key_hash" not in json.dumps(out)
    assert any(a["action"] == "tenant-add" for a in out["access_log"])
    with Session(engine) as s:
        last = s.scalars(select(AuditRecord).order_by(AuditRecord.id.desc())).first()
        assert (last.operator, last.action, last.tenant) == ("alice", "export", "acme")  # type: ignore[union-attr]


def test_export_one_user(engine: Engine) -> None:
    populate(engine)
    with Session(engine) as s, s.begin():
        out = gdpr.export(s, ADMIN, "acme", utc(T0), user="carol")
    assert out["user"] == {"username": "carol", "logins": [
        {"client_ip": "10.0.0.6", "login_at": utc(T0).isoformat(), "last_seen": utc(T0).isoformat()}]}
    assert "billing" not in out
    with Session(engine) as s, s.begin(), pytest.raises(NotFound):
        gdpr.export(s, ADMIN, "acme", utc(T0), user="nobody")


def test_erase_user_deletes_logins_and_pseudonymises_audit(engine: Engine) -> None:
    populate(engine)
    with Session(engine) as s, s.begin():
        gdpr.export(s, ADMIN, "acme", utc(T0), user="bob")
        report = gdpr.erase(s, ADMIN, "acme", utc(T0), SETTINGS, user="bob")
    assert report["deleted"] == {"users": 1, "login_records": 1}
    assert "recorded again" in report["note"]
    with Session(engine) as s:
        assert s.scalars(select(User.username)).all() == ["carol"]
        assert count(engine, LoginRecord) == 1
        subjects = set(s.scalars(select(AuditRecord.subject_user)))
    assert "bob" not in subjects and gdpr.pseudonym("acme", "bob") in subjects


def test_active_tenant_cannot_be_erased(engine: Engine) -> None:
    populate(engine)
    with Session(engine) as s, s.begin(), pytest.raises(Conflict, match="tenant disable"):
        gdpr.erase(s, ADMIN, "acme", utc(T0), SETTINGS)


def test_erase_tenant_keeps_accounting_data_until_retention_ends(engine: Engine) -> None:
    populate(engine)
    with Session(engine) as s, s.begin():
        ops.set_tenant_status(s, ADMIN, "acme", "disabled", utc(T0))
        report = gdpr.erase(s, ADMIN, "acme", utc(T0 + DAY), SETTINGS)
    assert report["deleted"] == {"users": 2, "login_records": 2, "keys": 1, "client_certificates": 0,
                                 "auth_failures": 1}
    kept = report["kept"][0]
    assert "billing" in kept["data"] and "Accounting Act" in kept["why"]
    until = dt.datetime.fromisoformat(kept["until"])
    assert until > utc(T0) + dt.timedelta(days=6 * 365)
    with Session(engine) as s:
        t = s.scalar(select(Tenant).where(Tenant.name == "acme"))
        assert t is not None and t.status == "erased" and t.retain_until == until
        assert s.scalar(select(func.count()).select_from(User).where(User.tenant_id == t.id)) == 0
    assert count(engine, ApiKey) == 1  # beta's
    assert count(engine, BillingAccount) == 1 and count(engine, Order) == 1
    assert count(engine, AuthFailureRecord) == 1  # beta's
    # Purge before the end of the period keeps it; after, everything goes.
    with Session(engine) as s, s.begin():
        assert gdpr.purge(s, SETTINGS, until - dt.timedelta(days=1))["tenants"] == 0
    with Session(engine) as s, s.begin():
        assert gdpr.purge(s, SETTINGS, until + dt.timedelta(days=1))["tenants"] == 1
    assert count(engine, BillingAccount) == 0 and count(engine, Order) == 0
    with Session(engine) as s:
        assert s.scalars(select(Tenant.name)).all() == ["beta"]


def test_erase_tenant_without_billing_removes_it_entirely(engine: Engine) -> None:
    add_tenant(engine, "gamma")
    with Session(engine) as s, s.begin():
        ops.set_tenant_status(s, ADMIN, "gamma", "disabled", utc(T0))
        report = gdpr.erase(s, ADMIN, "gamma", utc(T0), SETTINGS)
    assert report["deleted"]["tenant"] == 1
    assert [k["data"] for k in report["kept"]] == [report["kept"][0]["data"]]  # only the audit log
    assert count(engine, Tenant) == 0


def test_purge_enforces_retention_periods(engine: Engine) -> None:
    populate(engine)
    settings = RegisterSettings(login_retention=10 * DAY, failure_retention=5 * DAY)
    with Session(engine) as s, s.begin():
        assert gdpr.purge(s, settings, utc(T0 + 4 * DAY)) == {
            "login_records": 0, "users": 0, "auth_failures": 0, "orders": 0, "tenants": 0,
            "audit_records": 0}
    with Session(engine) as s, s.begin():
        counts = gdpr.purge(s, settings, utc(T0 + 6 * DAY))
    assert counts["auth_failures"] == 2 and counts["login_records"] == 0
    with Session(engine) as s, s.begin():
        counts = gdpr.purge(s, settings, utc(T0 + 11 * DAY))
    assert counts["login_records"] == 2 and counts["users"] == 2
    assert count(engine, User) == 0 and count(engine, Tenant) == 2  # tenants are not login data
    with Session(engine) as s:
        purge_audit = s.scalars(select(AuditRecord).where(AuditRecord.action == "purge")).all()
    assert [a.operator for a in purge_audit] == ["system:retention", "system:retention"]


def test_purge_engine_runs_in_its_own_transaction(engine: Engine) -> None:
    populate(engine)
    counts = gdpr.purge_engine(engine, RegisterSettings(failure_retention=1.0), utc(T0 + 10))
    assert counts["auth_failures"] == 2
    assert count(engine, AuthFailureRecord) == 0


def test_payment_reference_refuses_card_numbers(engine: Engine) -> None:
    from register.db import RegisterError

    add_tenant(engine, "acme")
    with Session(engine) as s, s.begin(), pytest.raises(RegisterError, match="card number"):
        ops.set_billing(s, ADMIN, "acme", utc(T0), payment_ref="4111 1111 1111 1111")
    with Session(engine) as s, s.begin():
        assert ops.set_billing(s, ADMIN, "acme", utc(T0), payment_ref="pm_1Nv9Xs2eZvKYlo2C").payment_ref
