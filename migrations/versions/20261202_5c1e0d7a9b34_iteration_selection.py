"""iteration selection: why an iteration's examples were kept or excluded, and the comparisons

Revision ID: 5c1e0d7a9b34
Revises: ccb7053a0aa5
Create Date: 2026-12-02 14:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "5c1e0d7a9b34"
down_revision: str | None = "ccb7053a0aa5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("iterations", sa.Column("selection_reason", sa.Text(), nullable=True))
    op.add_column(
        "iterations",
        sa.Column(
            "comparisons",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
    )


def downgrade() -> None:
    with op.batch_alter_table("iterations") as batch:
        batch.drop_column("comparisons")
        batch.drop_column("selection_reason")
