"""`python -m cache_service`: the cache process."""

from __future__ import annotations

import asyncio

from cache_service.server import start
from onehop.server import serve_forever
from onehop.settings import Settings
from onehop.telemetry import setup_logging


def main() -> None:
    settings = Settings()
    setup_logging("cache", settings.log_level)
    asyncio.run(serve_forever("cache", settings, start))


if __name__ == "__main__":
    main()
