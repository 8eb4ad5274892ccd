"""notify the gateways when keys or tenants change (PostgreSQL)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Every statement that changes api_keys or tenants sends a NOTIFY on the
channel the gateways LISTEN on (register.listener), delivered when its
transaction commits: a key created, revoked or a tenant disabled with the
CLI, or by hand in psql, reaches every node at once.  The payload is the
schema of the changed table, so registers in other schemas of the same
database are not woken.
SQLite has no NOTIFY: single-node gateways keep the reload timer alone.
The channel name is frozen here (register.listener.KEY_CHANNEL must match).
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_TABLES = ("api_keys", "tenants")


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE FUNCTION register_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM pg_notify('icap_gateway_keys', TG_TABLE_SCHEMA); RETURN NULL; END $$")
    for table in _TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_notify_gateways "
            f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION register_keys_changed()")


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    for table in _TABLES:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_notify_gateways ON {table}")
    op.execute("DROP FUNCTION IF EXISTS register_keys_changed()")
