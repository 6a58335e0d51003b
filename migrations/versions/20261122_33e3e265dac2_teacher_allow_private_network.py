"""teacher allow_private_network: workers hold a tenant's teacher to public addresses

Revision ID: 33e3e265dac2
Revises: ae5b142c5812
Create Date: 2026-11-22 05:15:38.089285
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "33e3e265dac2"
down_revision: str | None = "ae5b142c5812"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "teachers",
        sa.Column("allow_private_network", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    # Teachers that exist already keep connecting as before (an operator's may sit on the
    # internal network); the connect-time guard applies to those created or moved from now on.
    op.execute(sa.text("UPDATE teachers SET allow_private_network = :yes").bindparams(yes=True))


def downgrade() -> None:
    with op.batch_alter_table("teachers") as batch:
        batch.drop_column("allow_private_network")
