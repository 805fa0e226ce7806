"""predictions table (adopting the previous service's table if it already exists)

Revision ID: 0001
Revises:
Create Date: 2025-01-01

The previous RottenBot service created `predictions` (uid, image_path, predicted_class,
predicted_class_name, confidence, user_uid, created_at) without Alembic. If that table is there,
its rows are kept: the missing columns are added (all nullable), a `created_at` without time zone
becomes `timestamptz` (its values were UTC), and the history indexes are created. Nothing is
dropped or made stricter, so the previous service keeps writing to the table during a rolling
upgrade (tests/test_upgrade.py).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TABLE = "predictions"
ADDED_COLUMNS = (
    ("model_name", sa.Text()),
    ("model_version", sa.Text()),
    ("content_type", sa.Text()),
    ("image_format", sa.Text()),
    ("image_width", sa.Integer()),
    ("image_height", sa.Integer()),
    ("image_bytes", sa.Integer()),
    ("image_sha256", sa.Text()),
    ("top_k", sa.JSON().with_variant(postgresql.JSONB(), "postgresql")),
)
INDEXES = {
    "ix_predictions_user_created_uid": ("user_uid", "created_at DESC", "uid DESC"),
    "ix_predictions_user_class_created_uid": (
        "user_uid", "predicted_class_name", "created_at DESC", "uid DESC",
    ),
}


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if not inspector.has_table(TABLE):
        op.create_table(
            TABLE,
            sa.Column("uid", sa.Uuid(), primary_key=True),
            sa.Column("image_path", sa.Text(), nullable=False, unique=True),
            sa.Column("predicted_class", sa.Integer(), nullable=False),
            sa.Column("predicted_class_name", sa.Text(), nullable=False),
            sa.Column("confidence", sa.Float(), nullable=False),
            sa.Column("user_uid", sa.Uuid(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            *(sa.Column(name, kind, nullable=True) for name, kind in ADDED_COLUMNS),
        )
    else:
        columns = {column["name"]: column for column in inspector.get_columns(TABLE)}
        for name, kind in ADDED_COLUMNS:
            if name not in columns:
                op.add_column(TABLE, sa.Column(name, kind, nullable=True))
        created = columns.get("created_at")
        if (
            bind.dialect.name == "postgresql"
            and created is not None
            and not getattr(created["type"], "timezone", False)
        ):
            # Read as UTC through the session time zone rather than `USING created_at AT TIME
            # ZONE 'UTC'`: same values, but PostgreSQL 12+ then changes only the catalog instead
            # of rewriting the table under an exclusive lock (5-8 s for a million rows, which
            # stalled every replica's reads and writes; docs/upgrading.md).
            op.execute("SET LOCAL TIME ZONE 'UTC'")
            op.execute("ALTER TABLE predictions ALTER COLUMN created_at TYPE timestamptz")
    existing = {index["name"] for index in sa.inspect(bind).get_indexes(TABLE)}
    for name, columns in INDEXES.items():
        if name not in existing:
            op.create_index(name, TABLE, [sa.text(column) for column in columns])


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(name, table_name=TABLE)
    op.drop_table(TABLE)
