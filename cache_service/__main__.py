"""`python -m cache_service`: the cache process, in the foreground until SIGINT/SIGTERM."""

from cache_service.server import start
from onehop.server import run_service

if __name__ == "__main__":
    run_service("cache", start)
