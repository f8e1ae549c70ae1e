"""Starting a training job from plain arguments and following it with a progress bar
(shared by `onehop train` and `onehop demo`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from tqdm import tqdm

from onehop.client import GatewayClient
from onehop.errors import InvalidArgument
from protos.onehop.v1 import trainer_pb2


@dataclass(frozen=True)
class JobOutcome:
    status: trainer_pb2.JobStatus

    @property
    def state_name(self) -> str:
        return trainer_pb2.JobState.Name(self.status.state).removeprefix("JOB_STATE_")


def parse_hidden(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgument(f"--hidden must be comma-separated integers, got {text!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise InvalidArgument(f"--hidden must list positive widths, got {text!r}")
    return widths


def job_request(
    *,
    dataset: str,
    target: str,
    model: str,
    epochs: int = 5,
    batch_size: int = 32,
    hidden: str = "64",
    dropout: float = 0.5,
    lr: float = 1e-3,
    val_split: float = 0.2,
    seed: int = 0,
    task: str = "",
    activation: str = "",
    optimizer: str = "",
    lr_schedule: str = "",
    early_stopping: int = 0,
    checkpoint_every: int = 0,
) -> trainer_pb2.StartJobRequest:
    """A StartJobRequest from CLI-style arguments ("" / 0 = the trainer's defaults)."""
    return trainer_pb2.StartJobRequest(
        dataset=dataset,
        target=target,
        model_name=model,
        model=trainer_pb2.ModelSpec(
            hidden=parse_hidden(hidden),
            # The proto reads 0 as "the default"; a negative value means no dropout.
            dropout=dropout if dropout > 0 else -1.0,
            task=task,
            activation=activation,
        ),
        hyperparameters=trainer_pb2.Hyperparameters(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            val_split=val_split,
            seed=seed,
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            early_stopping_patience=early_stopping,
            checkpoint_every_steps=checkpoint_every,
        ),
    )


_TERMINAL = {
    trainer_pb2.JOB_STATE_SUCCEEDED,
    trainer_pb2.JOB_STATE_FAILED,
    trainer_pb2.JOB_STATE_CANCELLED,
}


def follow_job(client: GatewayClient, job_id: str) -> JobOutcome:
    """Stream the job's progress into a bar; print the final metrics."""
    last = trainer_pb2.JobStatus(job_id=job_id)
    # disable=None: a bar on a terminal, none in logs (the final line says it all).
    with tqdm(total=0, unit="step", file=sys.stderr, dynamic_ncols=True, disable=None) as bar:
        for status in client.watch_job(job_id):
            last = status
            if status.total_steps and bar.total != status.total_steps:
                bar.total = status.total_steps
            bar.n = status.step
            bar.set_description(f"epoch {status.epoch}/{status.epochs}")
            postfix = {
                "loss": f"{status.loss:.4f}",
                "samples/s": f"{status.samples_per_second:,.0f}",
            }
            if "auc" in status.metrics:
                postfix["val_auc"] = f"{status.metrics['auc']:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.refresh()
            if status.state in _TERMINAL:
                break
    outcome = JobOutcome(last)
    metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(last.metrics.items()))
    print(
        f"job {job_id} {outcome.state_name}: {last.message or ''} "
        f"epochs={last.epoch} steps={last.step} {metrics} "
        f"samples/s={last.samples_per_second:,.0f} data_wait={last.data_wait_share:.1%} "
        f"time={last.elapsed_seconds:.1f}s cpu={last.cpu_seconds:.1f}s "
        + (f"gpu={last.gpu_seconds:.1f}s " if last.gpu_seconds else "")
        + f"read={last.bytes_read / 1e6:.1f}MB"
        + (f" model={last.model_name} v{last.model_version}" if last.model_version else "")
    )
    return outcome
