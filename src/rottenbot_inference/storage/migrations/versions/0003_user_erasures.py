"""user_erasures table (erasures of all of a user's data, until they are complete)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Additive only. A row says "everything of this user is being erased": the history and the
dataset export skip the user at once, while the images and rows are removed (a replica that
could not finish, because the image store or the database was down, finishes later). The row
is deleted when nothing of the user is left.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLE = "user_erasures"


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table(TABLE):
        return
    op.create_table(
        TABLE,
        sa.Column("user_uid", sa.Uuid(), primary_key=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table(TABLE)
