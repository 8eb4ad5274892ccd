"""Tenant API keys: generation, hashing and the visible parts of a key.

A key looks like ``icgw.<tenant>.<43 random characters>``: 256 bits from
``secrets.token_urlsafe(32)``, so a plain SHA-256 is a sound way to store it
(nothing to brute force, no slow KDF needed on the request path).  The tenant
name in the middle lets a refused request be attributed to the tenant it
claims to be, without ever storing the secret part.
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_SCHEME = "icgw"
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # whole string: fullmatch (a "$" lets "acme\n" in)
_SHOWN_SECRET_CHARS = 6  # the start of the secret shown in `key list` to tell keys apart


def valid_tenant_name(name: str) -> bool:
    return TENANT_NAME.fullmatch(name) is not None


def generate_key(tenant_name: str) -> str:
    if not valid_tenant_name(tenant_name):
        raise ValueError(f"invalid tenant name {tenant_name!r}")
    return f"{KEY_SCHEME}.{tenant_name}.{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def display_prefix(key: str) -> str:
    """The part of a key safe to show and store beside its hash."""
    scheme, tenant, secret = key.split(".", 2)
    return f"{scheme}.{tenant}.{secret[:_SHOWN_SECRET_CHARS]}"


def claimed_tenant(key: str) -> str | None:
    """The tenant name a key claims (unverified); None if it is not our format."""
    parts = key.split(".", 2)
    if len(parts) != 3 or parts[0] != KEY_SCHEME or not valid_tenant_name(parts[1]):
        return None
    return parts[1]


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` value, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value or None
