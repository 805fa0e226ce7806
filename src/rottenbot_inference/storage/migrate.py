"""`python -m rottenbot_inference.storage.migrate`: upgrade the schema of DATABASE_URL and exit.

The service migrates on start by itself (MIGRATE_ON_START); this is for deploy pipelines that
prefer a separate step (then set MIGRATE_ON_START=false) and for tests.
"""

from __future__ import annotations

import asyncio
import logging

from rottenbot_inference.settings import Settings
from rottenbot_inference.storage.db import database_url, migrate


def main() -> None:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = database_url(Settings())
    asyncio.run(migrate(url))
    logging.getLogger(__name__).info("schema of %s is at head", url.render_as_string(True))


if __name__ == "__main__":
    main()
