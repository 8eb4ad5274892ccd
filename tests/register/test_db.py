"""Schema check and programmatic migrations on both databases."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from register.db import (
    RegisterError,
    SchemaError,
    create_register_engine,
    current_revision,
    database_url,
    head_revision,
    open_register,
)
from register.models import Base


def test_empty_database_refused_without_upgrade(fresh_url: str) -> None:
    with pytest.raises(SchemaError) as e:
        open_register(fresh_url, upgrade=False)
    msg = str(e.value)
    assert "no register schema" in msg and "icap-gateway register upgrade" in msg
    assert "auto_upgrade" in msg


def test_upgrade_creates_the_schema_matching_the_models(fresh_url: str) -> None:
    engine = open_register(fresh_url, upgrade=True)
    try:
        assert current_revision(engine) == head_revision()
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                    Base.metadata)
        assert diff == []  # the migrations build exactly what the models describe
        # Opening again without upgrading is fine now.
        open_register(fresh_url, upgrade=False).dispose()
    finally:
        engine.dispose()


def test_old_schema_refused_then_upgraded(fresh_url: str) -> None:
    engine = create_register_engine(fresh_url)
    from alembic import command

    from register.db import alembic_config
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
        command.downgrade(cfg, "base")  # the downgrade path works too
    engine.dispose()
    with pytest.raises(SchemaError):
        open_register(fresh_url, upgrade=False)
    open_register(fresh_url, upgrade=True).dispose()


def test_newer_schema_refused_even_with_upgrade(fresh_url: str) -> None:
    engine = open_register(fresh_url, upgrade=True)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="newer than this gateway knows"):
        open_register(fresh_url, upgrade=True)


def test_unreachable_database_is_a_clear_error() -> None:
    url = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/nowhere"
    with pytest.raises(RegisterError) as e:
        open_register(url, upgrade=True)
    assert "cannot open" in str(e.value) and "s3cret" not in str(e.value)


def test_default_url_is_sqlite_under_state_dir(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.config import GatewayConfig, with_overrides

    config = with_overrides(GatewayConfig(), server__state_dir=str(tmp_path / "state"))
    assert database_url(config) == f"sqlite:///{tmp_path}/state/register.sqlite3"
    engine = open_register(database_url(config), upgrade=True)
    engine.dispose()
    assert (tmp_path / "state" / "register.sqlite3").exists()
    assert database_url(with_overrides(config, register__database="sqlite:///x.db")) == "sqlite:///x.db"


def test_sqlite_file_is_private(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "new" / "register.sqlite3"
    engine = open_register(f"sqlite:///{path}", upgrade=True)
    engine.dispose()
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_a_register_at_0001_upgrades_and_then_announces_key_changes(fresh_url: str) -> None:
    """Existing registers get migration 0002; on PostgreSQL a change of keys
    or tenants is then NOTIFYed to the gateways when it commits."""
    import psycopg
    from alembic import command
    from sqlalchemy.orm import Session

    from register.db import alembic_config
    from register.listener import KEY_CHANNEL
    from tests.register.helpers import add_tenant

    engine = create_register_engine(fresh_url)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    engine.dispose()
    engine = open_register(fresh_url, upgrade=True)
    try:
        assert current_revision(engine) == head_revision()
        if engine.dialect.name != "postgresql":
            add_tenant(engine, "acme")  # SQLite: no trigger, and nothing breaks
            return
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        with psycopg.Connection.connect(*cargs, **cparams, autocommit=True) as listen:
            schema = listen.execute(
                "SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = to_regclass('api_keys')"
            ).fetchone()[0]  # type: ignore[index]
            listen.execute(f"LISTEN {KEY_CHANNEL}")
            add_tenant(engine, "acme")
            heard = [n.payload for n in listen.notifies(timeout=5, stop_after=1)]
            assert heard == [schema]
            with Session(engine) as s, s.begin():  # rolled back: nothing is announced
                s.execute(text("UPDATE tenants SET status = 'disabled'"))
                s.rollback()
            assert [n.payload for n in listen.notifies(timeout=0.3)] == []
    finally:
        engine.dispose()
