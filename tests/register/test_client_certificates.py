"""Client certificates bound to tenants: the authenticator's decisions, the
key table, ``tenant cert add/list/revoke``, export and erase."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from twisted.internet.task import Clock

from gateway.interfaces import Authenticated, AuthFailure, Credentials, Refused, Tenant
from register import gdpr, ops
from register.auth import KeyAuthenticator, KeyEntry, KeyTable, load_key_table
from register.keys import generate_key, hash_key
from register.models import AuditRecord
from register.settings import AuthSettings
from tests.register.helpers import ADMIN, T0, ListRecorder, add_tenant
from tests.register.test_cli import Cli
from tests.register.test_cli import cli as cli  # the fixture, re-exported
from tests.tlscerts import issue, make_ca

ACME, BETA = Tenant(7, "acme"), Tenant(8, "beta")
ACME_KEY, BETA_KEY = generate_key("acme"), generate_key("beta")
ACME_CERT, REVOKED_CERT, BETA_CERT, UNBOUND_CERT = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def make() -> tuple[KeyAuthenticator, ListRecorder]:
    clock = Clock()
    clock.advance(T0)
    rec = ListRecorder()
    table = KeyTable(
        {hash_key(ACME_KEY): KeyEntry(ACME, True, None, False), hash_key(BETA_KEY): KeyEntry(BETA, True, None, False)},
        frozenset({"acme", "beta"}),
        {ACME_CERT: KeyEntry(ACME, True, T0 + 3600, False), REVOKED_CERT: KeyEntry(ACME, True, None, True),
         BETA_CERT: KeyEntry(BETA, False, None, False)},
    )
    return KeyAuthenticator(dataclasses.replace(AuthSettings(), failure_burst=100), rec, clock, table), rec


def creds(key: str | None, cert: str | None) -> Credentials:
    return Credentials(key=key, source_ip="192.0.2.10", client_cert_sha256=cert)


def test_a_bound_certificate_is_its_tenant_without_a_key() -> None:
    a, rec = make()
    assert a.authenticate(creds(None, ACME_CERT)) == Authenticated(ACME)
    assert a.authenticate(creds(ACME_KEY, ACME_CERT)) == Authenticated(ACME)  # its own tenant's key: fine
    assert rec.events == []


@pytest.mark.parametrize("key, cert, refusal, presented", [
    (BETA_KEY, ACME_CERT, Refused(403, "key-not-certificate-tenant"), "acme"),  # another tenant's key
    ("icgw.acme." + "x" * 43, ACME_CERT, Refused(403, "unknown-key"), "acme"),
    (None, UNBOUND_CERT, Refused(403, "unknown-certificate"), None),
    (ACME_KEY, UNBOUND_CERT, Refused(403, "unknown-certificate"), "acme"),  # a good key does not save it
    (None, REVOKED_CERT, Refused(403, "revoked-certificate"), "acme"),
    (ACME_KEY, REVOKED_CERT, Refused(403, "revoked-certificate"), "acme"),
    (None, BETA_CERT, Refused(403, "tenant-disabled"), "beta"),
    (None, None, Refused(401, "missing-key"), None),
])
def test_refusals_are_recorded_with_the_fingerprint(key: str | None, cert: str | None, refusal: Refused,
                                                     presented: str | None) -> None:
    a, rec = make()
    assert a.authenticate(creds(key, cert)) == refusal
    assert rec.events == [AuthFailure(at=T0, source_ip="192.0.2.10", tenant_presented=presented,
                                      reason=refusal.reason, client_cert_sha256=cert)]


def test_an_expired_binding_is_refused() -> None:
    a, _rec = make()
    a.clock.advance(3600)  # type: ignore[attr-defined]
    assert a.authenticate(creds(None, ACME_CERT)) == Refused(403, "expired-certificate")


def test_credentials_repr_shows_the_fingerprint_not_the_key() -> None:
    text = repr(creds(ACME_KEY, ACME_CERT))
    assert ACME_KEY not in text and ACME_CERT in text


def test_bind_list_revoke_and_the_key_table(engine: Engine, tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    proxy = issue(ca, tmp_path, "proxy", server=False)
    now = dt.datetime.now(dt.UTC)  # the certificates are valid around the real now
    add_tenant(engine, "acme", now.timestamp())
    with Session(engine) as s, s.begin():
        cert = ops.add_certificate(s, ADMIN, "acme", proxy.cert.read_bytes(), now)
        assert cert.sha256 == proxy.sha256
        with pytest.raises(ops.Conflict, match="already bound"):
            ops.add_certificate(s, ADMIN, "acme", proxy.cert.read_bytes(), now)
        with pytest.raises(ops.RegisterError, match="PEM"):
            ops.add_certificate(s, ADMIN, "acme", b"junk", now)
    table = load_key_table(engine)
    assert table.by_certificate[proxy.sha256].tenant.name == "acme"
    assert not table.by_certificate[proxy.sha256].revoked
    colons = ":".join(proxy.sha256[i:i + 2] for i in range(0, 64, 2)).upper()
    with Session(engine) as s, s.begin():
        assert [c.sha256 for c in ops.list_certificates(s, ADMIN, now, "acme")] == [proxy.sha256]
        ops.revoke_certificate(s, ADMIN, "acme", colons, now)
        actions = list(s.scalars(select(AuditRecord.action).order_by(AuditRecord.id)))
    assert load_key_table(engine).by_certificate[proxy.sha256].revoked
    assert actions[-3:] == ["cert-add", "cert-list", "cert-revoke"]


def test_export_and_erase_cover_certificates(engine: Engine, tmp_path: Path) -> None:
    from register.settings import RegisterSettings

    proxy = issue(make_ca(tmp_path), tmp_path, "proxy", server=False)
    now = dt.datetime.now(dt.UTC)  # the certificates are valid around the real now
    add_tenant(engine, "acme", now.timestamp())
    with Session(engine) as s, s.begin():
        ops.add_certificate(s, ADMIN, "acme", proxy.cert.read_bytes(), now)
        exported = gdpr.export(s, ADMIN, "acme", now)
        assert [c["sha256"] for c in exported["client_certificates"]] == [proxy.sha256]
        ops.set_tenant_status(s, ADMIN, "acme", "disabled", now)
        report = gdpr.erase(s, ADMIN, "acme", now, RegisterSettings())
    assert report["deleted"]["client_certificates"] == 1
    assert proxy.sha256 not in load_key_table(engine).by_certificate


def test_cli_cert_commands(cli: Cli, tmp_path: Path) -> None:
    proxy = issue(make_ca(tmp_path), tmp_path, "proxy", server=False)
    assert cli("tenant", "add", "acme", "--json")[0] == 0
    code, added, err = cli("tenant", "cert", "add", "acme", str(proxy.cert), "--json")
    assert code == 0, err
    assert added["sha256"] == proxy.sha256 and added["state"] == "active"  # type: ignore[index]
    assert "BEGIN CERTIFICATE" not in json.dumps(added)
    code, rows, _ = cli("tenant", "cert", "list", "--json")
    assert [r["sha256"] for r in rows] == [proxy.sha256]  # type: ignore[union-attr]
    assert cli("tenant", "cert", "add", "acme", str(proxy.cert))[0] == 3  # already bound
    assert cli("tenant", "cert", "add", "acme", str(tmp_path / "missing.pem"))[0] == 1
    assert cli("tenant", "cert", "revoke", "acme", "f" * 64)[0] == 3
    code, revoked, _ = cli("tenant", "cert", "revoke", "acme", proxy.sha256, "--json")
    assert code == 0 and revoked["state"] == "revoked"  # type: ignore[index]
    code, text, _ = cli("tenant", "cert", "list", "acme")
    assert proxy.sha256 in text and "revoked" in text  # type: ignore[operator]


def test_the_notice_covers_the_new_columns(engine: Engine) -> None:
    from register.notice import classify

    schema = classify(engine)
    assert "auth_failures.client_cert_sha256" in schema.present["auth-failure"]
    assert not schema.unclassified
