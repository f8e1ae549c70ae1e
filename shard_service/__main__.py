"""`python -m shard_service`: the shard service, in the foreground until SIGINT/SIGTERM."""

from onehop.server import run_service
from shard_service.server import start

if __name__ == "__main__":
    run_service("shard", start)
