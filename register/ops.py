"""Tenants, their keys, billing data and orders: the operations behind the CLI.

Each function takes a Session (the caller commits), the acting operator
(``register.access.require`` checked the role) and ``now``, and leaves an
audit record for whatever personal data it read or changed.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from register.access import Actor, Conflict, NotFound, audit
from register.db import RegisterError
from register.keys import display_prefix, generate_key, hash_key, valid_tenant_name
from register.models import ApiKey, BillingAccount, ClientCertificate, Order, Tenant


def _iso(value: dt.datetime | dt.date | None) -> str | None:
    return value.isoformat() if value is not None else None


def tenant_dict(t: Tenant) -> dict[str, Any]:
    return {
        "id": t.id, "name": t.name, "company_name": t.company_name,
        "company_address": t.company_address, "status": t.status,
        "created_at": _iso(t.created_at), "retain_until": _iso(t.retain_until),
    }


def key_dict(k: ApiKey, now: dt.datetime | None = None) -> dict[str, Any]:
    """A key as listings show it: never the key, never its hash."""
    state = "active"
    if k.revoked_at is not None:
        state = "revoked"
    elif k.expires_at is not None and now is not None and now >= k.expires_at:
        state = "expired"
    return {
        "id": k.id, "tenant": k.tenant.name, "prefix": k.prefix, "state": state,
        "created_at": _iso(k.created_at), "expires_at": _iso(k.expires_at),
        "revoked_at": _iso(k.revoked_at),
    }


def certificate_dict(c: ClientCertificate, now: dt.datetime | None = None) -> dict[str, Any]:
    """A bound client certificate: its fingerprint and dates (the register keeps no more)."""
    state = "active"
    if c.revoked_at is not None:
        state = "revoked"
    elif now is not None and now >= c.not_after:
        state = "expired"
    return {"id": c.id, "tenant": c.tenant.name, "sha256": c.sha256, "state": state,
            "not_after": _iso(c.not_after), "created_at": _iso(c.created_at), "revoked_at": _iso(c.revoked_at)}


def billing_dict(b: BillingAccount | None) -> dict[str, Any] | None:
    if b is None:
        return None
    return {"contact": b.contact, "address": b.address, "payment_ref": b.payment_ref,
            "updated_at": _iso(b.updated_at)}


def order_dict(o: Order) -> dict[str, Any]:
    return {"id": o.id, "product": o.product, "quantity": o.quantity,
            "starts_on": _iso(o.starts_on), "ends_on": _iso(o.ends_on),
            "ordered_at": _iso(o.ordered_at)}


def find_tenant(s: Session, name: str, *, erased: bool = False) -> Tenant:
    t = s.scalar(select(Tenant).where(Tenant.name == name))
    if t is None or (t.status == "erased" and not erased):
        raise NotFound(f"no tenant {name!r}")
    return t


def add_tenant(
    s: Session, actor: Actor, name: str, now: dt.datetime, *, company: str | None = None,
    address: str = "", key_expires: dt.datetime | None = None,
) -> tuple[Tenant, ApiKey, str]:
    """A new tenant and its first key; the key is returned once and never stored."""
    if not valid_tenant_name(name):
        raise RegisterError(
            f"invalid tenant name {name!r}: 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit")
    if s.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise Conflict(f"tenant {name!r} already exists (or is erased and kept for accounting)")
    t = Tenant(name=name, company_name=company or name, company_address=address,
               status="active", created_at=now)
    s.add(t)
    s.flush()
    k, key = _new_key(s, t, now, key_expires)
    audit(s, actor, "tenant-add", now, tenant=name, key_id=k.id)
    return t, k, key


def _new_key(s: Session, t: Tenant, now: dt.datetime, expires: dt.datetime | None) -> tuple[ApiKey, str]:
    key = generate_key(t.name)
    k = ApiKey(tenant=t, prefix=display_prefix(key), key_hash=hash_key(key),
               created_at=now, expires_at=expires)
    s.add(k)
    s.flush()
    return k, key


def list_tenants(s: Session, actor: Actor, now: dt.datetime, *, include_erased: bool = False) -> list[Tenant]:
    stmt = select(Tenant).order_by(Tenant.name)
    if not include_erased:
        stmt = stmt.where(Tenant.status != "erased")
    tenants = list(s.scalars(stmt))
    audit(s, actor, "tenant-list", now, count=len(tenants))
    return tenants


def show_tenant(s: Session, actor: Actor, name: str, now: dt.datetime) -> dict[str, Any]:
    t = find_tenant(s, name, erased=True)
    audit(s, actor, "tenant-show", now, tenant=name)
    return {
        **tenant_dict(t),
        "billing": billing_dict(t.billing),
        "orders": [order_dict(o) for o in t.orders],
        "keys": [key_dict(k, now) for k in t.keys],
        "users": len(t.users),
    }


def set_tenant_status(s: Session, actor: Actor, name: str, status: str, now: dt.datetime) -> Tenant:
    t = find_tenant(s, name)
    t.status = status
    audit(s, actor, f"tenant-{'enable' if status == 'active' else 'disable'}", now, tenant=name)
    return t


def update_tenant(
    s: Session, actor: Actor, name: str, now: dt.datetime, *,
    company: str | None = None, address: str | None = None,
) -> Tenant:
    t = find_tenant(s, name)
    changed = []
    if company is not None:
        t.company_name, changed = company, [*changed, "company_name"]
    if address is not None:
        t.company_address, changed = address, [*changed, "company_address"]
    audit(s, actor, "tenant-update", now, tenant=name, fields=changed)
    return t


def create_key(
    s: Session, actor: Actor, tenant: str, now: dt.datetime, expires: dt.datetime | None = None,
) -> tuple[ApiKey, str]:
    t = find_tenant(s, tenant)
    k, key = _new_key(s, t, now, expires)
    audit(s, actor, "key-create", now, tenant=tenant, key_id=k.id)
    return k, key


def revoke_key(s: Session, actor: Actor, key_id: int, now: dt.datetime) -> ApiKey:
    k = s.get(ApiKey, key_id)
    if k is None or k.tenant.status == "erased":
        raise NotFound(f"no key {key_id}")
    if k.revoked_at is None:
        k.revoked_at = now
    audit(s, actor, "key-revoke", now, tenant=k.tenant.name, key_id=key_id)
    return k


def list_keys(s: Session, actor: Actor, now: dt.datetime, tenant: str | None = None) -> list[ApiKey]:
    stmt = select(ApiKey).join(Tenant).where(Tenant.status != "erased").order_by(ApiKey.id)
    if tenant is not None:
        find_tenant(s, tenant)
        stmt = stmt.where(Tenant.name == tenant)
    keys = list(s.scalars(stmt))
    audit(s, actor, "key-list", now, tenant=tenant)
    return keys


# A payment method is stored as the provider's reference ("pm_...", "invoice"),
# never as a card number: anything that looks like one is refused.
_DIGITS = re.compile(r"\d")


def _looks_like_card_number(value: str) -> bool:
    digits = "".join(_DIGITS.findall(value))
    if not 12 <= len(digits) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):  # Luhn
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def set_billing(
    s: Session, actor: Actor, tenant: str, now: dt.datetime, *,
    contact: str | None = None, address: str | None = None, payment_ref: str | None = None,
) -> BillingAccount:
    if payment_ref is not None and _looks_like_card_number(payment_ref):
        raise RegisterError(
            "payment_ref looks like a card number: store the payment provider's reference, never the card")
    t = find_tenant(s, tenant)
    b = t.billing
    if b is None:
        b = t.billing = BillingAccount(contact="", address="", payment_ref="", updated_at=now)
    fields = []
    for attr, value in (("contact", contact), ("address", address), ("payment_ref", payment_ref)):
        if value is not None:
            setattr(b, attr, value)
            fields.append(attr)
    b.updated_at = now
    audit(s, actor, "billing-update", now, tenant=tenant, fields=fields)
    return b


def add_order(
    s: Session, actor: Actor, tenant: str, now: dt.datetime, *, product: str, quantity: int = 1,
    starts_on: dt.date | None = None, ends_on: dt.date | None = None,
) -> Order:
    if quantity <= 0:
        raise RegisterError("quantity must be positive")
    t = find_tenant(s, tenant)
    o = Order(product=product, quantity=quantity, starts_on=starts_on or now.date(),
              ends_on=ends_on, ordered_at=now)
    t.orders.append(o)
    s.flush()
    audit(s, actor, "order-add", now, tenant=tenant, order_id=o.id)
    return o


# --- client certificates ([tls] client_certificates, register.auth) ---------


def add_certificate(s: Session, actor: Actor, tenant: str, pem: bytes, now: dt.datetime) -> ClientCertificate:
    """Bind the (first) certificate of a PEM file to ``tenant`` by its SHA-256;
    the gateways take it within [auth] refresh_interval (at once on PostgreSQL)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise RegisterError("not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    not_after = cert.not_valid_after_utc
    if not_after <= now:
        raise RegisterError(f"the certificate expired on {not_after.isoformat()}")
    sha256 = cert.fingerprint(hashes.SHA256()).hex()
    t = find_tenant(s, tenant)
    bound = s.scalar(select(ClientCertificate).where(ClientCertificate.sha256 == sha256))
    if bound is not None:
        raise Conflict(f"certificate {sha256} is already bound to tenant {bound.tenant.name!r}"
                       + (" (revoked)" if bound.revoked_at else ""))
    c = ClientCertificate(tenant=t, sha256=sha256, not_after=not_after, created_at=now)
    s.add(c)
    s.flush()
    audit(s, actor, "cert-add", now, tenant=tenant, sha256=sha256)
    return c


def revoke_certificate(s: Session, actor: Actor, tenant: str, fingerprint: str, now: dt.datetime) -> ClientCertificate:
    from gateway.tls import normalise_fingerprint

    sha256 = normalise_fingerprint(fingerprint)
    if sha256 is None:
        raise RegisterError("a fingerprint is 64 hex digits (colons allowed), as `tenant cert list` shows")
    t = find_tenant(s, tenant)
    c = s.scalar(select(ClientCertificate).where(ClientCertificate.sha256 == sha256,
                                                 ClientCertificate.tenant_id == t.id))
    if c is None:
        raise NotFound(f"no certificate {sha256} bound to tenant {tenant!r}")
    if c.revoked_at is None:
        c.revoked_at = now
    audit(s, actor, "cert-revoke", now, tenant=tenant, sha256=sha256)
    return c


def list_certificates(s: Session, actor: Actor, now: dt.datetime, tenant: str | None = None) -> list[ClientCertificate]:
    stmt = (select(ClientCertificate).join(Tenant).where(Tenant.status != "erased")
            .order_by(ClientCertificate.id))
    if tenant is not None:
        find_tenant(s, tenant)
        stmt = stmt.where(Tenant.name == tenant)
    certs = list(s.scalars(stmt))
    audit(s, actor, "cert-list", now, tenant=tenant)
    return certs
