"""Config sections of the register and of tenant authentication."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.settings import setting


@dataclass(frozen=True)
class RegisterSettings:
    database: str = setting("", "SQLAlchemy URL of the register; empty: SQLite file under state_dir")


@dataclass(frozen=True)
class AuthSettings:
    required: bool = setting(True, "REQMOD/RESPMOD need a tenant key (Authorization: Bearer <key>)")
