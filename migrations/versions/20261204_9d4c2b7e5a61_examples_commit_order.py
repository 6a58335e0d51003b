"""examples: the order a job's examples were committed in (`seq`), indexed with the job

A process's dedup index then reads only the examples committed since it last read, and a
batch's close checks its accepted texts against those other batches committed meanwhile.

Revision ID: 9d4c2b7e5a61
Revises: 4b8d2e6f1a73
Create Date: 2026-12-04 11:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9d4c2b7e5a61"
down_revision: str | None = "4b8d2e6f1a73"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Null for the rows stored before: a process reads those once, when it first indexes a job.
    op.add_column("examples", sa.Column("seq", sa.BigInteger(), nullable=True))
    # CONCURRENTLY on Postgres: the examples table is the largest, and a plain CREATE INDEX
    # would hold back every batch's writes while it builds. It cannot run in a transaction.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_examples_job_seq",
            "examples",
            ["job_id", "seq"],
            unique=False,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_examples_job_seq", table_name="examples", postgresql_concurrently=True)
    op.drop_column("examples", "seq")
