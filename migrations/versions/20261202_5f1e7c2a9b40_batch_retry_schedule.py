"""generation batches: a retry schedule, when the teacher first failed them, crashes

Revision ID: 5f1e7c2a9b40
Revises: 5c1e0d7a9b34
Create Date: 2026-12-02 15:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5f1e7c2a9b40"
down_revision: str | None = "5c1e0d7a9b34"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "generation_batches", sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "generation_batches",
        sa.Column("unavailable_since", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column(
        "generation_batches",
        sa.Column("crashes", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )


def downgrade() -> None:
    with op.batch_alter_table("generation_batches") as batch:
        batch.drop_column("crashes")
        batch.drop_column("unavailable_since")
        batch.drop_column("retry_at")
