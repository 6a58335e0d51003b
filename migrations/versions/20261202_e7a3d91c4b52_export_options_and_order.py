"""exports: the request's selection and gzip; examples indexed in the order exports read them

Revision ID: e7a3d91c4b52
Revises: 5f1e7c2a9b40
Create Date: 2026-12-02 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "e7a3d91c4b52"
down_revision: str | None = "5f1e7c2a9b40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "exports",
        sa.Column(
            "options",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            server_default="{}",
            nullable=False,
        ),
    )
    # The same leading columns (every query that used the index still can), plus the order an
    # export reads an iteration's examples in.
    op.drop_index("ix_examples_job_iteration", table_name="examples")
    op.create_index(
        "ix_examples_job_iteration",
        "examples",
        ["job_id", "iteration_id", "status", "created_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_examples_job_iteration", table_name="examples")
    op.create_index(
        "ix_examples_job_iteration", "examples", ["job_id", "iteration_id", "status"], unique=False
    )
    with op.batch_alter_table("exports") as batch:
        batch.drop_column("options")
