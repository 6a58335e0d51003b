"""refreshes, job-scoped and expiring API keys, webhooks, exports as of an iteration

Revision ID: ccb7053a0aa5
Revises: 33e3e265dac2
Create Date: 2026-12-02 14:17:45.049100
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = 'ccb7053a0aa5'
down_revision: str | None = '33e3e265dac2'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('webhook_subscriptions',
    sa.Column('tenant_id', sa.Uuid(), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=True),
    sa.Column('url', sa.String(length=2000), nullable=False),
    sa.Column('events', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('description', sa.String(length=500), nullable=True),
    sa.Column('secret_encrypted', sa.Text(), nullable=False),
    sa.Column('allow_private_network', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_webhook_subscriptions_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_webhook_subscriptions_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_subscriptions'))
    )
    op.create_index(op.f('ix_webhook_subscriptions_job_id'), 'webhook_subscriptions', ['job_id'], unique=False)
    op.create_index(op.f('ix_webhook_subscriptions_tenant_id'), 'webhook_subscriptions', ['tenant_id'], unique=False)
    op.create_table('job_refreshes',
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('status', sa.Enum('pending', 'evaluating', 'started', name='refresh_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('student', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('extra_budget', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('reopened', sa.Boolean(), nullable=False),
    sa.Column('api_key_id', sa.Uuid(), nullable=True),
    sa.Column('student_iteration', sa.Integer(), nullable=True),
    sa.Column('iteration', sa.Integer(), nullable=True),
    sa.Column('baseline_metric', sa.Float(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], name=op.f('fk_job_refreshes_api_key_id_api_keys'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_refreshes_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_refreshes')),
    sa.UniqueConstraint('job_id', 'idempotency_key', name=op.f('uq_job_refreshes_job_id_idempotency_key'))
    )
    op.create_index('ix_job_refreshes_job_status', 'job_refreshes', ['job_id', 'status', 'created_at'], unique=False)
    op.create_table('webhook_deliveries',
    sa.Column('subscription_id', sa.Uuid(), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=True),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('event_key', sa.String(length=200), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('status', sa.Enum('pending', 'succeeded', 'failed', name='delivery_status', native_enum=False, create_constraint=True, length=32), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('response_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['subscription_id'], ['webhook_subscriptions.id'], name=op.f('fk_webhook_deliveries_subscription_id_webhook_subscriptions'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_deliveries')),
    sa.UniqueConstraint('subscription_id', 'event_key', name=op.f('uq_webhook_deliveries_subscription_id_event_key'))
    )
    op.create_index('ix_webhook_deliveries_due', 'webhook_deliveries', ['status', 'next_attempt_at'], unique=False)
    # Batch operations: SQLite (the embedded mode) cannot add a foreign key with ALTER TABLE.
    with op.batch_alter_table('api_keys') as batch:
        batch.add_column(sa.Column('job_id', sa.Uuid(), nullable=True))
        batch.add_column(sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True))
        batch.create_index(batch.f('ix_api_keys_job_id'), ['job_id'], unique=False)
        batch.create_foreign_key(batch.f('fk_api_keys_job_id_jobs'), 'jobs', ['job_id'], ['id'], ondelete='CASCADE')
    with op.batch_alter_table('exports') as batch:
        batch.add_column(sa.Column('iteration', sa.Integer(), nullable=True))
    with op.batch_alter_table('iterations') as batch:
        batch.add_column(sa.Column('note', sa.Text(), nullable=True))
        batch.add_column(sa.Column('refresh_id', sa.Uuid(), nullable=True))
        batch.create_foreign_key(batch.f('fk_iterations_refresh_id_job_refreshes'), 'job_refreshes', ['refresh_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('iterations') as batch:
        batch.drop_constraint(batch.f('fk_iterations_refresh_id_job_refreshes'), type_='foreignkey')
        batch.drop_column('refresh_id')
        batch.drop_column('note')
    with op.batch_alter_table('exports') as batch:
        batch.drop_column('iteration')
    with op.batch_alter_table('api_keys') as batch:
        batch.drop_constraint(batch.f('fk_api_keys_job_id_jobs'), type_='foreignkey')
        batch.drop_index(batch.f('ix_api_keys_job_id'))
        batch.drop_column('expires_at')
        batch.drop_column('job_id')
    op.drop_index('ix_webhook_deliveries_due', table_name='webhook_deliveries')
    op.drop_table('webhook_deliveries')
    op.drop_index('ix_job_refreshes_job_status', table_name='job_refreshes')
    op.drop_table('job_refreshes')
    op.drop_index(op.f('ix_webhook_subscriptions_tenant_id'), table_name='webhook_subscriptions')
    op.drop_index(op.f('ix_webhook_subscriptions_job_id'), table_name='webhook_subscriptions')
    op.drop_table('webhook_subscriptions')
