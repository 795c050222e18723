"""Learning-rate schedule: linear warmup, then cosine or linear decay to zero (or constant)."""

from __future__ import annotations

import math

import torch


def lr_lambda(step: int, *, warmup: int, total: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, *, warmup: int, total: int, kind: str):
    """A LambdaLR implementing `lr_lambda` (state_dict-able, so resume is exact)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=warmup, total=total, kind=kind))


def host_lr(scheduler, base_lr: float) -> float:
    """The lr the scheduler's current step uses, computed on the host (what LambdaLR.get_last_lr holds). With a
    captured step the optimizer's lr is a device tensor, and reading it would wait for the GPU."""
    return base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
