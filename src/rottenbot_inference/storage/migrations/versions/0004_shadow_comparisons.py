"""shadow_comparisons table (predictions scored by the champion and the shadow challenger)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Additive only: a new table; nothing existing is altered. One row per shadowed prediction:
both models' top-1 class and confidence, whether they agreed, the challenger's run time and,
when the prediction was saved, its uid (the feedback join; no foreign key, since the row is
written before the outbox drains the prediction).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TABLE = "shadow_comparisons"
PAIR_INDEX = "ix_shadow_comparisons_pair_created"
PREDICTION_INDEX = "ix_shadow_comparisons_prediction"


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table(TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column("uid", sa.Uuid(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("champion_version", sa.Text(), nullable=False),
        sa.Column("challenger_version", sa.Text(), nullable=False),
        sa.Column("champion_class", sa.Integer(), nullable=False),
        sa.Column("champion_class_name", sa.Text(), nullable=False),
        sa.Column("champion_confidence", sa.Float(), nullable=False),
        sa.Column("challenger_class", sa.Integer(), nullable=False),
        sa.Column("challenger_class_name", sa.Text(), nullable=False),
        sa.Column("challenger_confidence", sa.Float(), nullable=False),
        sa.Column("agreed", sa.Boolean(), nullable=False),
        sa.Column("challenger_ms", sa.Float(), nullable=False),
        sa.Column("prediction_uid", sa.Uuid(), nullable=True),
    )
    op.create_index(PAIR_INDEX, TABLE, ["champion_version", "challenger_version", "created_at"])
    op.create_index(PREDICTION_INDEX, TABLE, ["prediction_uid"])


def downgrade() -> None:
    op.drop_index(PREDICTION_INDEX, table_name=TABLE)
    op.drop_index(PAIR_INDEX, table_name=TABLE)
    op.drop_table(TABLE)
