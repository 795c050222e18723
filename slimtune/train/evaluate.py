"""Evaluation: token-weighted eval loss, the eval split, best-adapter tracking and early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slimtune.adapt.adapter_io import CONFIG_NAME, WEIGHTS_NAME, adapter_config, adapter_state_dict
from slimtune.data.collate import count_targets
from slimtune.data.tokenize import Example
from slimtune.memory.host_embedding import prefetch_host_embeddings
from slimtune.train.data_stream import collate_share
from slimtune.train.loss import loss_sum
from slimtune.train.step import autocast
from slimtune.utils.atomic import atomic_dir


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split off round(fraction * n) samples (at least 1) as the eval set, by a seeded shuffle.

    Returns:
        (train, eval), each in the original order of `examples`.
    """
    n = len(examples)
    n_eval = max(1, round(fraction * n))
    # Its own generator (not the global RNG): the split must not shift dropout or the data order.
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    picked = set(torch.randperm(n, generator=g)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in picked]
    held = [e for i, e in enumerate(examples) if i in picked]
    return train, held


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], *, pad_id: int, device: torch.device,
             dtype: torch.dtype, batch_size: int = 8, parallel=None) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over every target token of `examples`, in eval mode.

    Args:
        examples: tokenized eval samples (labels masked as for training).
        batch_size: samples per forward pass; padding does not change the result.
        parallel: a slimtune.train.distributed.ParallelModel when distributed: each rank evaluates every
            world_size-th batch through the wrapper (FSDP2 must all-gather in its forward), ranks short of a
            batch run a dummy one so the collectives line up, and the sums are all-reduced.

    Returns:
        (mean CE per target token, number of target tokens). The model's train/eval mode is restored after.

    Example:
        >>> loss, n = evaluate(model, eval_examples, pad_id=0, device=torch.device("cpu"), dtype=torch.float32)
    """
    was_training = model.training
    model.eval()  # no dropout: the eval loss must not depend on the RNG (and must not consume it)
    rank, world = (parallel.info.rank, parallel.info.world_size) if parallel is not None else (0, 1)
    starts = list(range(0, len(examples), batch_size))
    rounds = -(-len(starts) // world)  # every rank runs the same number of forwards (FSDP2 collectives)
    total, n_targets = 0.0, 0
    try:
        for r in range(rounds):
            j = r * world + rank
            chunk = examples[starts[j] : starts[j] + batch_size] if j < len(starts) else []
            cpu_batch, _ = collate_share(chunk, pad_id)
            n = count_targets(cpu_batch)
            if n == 0 and (parallel is None or parallel.kind != "fsdp"):
                continue
            batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
            prefetch_host_embeddings(model, cpu_batch, batch)
            with autocast(device, dtype):
                total += float(parallel.eval_loss(batch) if parallel is not None else loss_sum(model, batch))
            n_targets += n
    finally:
        model.train(was_training)
    if world > 1:
        total, n = parallel.host_sum([total, n_targets])
        n_targets = int(n)
    return (total / n_targets if n_targets else float("nan")), n_targets


def save_best(model: nn.Module, run_dir: Path, step: int, eval_loss: float, state: dict | None = None) -> Path:
    """Write the current adapter and {step, eval_loss} to RUN_DIR/best/ atomically (replacing the old best).

    Args:
        state: PEFT-keyed LoRA tensors to write (default: the model's; distributed runs pass gathered ones).
    """
    target = Path(run_dir) / "best"
    with atomic_dir(target, overwrite=True) as tmp:
        save_file(state if state is not None else adapter_state_dict(model), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(adapter_config(model), indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}, indent=2) + "\n")
    return target


class EvalTracker:
    """Best eval loss so far and the count of evaluations without improvement (early stopping)."""

    def __init__(self, patience: int = 0) -> None:
        self.patience = patience
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, step: int, eval_loss: float) -> bool:
        """Record an evaluation; returns True when it is a new best (strictly lower loss)."""
        if self.best_loss is None or eval_loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = eval_loss, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_step = state["best_loss"], state["best_step"]
        self.bad_evals = state["bad_evals"]
