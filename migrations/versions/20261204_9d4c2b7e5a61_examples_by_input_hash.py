"""examples: indexed by job and input hash (a batch's close checks its accepted texts against
what other batches of the job committed)

Revision ID: 9d4c2b7e5a61
Revises: 4b8d2e6f1a73
Create Date: 2026-12-04 11:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "9d4c2b7e5a61"
down_revision: str | None = "4b8d2e6f1a73"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # CONCURRENTLY on Postgres: the examples table is the largest, and a plain CREATE INDEX
    # would hold back every batch's writes while it builds. It cannot run in a transaction.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_examples_job_input_hash",
            "examples",
            ["job_id", "input_hash"],
            unique=False,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_examples_job_input_hash", table_name="examples", postgresql_concurrently=True
        )
