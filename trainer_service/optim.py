"""Optimisers and learning-rate schedules by name: torch's Adam, AdamW and SGD, and LAMB
(layer-wise adaptive moments, You et al. 2019) for large batches, which torch lacks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

OPTIMIZERS = ("adam", "adamw", "sgd", "lamb")
SCHEDULES = ("constant", "cosine", "linear")


class Lamb(torch.optim.Optimizer):
    """Adam's update rescaled per parameter tensor by the trust ratio ||w|| / ||update||,
    so every layer moves by a similar relative amount whatever the batch size."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ):
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(p.grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                update = (exp_avg / (1.0 - beta1**t)) / (
                    (exp_avg_sq / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
                )
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                w_norm, u_norm = p.norm(), update.norm()
                trust = torch.where(
                    (w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm)
                )
                p.sub_(update * (trust * group["lr"]))
        return None


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    momentum: float,
) -> torch.optim.Optimizer:
    """The optimiser `name` (one of OPTIMIZERS, validated by the caller)."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return Lamb(params, lr=lr, weight_decay=weight_decay)


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate before optimizer step `step` (0-based): linear
    warm-up over `warmup` steps, then constant, cosine or linear decay to 0 at `total`. A
    pure function of the step, so a resumed job continues the same curve."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - warmup, 1)
    done = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    return 1.0 - done
