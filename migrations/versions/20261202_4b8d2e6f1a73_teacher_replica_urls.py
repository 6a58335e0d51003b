"""teachers: replica base URLs (one logical teacher served by several servers)

Revision ID: 4b8d2e6f1a73
Revises: e7a3d91c4b52
Create Date: 2026-12-02 18:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "4b8d2e6f1a73"
down_revision: str | None = "e7a3d91c4b52"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "teachers",
        sa.Column(
            "replica_urls",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            server_default="[]",
            nullable=False,
        ),
    )


def downgrade() -> None:
    op.drop_column("teachers", "replica_urls")
