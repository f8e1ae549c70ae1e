"""`python -m gateway`: the gateway, in the foreground until SIGINT/SIGTERM."""

from gateway.server import start
from onehop.server import run_service

if __name__ == "__main__":
    run_service("gateway", start)
