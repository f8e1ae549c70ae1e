"""`python -m trainer_service [--role serve|train|all]`: the trainer, in the foreground until
SIGINT/SIGTERM. `--role` overrides ONEHOP_TRAINER_ROLE."""

import argparse
import os

from onehop.server import run_service
from trainer_service.server import start


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer_service", description=__doc__)
    parser.add_argument("--role", choices=["all", "train", "serve"])
    args = parser.parse_args()
    if args.role:
        os.environ["ONEHOP_TRAINER_ROLE"] = args.role
    run_service("trainer", start)


if __name__ == "__main__":
    main()
