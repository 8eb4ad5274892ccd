"""Config sections of the register and of tenant authentication.

``[register]`` says where the register lives, how long each kind of record is
kept (notice section 7) and who the controller is (notice sections 1-2, printed
by ``icap-gateway register notice``).  ``[auth]`` says how ICAP requests are
authenticated and how end users are identified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.settings import non_negative, positive, setting


def _header_name(value: Any) -> str | None:
    if not value or any(c in value for c in " :\t\r\n"):
        return "expected an HTTP header name such as X-Client-IP"
    return None


def _optional_header_name(value: Any) -> str | None:
    return None if value == "" else _header_name(value)


def _sqlalchemy_url(value: Any) -> str | None:
    if value == "":
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError as e:
        return f"not a database URL: {e}"
    if url.get_backend_name() not in {"sqlite", "postgresql"}:
        return "the register supports sqlite:/// and postgresql+psycopg:// URLs"
    return None


@dataclass(frozen=True)
class RegisterSettings:
    database: str = setting(
        "",
        "SQLAlchemy URL of the register (sqlite:///path or postgresql+psycopg://user@host/db); "
        "empty: SQLite file register.sqlite3 under [server] state_dir",
        validate=_sqlalchemy_url,
    )
    auto_upgrade: bool = setting(
        True,
        "Upgrade an old register schema at start; false: refuse to start until "
        "`icap-gateway register upgrade` is run",
    )
    # --- the background writer (notice section 5 data reaches the DB through it)
    flush_interval: float = setting(
        1.0, "Seconds between batched writes of login records and failures",
        kind="duration", validate=positive,
    )
    batch_size: int = setting(1000, "Most records written in one transaction", validate=positive)
    max_queue: int = setting(
        100_000, "Records held in memory while the database is unreachable; beyond: dropped and counted",
        validate=positive,
    )
    login_idle_gap: float = setting(
        1800.0, "A user idle for longer than this starts a new login record",
        kind="duration", validate=positive,
    )
    # --- retention (notice section 7)
    login_retention: float = setting(
        90 * 86400.0, "Login records are deleted this long after their last activity",
        kind="duration", validate=positive,
    )
    failure_retention: float = setting(
        30 * 86400.0, "Authentication-failure records are deleted after this long",
        kind="duration", validate=positive,
    )
    billing_retention: float = setting(
        2557 * 86400.0,
        "Billing and order data of an erased tenant are kept this long after the last order "
        "(Finnish Accounting Act 2:10: six years after the end of the financial year)",
        kind="duration", validate=positive,
    )
    audit_retention: float = setting(
        730 * 86400.0, "Operator audit records (who read, exported or erased what) are kept this long",
        kind="duration", validate=positive,
    )
    purge_interval: float = setting(
        3600.0, "How often a running gateway enforces the retention periods (0: never)",
        kind="duration", validate=non_negative,
    )
    # --- the controller, for the generated privacy notice (sections 1-3)
    controller: str = setting("", "Controller: the company that runs the service")
    controller_address: str = setting("", "Controller's street address")
    contact_name: str = setting("", "Named contact person for register matters")
    contact_email: str = setting("", "E-mail address for register (GDPR) matters")
    register_name: str = setting("", "Name of the register (empty: \"<controller>'s anti-virus service\")")


@dataclass(frozen=True)
class AuthSettings:
    required: bool = setting(True, "REQMOD/RESPMOD need a tenant key (Authorization: Bearer <key>)")
    refresh_interval: float = setting(
        10.0, "Seconds between reloads of the key table: how soon a new or revoked key takes effect",
        kind="duration", validate=positive,
    )
    tenant_header: str = setting(
        "", "ICAP header naming the tenant, recorded with a failed authentication (empty: none)",
        validate=_optional_header_name,
    )
    failure_burst: int = setting(
        20, "Authentication failures one source IP may have before it is rate limited (0: no limit)",
        validate=non_negative,
    )
    failure_interval: float = setting(
        3.0, "A rate-limited source IP earns back one allowed failure every this many seconds",
        kind="duration", validate=positive,
    )
    user_header: str = setting(
        "X-Authenticated-User", "ICAP header carrying the end user's name (Squid: X-Authenticated-User)",
        validate=_header_name,
    )
    user_encoding: Literal["base64", "plain"] = setting(
        "base64", "How the user header is encoded: base64 (Squid's default) or plain"
    )
    client_ip_header: str = setting(
        "X-Client-IP", "ICAP header carrying the end user's IP address (else the peer's address)",
        validate=_header_name,
    )
