"""The register's tables (SQLAlchemy 2).

Privacy notice section 5 lists what the register holds, and the tables hold
that and no more.  Every column says which notice item it belongs to in
``info["notice"]`` (or ``"internal"`` for keys, links and states that are not
personal data); ``register.notice`` builds section 5 from these annotations
and a test fails when a column lacks one, so the schema and the published
notice cannot drift apart silently.

Notice items: company-name, company-address, billing, orders, username,
ip-address, login-time, auth-failure.  The controller's own records
(operators, audit log) are marked ``controller``: they are about the
controller's staff and their use of the register (notice section 9).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from register.limits import IP_MAX, REASON_MAX, SHA256_HEX, TENANT_NAME_MAX, USERNAME_MAX

UTC = dt.UTC

# Explicit constraint names keep Alembic migrations identical on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}



class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timestamps in UTC, aware in Python on both databases (SQLite has no zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the register; use UTC-aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _col(notice: str, *args: Any, **kwargs: Any) -> Any:
    info = kwargs.pop("info", {})
    info["notice"] = notice
    return mapped_column(*args, info=info, **kwargs)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Tenant(Base):
    """A customer company.  ``name`` is its short identifier (in keys and logs)."""

    __tablename__ = "tenants"

    id: Mapped[int] = _col("internal", Integer, primary_key=True)
    name: Mapped[str] = _col("company-name", String(TENANT_NAME_MAX), unique=True)
    company_name: Mapped[str] = _col("company-name", String(255))
    company_address: Mapped[str] = _col("company-address", Text, default="")
    status: Mapped[str] = _col("internal", String(16), default="active")  # active|disabled|erased
    created_at: Mapped[dt.datetime] = _col("internal", UTCDateTime)
    # Set when the tenant is erased but billing data must stay (accounting law).
    retain_until: Mapped[dt.datetime | None] = _col("internal", UTCDateTime, nullable=True)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="tenant", cascade="all, delete-orphan")
    certificates: Mapped[list[ClientCertificate]] = relationship(
        back_populates="tenant", cascade="all, delete-orphan", order_by="ClientCertificate.id")
    users: Mapped[list[User]] = relationship(back_populates="tenant", cascade="all, delete-orphan")
    orders: Mapped[list[Order]] = relationship(cascade="all, delete-orphan")
    billing: Mapped[BillingAccount | None] = relationship(cascade="all, delete-orphan")


class BillingAccount(Base):
    """Payment and billing data.  ``payment_ref`` is a reference to a payment
    method held by the payment provider (or e.g. "invoice"), never a card number."""

    __tablename__ = "billing_accounts"

    id: Mapped[int] = _col("internal", Integer, primary_key=True)
    tenant_id: Mapped[int] = _col(
        "internal", ForeignKey("tenants.id", ondelete="CASCADE"), unique=True)
    contact: Mapped[str] = _col("billing", String(255), default="")
    address: Mapped[str] = _col("billing", Text, default="")
    payment_ref: Mapped[str] = _col("billing", String(64), default="")
    updated_at: Mapped[dt.datetime] = _col("billing", UTCDateTime)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = _col("internal", Integer, primary_key=True)
    tenant_id: Mapped[int] = _col(
        "internal", ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    product: Mapped[str] = _col("orders", String(128))
    quantity: Mapped[int] = _col("orders", Integer, default=1)
    starts_on: Mapped[dt.date] = _col("orders", Date)
    ends_on: Mapped[dt.date | None] = _col("orders", Date, nullable=True)
    ordered_at: Mapped[dt.datetime] = _col("orders", UTCDateTime)


class ApiKey(Base):
    """A tenant's ICAP key: only its SHA-256 is stored (the key is random, so a
    fast hash is enough); ``prefix`` is the visible start for telling keys apart."""

    __tablename__ = "api_keys"

    id: Mapped[int] = _col("internal", Integer, primary_key=True)
    tenant_id: Mapped[int] = _col(
        "internal", ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = _col("internal", String(96))
    key_hash: Mapped[str] = _col("internal", String(64), unique=True)
    created_at: Mapped[dt.datetime] = _col("internal", UTCDateTime)
    expires_at: Mapped[dt.datetime | None] = _col("internal", UTCDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = _col("internal", UTCDateTime, nullable=True)

    tenant: Mapped[Tenant] = relationship(back_populates="keys")


class ClientCertificate(Base):
    """A TLS client certificate bound to a tenant (``tenant cert add``): a
    connection presenting it is that tenant without a key.  Only the
    fingerprint and validity are kept, never the certificate: like a key's
    hash, a credential's identifier, not personal data."""

    __tablename__ = "client_certificates"

    id: Mapped[int] = _col("internal", Integer, primary_key=True)
    tenant_id: Mapped[int] = _col(
        "internal", ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = _col("internal", String(SHA256_HEX), unique=True)
    not_after: Mapped[dt.datetime] = _col("internal", UTCDateTime)
    created_at: Mapped[dt.datetime] = _col("internal", UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = _col("internal", UTCDateTime, nullable=True)

    tenant: Mapped[Tenant] = relationship(back_populates="certificates")


class User(Base):
    """An end user behind a tenant's proxy: the username and nothing else."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "username", name="uq_users_tenant_username"),)

    id: Mapped[int] = _col("internal", Integer, primary_key=True)
    tenant_id: Mapped[int] = _col("internal", ForeignKey("tenants.id", ondelete="CASCADE"))
    username: Mapped[str] = _col("username", String(USERNAME_MAX))

    tenant: Mapped[Tenant] = relationship(back_populates="users")
    logins: Mapped[list[LoginRecord]] = relationship(
        back_populates="user", cascade="all, delete-orphan", order_by="LoginRecord.login_at")


class LoginRecord(Base):
    """One stretch of activity of a user from one IP address: it starts at the
    first request and ``last_seen`` moves until the user is idle for longer
    than ``[register] login_idle_gap``."""

    __tablename__ = "login_records"
    __table_args__ = (
        Index("ix_login_records_user_ip_seen", "user_id", "client_ip", "last_seen"),
    )

    id: Mapped[int] = _col("internal", Integer, primary_key=True)
    user_id: Mapped[int] = _col("internal", ForeignKey("users.id", ondelete="CASCADE"))
    client_ip: Mapped[str] = _col("ip-address", String(IP_MAX))
    login_at: Mapped[dt.datetime] = _col("login-time", UTCDateTime)
    last_seen: Mapped[dt.datetime] = _col("login-time", UTCDateTime, index=True)

    user: Mapped[User] = relationship(back_populates="logins")


class AuthFailureRecord(Base):
    """A refused ICAP authentication.  Never holds the key that was presented."""

    __tablename__ = "auth_failures"

    id: Mapped[int] = _col("internal", Integer, primary_key=True)
    at: Mapped[dt.datetime] = _col("auth-failure", UTCDateTime, index=True)
    source_ip: Mapped[str] = _col("ip-address", String(IP_MAX))
    # Only ever a known tenant's name (see register.auth), so junk or a
    # mistyped secret is never stored here.
    tenant_presented: Mapped[str | None] = _col(
        "auth-failure", String(TENANT_NAME_MAX), nullable=True, index=True)
    reason: Mapped[str] = _col("auth-failure", String(REASON_MAX))
    # The fingerprint of a refused TLS client certificate (never its bytes).
    client_cert_sha256: Mapped[str | None] = _col("auth-failure", String(SHA256_HEX), nullable=True)


class Operator(Base):
    """A named member of the controller's staff with access to the register."""

    __tablename__ = "operators"

    id: Mapped[int] = _col("controller", Integer, primary_key=True)
    name: Mapped[str] = _col("controller", String(64), unique=True)
    role: Mapped[str] = _col("controller", String(16))  # viewer | admin
    created_at: Mapped[dt.datetime] = _col("controller", UTCDateTime)
    created_by: Mapped[str] = _col("controller", String(64))
    disabled_at: Mapped[dt.datetime | None] = _col("controller", UTCDateTime, nullable=True)


class AuditRecord(Base):
    """Who read, exported, changed or erased which personal data, and when."""

    __tablename__ = "audit_log"

    id: Mapped[int] = _col("controller", Integer, primary_key=True)
    at: Mapped[dt.datetime] = _col("controller", UTCDateTime, index=True)
    operator: Mapped[str] = _col("controller", String(64))
    action: Mapped[str] = _col("controller", String(32))
    tenant: Mapped[str | None] = _col("controller", String(TENANT_NAME_MAX), nullable=True, index=True)
    subject_user: Mapped[str | None] = _col("controller", String(USERNAME_MAX + 8), nullable=True)
    detail: Mapped[str] = _col("controller", Text, default="")


__all__ = [
    "IP_MAX",  # the column widths, from register.limits
    "REASON_MAX",
    "SHA256_HEX",
    "TENANT_NAME_MAX",
    "USERNAME_MAX",
    "ApiKey",
    "AuditRecord",
    "AuthFailureRecord",
    "Base",
    "BillingAccount",
    "ClientCertificate",
    "LoginRecord",
    "Operator",
    "Order",
    "Tenant",
    "User",
]
