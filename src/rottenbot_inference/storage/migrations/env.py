"""Alembic environment: runs on the connection `storage.db.migrate` passes in.

For the alembic CLI (`alembic -x url=...`), it builds an async engine from that URL instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy.engine import make_url

from rottenbot_inference.storage.db import VERSION_TABLE, create_engine
from rottenbot_inference.storage.models import Base


def _run(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    engine = create_engine(make_url(url))
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError("pass the database URL: alembic -x url=postgresql+asyncpg://...")
    asyncio.run(_run_from_url(url))
