"""`python -m trainer_service`: the trainer, in the foreground until SIGINT/SIGTERM."""

from onehop.server import run_service
from trainer_service.server import start

if __name__ == "__main__":
    run_service("trainer", start)
