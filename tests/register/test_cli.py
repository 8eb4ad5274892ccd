"""The register's commands, through ``icap-gateway``'s real argument parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from gateway.cli import main
from register.db import head_revision
from register.models import AuditRecord


class Cli:
    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    def __call__(self, *argv: str, operator: str | None = "alice") -> tuple[int, object, str]:
        args = [*argv, "--database", self.url]
        if operator is not None:
            args += ["--operator", operator]
        self.capsys.readouterr()
        code = main(args)
        out, err = self.capsys.readouterr()
        try:
            parsed: object = json.loads(out) if "--json" in argv else out
        except json.JSONDecodeError:
            parsed = out
        return code, parsed, err


@pytest.fixture
def cli(db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.delenv("ICAP_GATEWAY_OPERATOR", raising=False)
    c = Cli(db_url, capsys)
    code, _, err = c("operator", "add", "alice", "--role", "admin")
    assert code == 0, err
    return c


def audit_actions(url: str) -> list[tuple[str, str]]:
    engine = create_engine(url)
    with Session(engine) as s:
        rows = [(a.operator, a.action) for a in s.scalars(select(AuditRecord).order_by(AuditRecord.id))]
    engine.dispose()
    return rows


def test_first_operator_bootstrap_then_roles_enforced(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    c = Cli(db_url, capsys)
    code, _, err = c("tenant", "list", operator="mallory")
    assert code == 4 and "no operators yet" in err
    code, _, err = c("operator", "add", "viewer1", "--role", "viewer", operator="ops")
    assert code == 4 and "must be an admin" in err
    assert c("operator", "add", "alice", "--role", "admin", operator="whoever")[0] == 0
    # Now an admin is needed to add more, and unknown names are refused.
    code, _, err = c("operator", "add", "bob", "--role", "viewer", operator="mallory")
    assert code == 4 and "not an operator" in err
    assert c("operator", "add", "vera", "--role", "viewer")[0] == 0
    code, _, err = c("tenant", "add", "acme", operator="vera")
    assert code == 4 and "needs 'admin'" in err
    assert c("tenant", "list", operator="vera")[0] == 0
    code, _, err = c("operator", "remove", "alice")
    assert code == 3 and "last admin" in err


def test_tenant_add_prints_the_key_once_and_key_list_never(cli: Cli, db_url: str) -> None:
    code, out, _ = cli("tenant", "add", "acme", "--company", "Acme Oy", "--address", "Katu 1", "--json")
    assert code == 0
    assert isinstance(out, dict)
    key = out["key"]
    assert key.startswith("icgw.acme.") and out["tenant"]["company_name"] == "Acme Oy"
    code, listed, _ = cli("key", "list", "--json")
    assert code == 0 and isinstance(listed, list)
    assert listed[0]["prefix"] == out["key_prefix"] and key not in json.dumps(listed)
    code, text, _ = cli("key", "list")
    assert key not in str(text) and "icgw.acme." in str(text)
    # The same name again is a conflict.
    code, _, err = cli("tenant", "add", "acme")
    assert code == 3 and "already exists" in err
    code, _, err = cli("tenant", "add", "Bad Name!")
    assert code == 1 and "invalid tenant name" in err
    assert ("alice", "tenant-add") in audit_actions(db_url)


def test_key_create_revoke_and_tenant_disable(cli: Cli) -> None:
    cli("tenant", "add", "acme", "--json")
    code, created, _ = cli("key", "create", "acme", "--expires", "30d", "--json")
    assert code == 0 and isinstance(created, dict) and created["expires_at"]
    code, revoked, _ = cli("key", "revoke", str(created["key_id"]), "--json")
    assert code == 0 and isinstance(revoked, dict) and revoked["state"] == "revoked"
    code, _, _err = cli("key", "revoke", "999")
    assert code == 3
    code, shown, _ = cli("tenant", "disable", "acme", "--json")
    assert code == 0 and isinstance(shown, dict) and shown["status"] == "disabled"
    code, shown, _ = cli("tenant", "show", "acme", "--json")
    assert isinstance(shown, dict) and [k["state"] for k in shown["keys"]] == ["active", "revoked"]


def test_export_erase_purge_round_trip(cli: Cli, db_url: str) -> None:
    cli("tenant", "add", "acme", "--json")
    assert cli("tenant", "billing", "acme", "--contact", "billing@acme.example",
               "--payment-ref", "invoice", "--json")[0] == 0
    assert cli("tenant", "order", "acme", "av-gateway", "--quantity", "10", "--json")[0] == 0
    code, _, err = cli("tenant", "billing", "acme", "--payment-ref", "4111111111111111")
    assert code == 1 and "card number" in err
    code, exported, _ = cli("register", "export", "--tenant", "acme", "--json")
    assert code == 0 and isinstance(exported, dict)
    assert exported["billing"]["contact"] == "billing@acme.example"
    code, _, err = cli("register", "erase", "--tenant", "acme")
    assert code == 3 and "tenant disable acme" in err
    cli("tenant", "disable", "acme")
    code, report, _ = cli("register", "erase", "--tenant", "acme", "--json")
    assert code == 0 and isinstance(report, dict)
    assert report["deleted"]["keys"] == 1 and "Accounting Act" in report["kept"][0]["why"]
    code, _text, _ = cli("register", "erase", "--tenant", "acme", "--user", "nobody")
    assert code == 3
    code, purged, _ = cli("register", "purge", "--json")
    assert code == 0 and isinstance(purged, dict) and set(purged["deleted"]) >= {"login_records", "auth_failures"}
    code, audit, _ = cli("register", "audit", "--tenant", "acme", "--json")
    assert code == 0 and isinstance(audit, list)
    assert "erase" in [a["action"] for a in audit] and all(a["tenant"] == "acme" for a in audit)
    actions = [a for _, a in audit_actions(db_url)]
    assert {"export", "erase", "purge", "audit-read"} <= set(actions)


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["tenant", "add"], ["tenant", "list"], ["key", "create"], ["key", "revoke"],
                 ["register", "export"], ["register", "erase"], ["register", "purge"],
                 ["register", "notice"], ["operator", "add"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--database" in out and "--json" in out and "--config" in out


def test_notice_from_live_schema_and_config(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[register]\ncontroller = "Soluto Oy"\ncontroller_address = "Vanha Talvitie 2-6, A 7, 00580 Helsinki"\n'
        'contact_name = "Jani-Petteri Pohjonen"\ncontact_email = "gdpr@soluto.fi"\nlogin_retention = "90d"\n',
        encoding="utf-8")
    assert main(["register", "notice", "--config", str(config), "--database", db_url]) == 0
    fi = capsys.readouterr().out
    assert "Soluto Oy, Vanha Talvitie 2-6, A 7, 00580 Helsinki" in fi
    assert "Jani-Petteri Pohjonen, gdpr@soluto.fi" in fi
    for item in ("Yrityksen nimi", "Yrityksen osoite", "Maksamisen ja laskutuksen tiedot",
                 "Tiedot tilauksista", "Käyttäjätunnus", "Tietokoneen IP-osoite",
                 "Mahdollinen kirjautumisaika", "epäonnistuneesta tunnistautumisesta",
                 "EU:n tai Euroopan talousalueen ulkopuolelle", "90 päivää"):
        assert item in fi
    assert main(["register", "notice", "--lang", "en", "--json", "--config", str(config),
                 "--database", db_url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["missing_settings"] == [] and doc["unclassified"] == []
    assert "not transferred outside the EU" in doc["notice"]
    # Without the controller keys the notice is printed but not publishable.
    assert main(["register", "notice", "--database", db_url]) == 1
    assert "[register] controller: not set" in capsys.readouterr().err


def test_bad_config_names_file_key_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[register]\nlogin_retention = "forever"\n[auth]\nuser_encoding = "rot13"\n')
    assert main(["tenant", "list", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{config}: [register] login_retention" in err and "[auth] user_encoding" in err


def test_status_and_upgrade(fresh_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["register", "status", "--database", fresh_url, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["revision"] is None
    assert main(["register", "upgrade", "--database", fresh_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["to"] == head_revision()
    assert main(["register", "status", "--database", fresh_url]) == 0
