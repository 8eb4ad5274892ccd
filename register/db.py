"""Opening the register: engines, the schema check and programmatic migrations.

``open_register(url, upgrade=...)`` is the one door: it connects, compares the
database's Alembic revision with the migrations shipped inside this package
and either upgrades (under a lock, so several gateway processes starting
together do not race) or refuses with a message that says what to run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from gateway.config import GatewayConfig

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DEFAULT_SQLITE_NAME = "register.sqlite3"
# Any constant: the PostgreSQL advisory lock that serialises concurrent upgrades.
_PG_UPGRADE_LOCK = 0x1CA9_0003


class RegisterError(Exception):
    """The register cannot be used; ``str()`` tells an admin what to do."""


class SchemaError(RegisterError):
    pass


def database_url(config: GatewayConfig) -> str:
    """``[register] database``, else the SQLite file under ``[server] state_dir``."""
    if config.register.database:
        return config.register.database
    return f"sqlite:///{config.state_path(DEFAULT_SQLITE_NAME)}"


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # Cascading deletes (erasure) rely on foreign keys, which SQLite leaves off.
    cur.execute("PRAGMA foreign_keys=ON")
    # WAL lets CLI readers work while the gateway's writer writes.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def _private_file(path: Path) -> None:
    """Create the SQLite file readable by its owner only: it holds personal
    data (notice section 9).  SQLite gives its -wal and -shm files the same mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def create_register_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            _private_file(Path(u.database))
        engine = create_engine(u)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if u.get_backend_name() == "postgresql":
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        connect_args = {"connect_timeout": 5}
        return create_engine(u, pool_pre_ping=True, pool_size=2, max_overflow=2,
                             connect_args=connect_args)
    raise RegisterError(f"{redacted(url)}: the register supports SQLite and PostgreSQL only")


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    db = engine.url.database
    if not db or db == ":memory:":
        yield
        return
    with open(f"{db}.upgrade-lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def upgrade_schema(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; returns (before, after)."""
    cfg = alembic_config()
    lock = _sqlite_file_lock(engine) if engine.dialect.name == "sqlite" else contextlib.nullcontext()
    with lock, engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_UPGRADE_LOCK})
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return before, head_revision()


def check_schema(engine: Engine, *, upgrade: bool) -> str:
    """Upgrade or verify the schema; returns the revision in use."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    current = current_revision(engine)
    if current == head:
        return current  # type: ignore[return-value]
    known = {rev.revision for rev in script.walk_revisions()}
    where = redacted(str(engine.url))
    if current is not None and current not in known:
        raise SchemaError(
            f"register {where}: schema revision {current} is newer than this gateway knows "
            f"(newest here: {head}); upgrade the gateway, not the database")
    if not upgrade:
        have = f"revision {current}" if current else "no register schema"
        raise SchemaError(
            f"register {where}: has {have}, this gateway needs revision {head}; run "
            "`icap-gateway register upgrade --config FILE` or set [register] auto_upgrade = true")
    upgrade_schema(engine)
    return head  # type: ignore[return-value]


def open_register(url: str, upgrade: bool) -> Engine:
    """Connect to the register and make sure its schema is current.

    Raises ``RegisterError`` with an admin-readable message when the database
    is unreachable or its schema is old (and ``upgrade`` is false) or newer.
    """
    engine = create_register_engine(url)
    try:
        check_schema(engine, upgrade=upgrade)
    except SchemaError:
        engine.dispose()
        raise
    except SQLAlchemyError as e:
        engine.dispose()
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise RegisterError(f"register {redacted(url)}: cannot open: {reason}") from e
    return engine


def open_from_config(config: GatewayConfig, upgrade: bool | None = None) -> Engine:
    return open_register(
        database_url(config), config.register.auto_upgrade if upgrade is None else upgrade)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # Objects stay usable after commit: the CLI prints them afterwards.
    return sessionmaker(engine, expire_on_commit=False)


__all__ = [
    "RegisterError",
    "SchemaError",
    "check_schema",
    "create_register_engine",
    "current_revision",
    "database_url",
    "head_revision",
    "open_from_config",
    "open_register",
    "redacted",
    "session_factory",
    "upgrade_schema",
]

