"""The register holds what notice section 5 lists and no more."""

from __future__ import annotations

from sqlalchemy import Engine, text

from register.models import Base
from register.notice import CATEGORIES, NOT_PERSONAL, classify, render
from register.settings import RegisterSettings


def test_every_column_says_which_notice_item_it_is() -> None:
    for table in Base.metadata.sorted_tables:
        for col in table.columns:
            assert col.info.get("notice") in set(CATEGORIES) | NOT_PERSONAL, f"{table.name}.{col.name}"


def test_live_schema_holds_exactly_the_notice_items(engine: Engine) -> None:
    schema = classify(engine)
    assert schema.unclassified == []
    assert list(schema.present) == list(CATEGORIES)  # all eight, in the notice's order
    assert "login_records.client_ip" in schema.present["ip-address"]
    assert "auth_failures.reason" in schema.present["auth-failure"]


def test_a_column_the_notice_does_not_know_is_reported(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE users ADD COLUMN phone VARCHAR(20)"))
        conn.execute(text("CREATE TABLE marketing (id INTEGER PRIMARY KEY)"))
    try:
        schema = classify(engine)
        assert schema.unclassified == ["users.phone", "marketing.*"]
        assert "users.phone" in render(RegisterSettings(), schema, "en")
    finally:  # the PostgreSQL schema is shared by the session's tests
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE marketing"))
            conn.execute(text("ALTER TABLE users DROP COLUMN phone"))
