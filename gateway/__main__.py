"""`python -m gateway`: the gateway in the foreground until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

from gateway.server import start
from onehop.server import serve_forever
from onehop.settings import Settings
from onehop.telemetry import setup_logging


def main() -> None:
    settings = Settings()
    setup_logging("gateway", settings.log_level)
    asyncio.run(serve_forever("gateway", settings, start))


if __name__ == "__main__":
    main()
