"""Training runs: one row per model version.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mlmon_training_runs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("trained_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("training_rows", sa.BigInteger, nullable=False),
        sa.Column("validation_rows", sa.BigInteger),
        sa.Column("validation_logloss", sa.Double),
        sa.Column("validation_roc_auc", sa.Double),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("body_sha256", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model", "version", name="uq_mlmon_training_runs_model_version"),
    )
    op.create_index("ix_mlmon_training_runs_model_trained_at", "mlmon_training_runs", ["model", "trained_at"])


def downgrade() -> None:
    op.drop_table("mlmon_training_runs")
