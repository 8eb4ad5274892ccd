"""``icap-gateway tenant|key|operator|register ...``: the register's commands.

Every command takes ``--config FILE``, ``--database URL`` (overrides
``[register] database``), ``--json`` and ``--operator NAME``; commands that
read or change personal data act as that operator (see register.access) and
leave an audit record.  No command prompts, so automation can use them all.

Exit codes: 0 done; 1 config, database or schema problem, or a refused
value; 2 usage; 3 not found or conflicting state; 4 access denied.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.settings import ConfigErrors, parse_duration
from register import access, gdpr, ops
from register.access import Actor
from register.db import RegisterError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_NOT_FOUND = 3
EXIT_DENIED = 4

Handler = Callable[[argparse.Namespace, Session, dt.datetime], Any]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _when(value: str) -> dt.datetime:
    """--expires: an ISO date/time (UTC unless it says otherwise) or a duration from now."""
    try:
        return _now() + dt.timedelta(seconds=parse_duration(value))
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a date (2027-01-31), a date and time, or a duration (90d), got {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date such as 2027-01-31, got {value!r}") from None


def _common(p: argparse.ArgumentParser, *, operator: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: embedded defaults)")
    p.add_argument("--database", metavar="URL", help="register database URL (overrides [register] database)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    if operator:
        p.add_argument("--operator", metavar="NAME",
                       help=f"act as this operator (default: ${access.OPERATOR_ENV}, else the OS user)")


def _config(args: argparse.Namespace) -> Any:
    from gateway.config import load_config, with_overrides

    return with_overrides(load_config(args.config), register__database=args.database)


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": message}))
    print(f"icap-gateway: {message}", file=sys.stderr)
    return code


def _print(args: argparse.Namespace, result: Any, human: Callable[[Any], str] | None) -> None:
    if args.json or human is None:
        print(json.dumps(result, indent=2, ensure_ascii=False, default=str))
    else:
        text = human(result)
        if text:
            print(text)


def _command(
    role: access.Role | None,
    body: Callable[..., Any],
    human: Callable[[Any], str] | None = None,
    *,
    upgrade: bool | None = None,
) -> Callable[[argparse.Namespace], int]:
    """A handler: load config, open the register, run ``body`` in one
    transaction as the operator (when ``role`` is given), print, exit code."""

    def handler(args: argparse.Namespace) -> int:
        from register.db import database_url, open_register

        try:
            config = _config(args)
            engine = open_register(
                database_url(config), config.register.auto_upgrade if upgrade is None else upgrade)
        except ConfigErrors as e:
            return _fail(args, EXIT_FAILURE, str(e))
        except RegisterError as e:
            return _fail(args, EXIT_FAILURE, str(e))
        now = _now()
        try:
            with Session(engine, expire_on_commit=False) as s, s.begin():
                if role is not None:
                    actor = access.require(s, access.operator_name(args.operator), role)
                    result = body(args, s, now, actor, config)
                else:
                    result = body(args, s, now, config)
        except access.AccessDenied as e:
            return _fail(args, EXIT_DENIED, str(e))
        except (access.NotFound, access.Conflict) as e:
            return _fail(args, EXIT_NOT_FOUND, str(e))
        except RegisterError as e:
            return _fail(args, EXIT_FAILURE, str(e))
        finally:
            engine.dispose()
        code = EXIT_OK
        if isinstance(result, tuple):  # (result, exit code)
            result, code = result
        _print(args, result, human)
        return code

    return handler


# --- tenant -------------------------------------------------------------------


def _tenant_add(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    t, k, key = ops.add_tenant(s, actor, args.name, now, company=args.company, address=args.address or "",
                               key_expires=args.key_expires)
    return {"tenant": ops.tenant_dict(t), "key_id": k.id, "key_prefix": k.prefix, "key": key}


def _human_new_key(r: dict[str, Any]) -> str:
    return (f"{r.get('tenant', {}).get('name', '')} key {r['key_id']}:\n{r['key']}\n"
            "Store it now: it is shown only once (the register keeps only its hash).").lstrip()


def _tenant_list(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    return [ops.tenant_dict(t) for t in ops.list_tenants(s, actor, now, include_erased=args.all)]


def _human_tenants(rows: list[dict[str, Any]]) -> str:
    return "\n".join(f"{r['name']:<24} {r['status']:<9} {r['company_name']}" for r in rows) or "(no tenants)"


def _tenant_show(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    return ops.show_tenant(s, actor, args.name, now)


def _tenant_status(status: str) -> Callable[..., Any]:
    def body(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
        return ops.tenant_dict(ops.set_tenant_status(s, actor, args.name, status, now))
    return body


def _tenant_update(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    return ops.tenant_dict(ops.update_tenant(s, actor, args.name, now, company=args.company,
                                             address=args.address))


def _tenant_billing(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    b = ops.set_billing(s, actor, args.name, now, contact=args.contact, address=args.billing_address,
                        payment_ref=args.payment_ref)
    return ops.billing_dict(b)


def _tenant_order(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    o = ops.add_order(s, actor, args.name, now, product=args.product, quantity=args.quantity,
                      starts_on=args.starts, ends_on=args.ends)
    return ops.order_dict(o)


# --- key ----------------------------------------------------------------------


def _key_create(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    k, key = ops.create_key(s, actor, args.tenant, now, args.expires)
    return {"tenant": {"name": args.tenant}, "key_id": k.id, "key_prefix": k.prefix, "key": key,
            "expires_at": k.expires_at.isoformat() if k.expires_at else None}


def _key_revoke(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    return ops.key_dict(ops.revoke_key(s, actor, args.key_id, now), now)


def _key_list(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    return [ops.key_dict(k, now) for k in ops.list_keys(s, actor, now, args.tenant)]


def _human_keys(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{r['id']:>5} {r['tenant']:<20} {r['prefix']}... {r['state']:<8} created {r['created_at'][:19]}"
        + (f" expires {r['expires_at'][:19]}" if r["expires_at"] else "")
        for r in rows) or "(no keys)"


# --- tenant cert ---------------------------------------------------------------


def _cert_add(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    try:
        with open(args.certificate, "rb") as f:
            pem = f.read(1024 * 1024)  # a certificate is a few KiB; a bound on what is read
    except OSError as e:
        raise RegisterError(f"{args.certificate}: {e.strerror}") from None
    return ops.certificate_dict(ops.add_certificate(s, actor, args.tenant, pem, now), now)


def _cert_revoke(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    return ops.certificate_dict(ops.revoke_certificate(s, actor, args.tenant, args.fingerprint, now), now)


def _cert_list(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    return [ops.certificate_dict(c, now) for c in ops.list_certificates(s, actor, now, args.tenant)]


def _human_certs(rows: list[dict[str, Any]]) -> str:
    return "\n".join(f"{r['tenant']:<20} {r['sha256']} {r['state']:<8} until {r['not_after'][:10]}"
                     for r in rows) or "(no certificates)"


def _human_cert(r: dict[str, Any]) -> str:
    return f"{r['tenant']}: certificate {r['sha256']} {r['state']}"


# --- operator -----------------------------------------------------------------


def _operator_add(args: argparse.Namespace, s: Session, now: dt.datetime, _c: Any) -> Any:
    op = access.add_operator(s, access.operator_name(args.operator), args.name, args.role, now)
    return access.operator_dict(op)


def _operator_remove(args: argparse.Namespace, s: Session, now: dt.datetime, _c: Any) -> Any:
    access.remove_operator(s, access.operator_name(args.operator), args.name, now)
    return {"name": args.name, "removed": True}


def _operator_list(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    from register.models import Operator

    return [access.operator_dict(o) for o in s.scalars(select(Operator).order_by(Operator.name))]


# --- register -----------------------------------------------------------------


def _export(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    return gdpr.export(s, actor, args.tenant, now, user=args.user)


def _erase(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, config: Any) -> Any:
    return gdpr.erase(s, actor, args.tenant, now, config.register, user=args.user)


def _human_erase(r: dict[str, Any]) -> str:
    lines = ["deleted: " + ", ".join(f"{k} {v}" for k, v in r["deleted"].items())]
    lines += [f"kept: {k['data']} until {k['until'][:10]}\n  why: {k['why']}" for k in r["kept"]]
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    return "\n".join(lines)


def _purge(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, config: Any) -> Any:
    return {"deleted": gdpr.purge(s, config.register, now, actor)}


def _human_counts(r: dict[str, Any]) -> str:
    return "deleted: " + ", ".join(f"{k} {v}" for k, v in r["deleted"].items())


def _audit(args: argparse.Namespace, s: Session, now: dt.datetime, actor: Actor, _c: Any) -> Any:
    from register.models import AuditRecord

    stmt = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(args.limit)
    if args.tenant:
        stmt = stmt.where(AuditRecord.tenant == args.tenant)
    rows = [{"at": a.at.isoformat(), "operator": a.operator, "action": a.action, "tenant": a.tenant,
             "user": a.subject_user, "detail": json.loads(a.detail) if a.detail else {}}
            for a in s.scalars(stmt)]
    access.audit(s, actor, "audit-read", now, tenant=args.tenant)
    return list(reversed(rows))


def _human_audit(rows: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{r['at'][:19]} {r['operator']:<16} {r['action']:<15} {r['tenant'] or '-'}"
        + (f"/{r['user']}" if r["user"] else "") for r in rows) or "(no records)"


def _status(args: argparse.Namespace) -> int:
    from register.db import create_register_engine, current_revision, database_url, head_revision, redacted

    try:
        config = _config(args)
        engine = create_register_engine(database_url(config))
        try:
            current = current_revision(engine)
        finally:
            engine.dispose()
    except (ConfigErrors, RegisterError) as e:
        return _fail(args, EXIT_FAILURE, str(e))
    except Exception as e:  # unreachable database
        return _fail(args, EXIT_FAILURE, f"cannot open: {str(getattr(e, 'orig', None) or e).strip()}")
    result = {"database": redacted(database_url(config)), "revision": current, "head": head_revision(),
              "current": current == head_revision()}
    _print(args, result, lambda r: f"{r['database']}: revision {r['revision']} (this version: {r['head']})")
    return EXIT_OK if result["current"] else EXIT_FAILURE


def _notice(args: argparse.Namespace) -> int:
    from register import notice
    from register.db import database_url, open_register

    try:
        config = _config(args)
        engine = open_register(database_url(config), config.register.auto_upgrade)
    except (ConfigErrors, RegisterError) as e:
        return _fail(args, EXIT_FAILURE, str(e))
    try:
        schema = notice.classify(engine)
    finally:
        engine.dispose()
    text = notice.render(config.register, schema, args.lang)
    missing = notice.missing_settings(config.register)
    if args.json:
        print(json.dumps({"lang": args.lang, "notice": text, "missing_settings": missing,
                          "unclassified": schema.unclassified,
                          "categories": schema.present}, indent=2, ensure_ascii=False))
    else:
        print(text)
    for key in missing:
        print(f"icap-gateway: {config.source}: {key}: not set; the notice is not publishable",
              file=sys.stderr)
    if schema.unclassified:
        print("icap-gateway: columns the notice does not classify: " + ", ".join(schema.unclassified),
              file=sys.stderr)
    return EXIT_FAILURE if missing or schema.unclassified else EXIT_OK


def _upgrade(args: argparse.Namespace) -> int:
    from register.db import create_register_engine, database_url, redacted, upgrade_schema

    try:
        config = _config(args)
        engine = create_register_engine(database_url(config))
        before, after = upgrade_schema(engine)
        engine.dispose()
    except (ConfigErrors, RegisterError) as e:
        return _fail(args, EXIT_FAILURE, str(e))
    except Exception as e:  # a database error: say which database and why
        return _fail(args, EXIT_FAILURE, f"upgrade failed: {str(getattr(e, 'orig', None) or e).strip()}")
    result = {"database": redacted(database_url(config)), "from": before, "to": after}
    _print(args, result, lambda r: f"{r['database']}: {r['from'] or 'empty'} -> {r['to']}")
    return EXIT_OK


# --- the parsers ----------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    # tenant
    tenant = sub.add_parser("tenant", help="manage tenants (customer companies)").add_subparsers(
        dest="tenant_command", required=True, metavar="SUBCOMMAND")
    p = tenant.add_parser("add", help="add a tenant and print its first key (shown once)")
    p.add_argument("name", metavar="NAME", help="short name: a-z, 0-9, '-', '_' (part of its keys)")
    p.add_argument("--company", help="company name (default: NAME)")
    p.add_argument("--address", help="company address")
    p.add_argument("--key-expires", type=_when, metavar="WHEN", help="expiry of the first key (date or 90d)")
    _common(p)
    p.set_defaults(func=_command("admin", _tenant_add, _human_new_key))

    p = tenant.add_parser("list", help="list tenants")
    p.add_argument("--all", action="store_true", help="include erased tenants kept for accounting")
    _common(p)
    p.set_defaults(func=_command("viewer", _tenant_list, _human_tenants))

    p = tenant.add_parser("show", help="show a tenant, its billing data, orders and keys")
    p.add_argument("name", metavar="NAME")
    _common(p)
    p.set_defaults(func=_command("viewer", _tenant_show))

    for name, status, text in (("disable", "disabled", "refuse the tenant's keys (reversible)"),
                               ("enable", "active", "accept the tenant's keys again")):
        p = tenant.add_parser(name, help=text)
        p.add_argument("name", metavar="NAME")
        _common(p)
        p.set_defaults(func=_command("admin", _tenant_status(status),
                                     lambda r: f"{r['name']}: {r['status']}"))

    p = tenant.add_parser("update", help="change the company name or address")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--company")
    p.add_argument("--address")
    _common(p)
    p.set_defaults(func=_command("admin", _tenant_update))

    p = tenant.add_parser("billing", help="set billing contact, address and payment-method reference")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--contact", help="billing contact (name or e-mail)")
    p.add_argument("--billing-address", help="billing address")
    p.add_argument("--payment-ref", help="payment provider's reference (never a card number) or 'invoice'")
    _common(p)
    p.set_defaults(func=_command("admin", _tenant_billing))

    p = tenant.add_parser("order", help="record an order (product or subscription)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("product", metavar="PRODUCT")
    p.add_argument("--quantity", type=int, default=1)
    p.add_argument("--starts", type=_date, metavar="DATE", help="start date (default: today)")
    p.add_argument("--ends", type=_date, metavar="DATE", help="end date (default: open-ended)")
    _common(p)
    p.set_defaults(func=_command("admin", _tenant_order))

    cert = tenant.add_parser("cert", help="TLS client certificates bound to tenants (ICAPS)").add_subparsers(
        dest="cert_command", required=True, metavar="SUBCOMMAND")
    p = cert.add_parser("add", help="bind a client certificate (PEM) to a tenant by its SHA-256: a proxy "
                                    "presenting it is that tenant without a key")
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("certificate", metavar="CERT.pem")
    _common(p)
    p.set_defaults(func=_command("admin", _cert_add, _human_cert))
    p = cert.add_parser("list", help="list bound certificates: fingerprints and dates")
    p.add_argument("tenant", metavar="TENANT", nargs="?")
    _common(p)
    p.set_defaults(func=_command("viewer", _cert_list, _human_certs))
    p = cert.add_parser("revoke", help="revoke a certificate (refused within [auth] refresh_interval)")
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("fingerprint", metavar="FINGERPRINT", help="SHA-256, hex (colons allowed)")
    _common(p)
    p.set_defaults(func=_command("admin", _cert_revoke, _human_cert))

    # key
    key = sub.add_parser("key", help="manage tenants' API keys").add_subparsers(
        dest="key_command", required=True, metavar="SUBCOMMAND")
    p = key.add_parser("create", help="create another key for a tenant (shown once)")
    p.add_argument("tenant", metavar="TENANT")
    p.add_argument("--expires", type=_when, metavar="WHEN", help="a date, date and time, or duration (90d)")
    _common(p)
    p.set_defaults(func=_command("admin", _key_create, _human_new_key))
    p = key.add_parser("revoke", help="revoke a key (the gateway refuses it within [auth] refresh_interval)")
    p.add_argument("key_id", type=int, metavar="KEY_ID")
    _common(p)
    p.set_defaults(func=_command("admin", _key_revoke, lambda r: f"key {r['id']}: {r['state']}"))
    p = key.add_parser("list", help="list keys: ids, prefixes and dates, never the keys")
    p.add_argument("--tenant", metavar="TENANT")
    _common(p)
    p.set_defaults(func=_command("viewer", _key_list, _human_keys))

    # operator
    op = sub.add_parser("operator", help="named staff who may use the register").add_subparsers(
        dest="operator_command", required=True, metavar="SUBCOMMAND")
    p = op.add_parser("add", help="add an operator (the first one, an admin, needs no existing admin)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--role", choices=sorted(access.ROLES), required=True)
    _common(p)
    p.set_defaults(func=_command(None, _operator_add, lambda r: f"operator {r['name']}: {r['role']}"))
    p = op.add_parser("remove", help="disable an operator (kept by name in the audit log)")
    p.add_argument("name", metavar="NAME")
    _common(p)
    p.set_defaults(func=_command(None, _operator_remove, lambda r: f"operator {r['name']}: removed"))
    p = op.add_parser("list", help="list operators")
    _common(p)
    p.set_defaults(func=_command("admin", _operator_list,
                                 lambda rows: "\n".join(f"{r['name']:<24} {r['role']}"
                                                        + (" (removed)" if r["disabled_at"] else "")
                                                        for r in rows)))

    # register
    reg = sub.add_parser("register", help="the personal-data register: export, erase, purge, notice").add_subparsers(
        dest="register_command", required=True, metavar="SUBCOMMAND")
    p = reg.add_parser("export", help="everything held about a tenant or user, as JSON (GDPR Art. 15)")
    p.add_argument("--tenant", required=True, metavar="NAME")
    p.add_argument("--user", metavar="USERNAME")
    _common(p)
    p.set_defaults(func=_command("viewer", _export))
    p = reg.add_parser("erase", help="erase a user's or a disabled tenant's personal data; "
                                     "reports what law or contract requires to keep")
    p.add_argument("--tenant", required=True, metavar="NAME")
    p.add_argument("--user", metavar="USERNAME")
    _common(p)
    p.set_defaults(func=_command("admin", _erase, _human_erase))
    p = reg.add_parser("purge", help="delete records past their retention period")
    _common(p)
    p.set_defaults(func=_command("admin", _purge, _human_counts))
    p = reg.add_parser("notice", help="print the privacy notice from the live schema and config")
    p.add_argument("--lang", choices=["fi", "en"], default="fi")
    _common(p, operator=False)
    p.set_defaults(func=_notice)
    p = reg.add_parser("audit", help="show the audit log: who read, exported or erased what")
    p.add_argument("--tenant", metavar="NAME")
    p.add_argument("--limit", type=int, default=100)
    _common(p)
    p.set_defaults(func=_command("admin", _audit, _human_audit))
    p = reg.add_parser("upgrade", help="upgrade the register schema to this version's")
    _common(p, operator=False)
    p.set_defaults(func=_upgrade)
    p = reg.add_parser("status", help="the database and its schema revision (exit 1 when not current)")
    _common(p, operator=False)
    p.set_defaults(func=_status)
