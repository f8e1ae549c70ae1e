"""GPU check of the trainer's loop, for a machine with python3, torch, numpy, pyarrow, grpcio
and safetensors but not the rest of onehop's dependencies: trains the seed model through
`trainer_service.training.train` on Arrow shards held in memory — the same pipeline a mesh
job runs (background prefetch, zero-copy Arrow -> numpy -> torch, pinned buffers, copies on a
side stream, bf16 autocast on CUDA) — and compares its samples/s at batch 256 and 4096 with
a plain in-memory torch loop on the same device (tensors already on it, one shuffle per
epoch, the same autocast). Asserts that the loss falls. Falls back to the CPU, and says so,
when there is no CUDA device.

    python3 -m benchmarks.gpu_check [--rows N] [--epochs E]     (from the repository root)

Finishes in well under two minutes on one GPU (1M rows x 30 features by default).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

FEATURES = 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=0, help="default 1M on GPU, 200k on CPU")
    parser.add_argument("--epochs", type=int, default=2, help="at least 2")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the check compares the first epoch's loss")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import numpy as np
    import pyarrow as pa
    import torch

    from trainer_service.model import ModelSpec, Preprocessing, describe_device, select_device
    from trainer_service.sources import TableData
    from trainer_service.training import Hyperparameters, build_model, train

    device = select_device()
    cuda = device.type == "cuda"
    if not cuda:
        print("no CUDA device: falling back to the CPU (figures are not a GPU check)")
    rows = args.rows or (1_000_000 if cuda else 200_000)
    print(f"device: {describe_device(device)}  torch {torch.__version__}  rows {rows:,}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    w = rng.standard_normal(FEATURES).astype(np.float32)
    y = (x @ w + rng.standard_normal(rows, dtype=np.float32) > 0).astype(np.float32)
    names = [f"f{k:02d}" for k in range(FEATURES)]
    table = pa.table({**{n: x[:, k] for k, n in enumerate(names)}, "label": y})
    data = TableData("gpu-check", table, shards=8)
    description = data.describe("gpu-check", 0)
    stats = {c.name: c for c in description.columns}
    pre = Preprocessing(
        tuple(names), tuple(stats[n].mean for n in names), tuple(stats[n].std for n in names)
    )

    failures = []
    for batch in (256, 4096):
        hp = Hyperparameters.resolve(epochs=args.epochs, batch_size=batch, lr=1e-3)
        with data.open(description, [*names, "label"], "label") as shards:
            model = build_model(ModelSpec.resolve(), pre, 0)
            ours = train(model, shards, "label", hp, device=device)
            tables = [s.read() for s in shards]
        baseline = plain_loop(tables, names, hp, device)
        losses = [h["loss"] for h in ours.history]
        print(
            f"batch {batch:>5}: trainer loop {ours.samples_per_second:>12,.0f} samples/s  "
            f"plain in-memory loop {baseline:>12,.0f} samples/s  "
            f"ratio {ours.samples_per_second / baseline:.2f}  "
            f"data wait {ours.data_wait_share:.1%}  loss {losses[0]:.4f} -> {losses[-1]:.4f}  "
            f"val auc {ours.metrics.get('auc', float('nan')):.4f}"
        )
        if not losses[-1] < losses[0]:
            failures.append(f"batch {batch}: the loss did not fall ({losses})")
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    print("ok: the loss fell at both batch sizes")
    return 0


def plain_loop(tables, names, hp, device) -> float:  # type: ignore[no-untyped-def]
    """Tensors already on the device (the same standardised training rows), one shuffle per
    epoch, batches sliced, Adam, bf16 autocast on CUDA: samples/s."""
    import numpy as np
    import torch

    from trainer_service.model import ModelSpec, build_mlp
    from trainer_service.training import train_rows

    cuts = [train_rows(t.num_rows, hp.val_split) for t in tables]
    x = np.concatenate(
        [
            np.column_stack([t.column(n).to_numpy() for n in names])[:c]
            for t, c in zip(tables, cuts, strict=True)
        ]
    )
    y = np.concatenate(
        [t.column("label").to_numpy()[:c] for t, c in zip(tables, cuts, strict=True)]
    )
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    torch.manual_seed(0)
    net = build_mlp(len(names), ModelSpec.resolve()).to(device)
    optimiser = torch.optim.Adam(net.parameters(), lr=hp.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(hp.epochs):
        order = torch.randperm(len(yt), device=device)
        xs, ys = xt[order], yt[order]
        for i in range(0, len(ys), hp.batch_size):
            if cuda:
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                    out = net(xs[i : i + hp.batch_size]).float()
            else:
                out = net(xs[i : i + hp.batch_size])
            loss = loss_fn(out.squeeze(1), ys[i : i + hp.batch_size])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    if cuda:
        torch.cuda.synchronize()
    return hp.epochs * len(ys) / (time.perf_counter() - start)


if __name__ == "__main__":
    raise SystemExit(main())
