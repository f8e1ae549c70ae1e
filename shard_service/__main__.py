"""`python -m shard_service`: run the shard service until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

from onehop.server import serve_forever
from onehop.settings import Settings
from onehop.telemetry import setup_logging
from shard_service.server import start


def main() -> None:
    settings = Settings()
    setup_logging("shard", settings.log_level)
    asyncio.run(serve_forever("shard", settings, start))


if __name__ == "__main__":
    main()
