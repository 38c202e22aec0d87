"""Kept time slices: the aggregates of each model's sealed prediction slices, saved so that
a restarted ``mlmon serve`` does not read its windows again (``predictions.saved_slices``).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mlmon_kept_slices",
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("slice_start_us", sa.BigInteger, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("hist", sa.LargeBinary, nullable=False),
        sa.Column("top", sa.LargeBinary, nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("model", "slice_start_us", name="pk_mlmon_kept_slices"),
    )


def downgrade() -> None:
    op.drop_table("mlmon_kept_slices")
