"""prediction_feedback table (the owner's correction of a saved prediction)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Additive only: a new table beside `predictions`; `predictions` itself is not altered, so the
previous service (which knows only its seven columns) keeps inserting and deleting during a
rolling upgrade (tests/test_upgrade.py). One feedback per prediction (its uid is the key); on
PostgreSQL the foreign key deletes it with its prediction, whoever deletes the row.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TABLE = "prediction_feedback"
INDEX = "ix_prediction_feedback_model_version_updated"


def upgrade() -> None:
    bind = op.get_bind()
    if sa.inspect(bind).has_table(TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column(
            "prediction_uid", sa.Uuid(),
            sa.ForeignKey("predictions.uid", ondelete="CASCADE"), primary_key=True,
        ),
        sa.Column("user_uid", sa.Uuid(), nullable=False),
        sa.Column("correct_class", sa.Integer(), nullable=False),
        sa.Column("correct_class_name", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Text(), nullable=True),
        sa.Column("agreed", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(INDEX, TABLE, ["model_version", "updated_at"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name=TABLE)
    op.drop_table(TABLE)
