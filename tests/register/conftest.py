"""Fixtures of the register tests: every test that takes ``db_url`` or
``engine`` runs twice, on SQLite and on PostgreSQL.

PostgreSQL tests share one migrated schema per session and start from empty
tables (TRUNCATE); tests of migrations get a fresh schema of their own.  When
PostgreSQL is unreachable the tests fail if CI is set, and skip otherwise.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import Engine, create_engine, text

from register.db import create_register_engine, open_register, upgrade_schema
from register.models import Base

PG_BASE = os.environ.get("REGISTER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pg_url(schema: str) -> str:
    return f"{PG_BASE}?options={quote(f'-csearch_path={schema}')}"


_pg_state: dict[str, object] = {}


def _pg_admin() -> Engine:
    """An engine on the server, or fail/skip when it is unreachable."""
    if "error" in _pg_state:
        _unreachable(str(_pg_state["error"]))
    if "admin" not in _pg_state:
        engine = create_engine(PG_BASE, connect_args={"connect_timeout": 3},
                               isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as c:
                c.execute(text("SELECT 1"))
        except Exception as e:
            _pg_state["error"] = str(e).splitlines()[0]
            _unreachable(str(_pg_state["error"]))
        _pg_state["admin"] = engine
    return _pg_state["admin"]  # type: ignore[return-value]


def _unreachable(reason: str) -> None:
    msg = f"PostgreSQL at {PG_BASE} unreachable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI is set: the register must be tested on PostgreSQL)")
    pytest.skip(msg)


def new_pg_schema() -> str:
    schema = f"reg_test_{uuid.uuid4().hex[:12]}"
    with _pg_admin().connect() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    return schema


def drop_pg_schema(schema: str) -> None:
    with _pg_admin().connect() as c:
        c.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("register") / "template.sqlite3"
    engine = create_register_engine(f"sqlite:///{path}")
    upgrade_schema(engine)
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def _pg_schema() -> Iterator[str]:
    schema = new_pg_schema()
    engine = create_register_engine(pg_url(schema))
    upgrade_schema(engine)
    engine.dispose()
    yield schema
    drop_pg_schema(schema)


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty register."""
    if request.param == "sqlite":
        path = tmp_path / "register.sqlite3"
        shutil.copy(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"
    _pg_admin()
    schema = request.getfixturevalue("_pg_schema")
    tables = ", ".join(f'"{schema}"."{t.name}"' for t in Base.metadata.sorted_tables)
    with _pg_admin().connect() as c:
        c.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return pg_url(schema)


@pytest.fixture(params=BACKENDS)
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database without any register schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite3'}"
        return
    schema = new_pg_schema()
    yield pg_url(schema)
    drop_pg_schema(schema)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = open_register(db_url, upgrade=False)
    yield engine
    engine.dispose()


@pytest.fixture
def backend(db_url: str) -> str:
    return "postgresql" if db_url.startswith("postgresql") else "sqlite"
