"""TLS client certificates bound to tenants; refused certificates' fingerprints

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

client_certificates: a tenant's certificates by SHA-256 fingerprint
(``icap-gateway tenant cert add``), changes NOTIFYing the gateways on
PostgreSQL like api_keys (0002's function).  auth_failures.client_cert_sha256:
the fingerprint of a certificate the gateway refused.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('client_certificates',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('not_after', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_client_certificates_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_client_certificates')),
    sa.UniqueConstraint('sha256', name=op.f('uq_client_certificates_sha256'))
    )
    with op.batch_alter_table('client_certificates', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_client_certificates_tenant_id'), ['tenant_id'], unique=False)
    with op.batch_alter_table('auth_failures', schema=None) as batch_op:
        batch_op.add_column(sa.Column('client_cert_sha256', sa.String(length=64), nullable=True))
    if op.get_context().dialect.name == "postgresql":
        op.execute(
            "CREATE TRIGGER client_certificates_notify_gateways "
            "AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON client_certificates "
            "FOR EACH STATEMENT EXECUTE FUNCTION register_keys_changed()")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS client_certificates_notify_gateways ON client_certificates")
    with op.batch_alter_table('auth_failures', schema=None) as batch_op:
        batch_op.drop_column('client_cert_sha256')
    with op.batch_alter_table('client_certificates', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_client_certificates_tenant_id'))
    op.drop_table('client_certificates')
