"""`python -m trainer_service`: run the trainer until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio

from onehop.server import serve_forever
from onehop.settings import Settings
from onehop.telemetry import setup_logging
from trainer_service.server import start


def main() -> None:
    settings = Settings()
    setup_logging("trainer", settings.log_level)
    asyncio.run(serve_forever("trainer", settings, start))


if __name__ == "__main__":
    main()
