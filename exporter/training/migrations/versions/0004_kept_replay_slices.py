"""Kept replay slices: the replay aggregates of each model's settled slices, saved so that
a restarted ``mlmon serve`` does not read its replay windows again
(``predictions.saved_slices``).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mlmon_kept_replay_slices",
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("slice_start_us", sa.BigInteger, nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("meta", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("model", "slice_start_us", name="pk_mlmon_kept_replay_slices"),
    )


def downgrade() -> None:
    op.drop_table("mlmon_kept_replay_slices")
