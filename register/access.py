"""Who may use the register, and the record of what they did (notice section 9).

Every command that reads or changes personal data acts as a named operator:
``--operator NAME``, else ``$ICAP_GATEWAY_OPERATOR``, else the OS user.  The
name must be an operator row with a role that allows the action (viewer:
read and export; admin: also change, erase, purge and manage operators), and
the action leaves an audit record in the same transaction as the action, so
there is no change without its record.  When no operator exists yet, the
first ``operator add NAME --role admin`` bootstraps the register.

What protects the data itself is access to the database (file permissions,
PostgreSQL credentials); the operator layer names the person behind every
access and keeps routine tools from touching data they have no role for.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from register.db import RegisterError
from register.models import AuditRecord, Operator

Role = Literal["viewer", "admin"]
ROLES: dict[str, int] = {"viewer": 1, "admin": 2}
OPERATOR_ENV = "ICAP_GATEWAY_OPERATOR"
SYSTEM_RETENTION = "system:retention"  # the operator name of the gateway's own purge timer


class AccessDenied(RegisterError):
    pass


class NotFound(RegisterError):
    pass


class Conflict(RegisterError):
    pass


@dataclass(frozen=True)
class Actor:
    name: str
    role: str


def operator_name(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    env = os.environ.get(OPERATOR_ENV)
    if env:
        return env
    try:
        return getpass.getuser()
    except Exception as e:  # no user name in this environment (containers)
        raise AccessDenied(f"cannot tell who you are: pass --operator NAME or set {OPERATOR_ENV}") from e


def require(s: Session, name: str, role: Role) -> Actor:
    """The operator ``name`` if it exists, is enabled and has ``role`` or more."""
    op = s.scalar(select(Operator).where(Operator.name == name))
    if op is None or op.disabled_at is not None:
        if s.scalar(select(func.count()).select_from(Operator)) == 0:
            raise AccessDenied(
                "the register has no operators yet: create the first with "
                "`icap-gateway operator add NAME --role admin`")
        raise AccessDenied(
            f"{name!r} is not an operator of the register (pass --operator NAME, set "
            f"{OPERATOR_ENV}, or ask an admin to run `icap-gateway operator add {name}`)")
    if ROLES.get(op.role, 0) < ROLES[role]:
        raise AccessDenied(f"operator {name!r} has role {op.role!r}; this needs {role!r}")
    return Actor(op.name, op.role)


def audit(
    s: Session,
    actor: Actor | str,
    action: str,
    now: dt.datetime,
    *,
    tenant: str | None = None,
    user: str | None = None,
    **detail: Any,
) -> None:
    s.add(AuditRecord(
        at=now, operator=actor if isinstance(actor, str) else actor.name, action=action,
        tenant=tenant, subject_user=user,
        detail=json.dumps(detail, sort_keys=True, default=str) if detail else ""))


def add_operator(s: Session, acting: str, name: str, role: Role, now: dt.datetime) -> Operator:
    """Add an operator; the first one needs no existing admin (bootstrap)."""
    if role not in ROLES:
        raise RegisterError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    if not name or len(name) > 64:
        raise RegisterError("an operator name is 1 to 64 characters")
    bootstrap = s.scalar(select(func.count()).select_from(Operator)) == 0
    if bootstrap:
        if role != "admin":
            raise AccessDenied("the first operator must be an admin (--role admin)")
        actor = Actor(acting, "admin")
    else:
        actor = require(s, acting, "admin")
    existing = s.scalar(select(Operator).where(Operator.name == name))
    if existing is not None:
        if existing.disabled_at is None:
            raise Conflict(f"operator {name!r} already exists")
        existing.disabled_at = None
        existing.role = role
        op = existing
    else:
        op = Operator(name=name, role=role, created_at=now, created_by=actor.name)
        s.add(op)
    audit(s, actor, "operator-add", now, operator=name, role=role, bootstrap=bootstrap)
    return op


def remove_operator(s: Session, acting: str, name: str, now: dt.datetime) -> None:
    actor = require(s, acting, "admin")
    op = s.scalar(select(Operator).where(Operator.name == name, Operator.disabled_at.is_(None)))
    if op is None:
        raise NotFound(f"no operator {name!r}")
    admins = s.scalar(select(func.count()).select_from(Operator).where(
        Operator.role == "admin", Operator.disabled_at.is_(None)))
    if op.role == "admin" and admins == 1:
        raise Conflict("cannot remove the last admin")
    # Disabled, not deleted: the audit log keeps naming who did what.
    op.disabled_at = now
    audit(s, actor, "operator-remove", now, operator=name)


def operator_dict(op: Operator) -> dict[str, Any]:
    return {
        "name": op.name, "role": op.role, "created_at": op.created_at.isoformat(),
        "created_by": op.created_by,
        "disabled_at": op.disabled_at.isoformat() if op.disabled_at else None,
    }
