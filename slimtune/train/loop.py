"""The training loop (ours, not HF Trainer): data order, steps, metrics, progress and checkpoints."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from slimtune.adapt.adapter_io import save_adapter
from slimtune.adapt.inject import trainable_parameters
from slimtune.data.collate import collate
from slimtune.data.tokenize import Example
from slimtune.train.config import TrainConfig
from slimtune.train.schedule import make_scheduler
from slimtune.train.step import accumulate_gradients, clip_and_step
from slimtune.utils.atomic import atomic_dir


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled sample order of one epoch; a pure function of (seed, epoch) so runs and resumes repeat it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(examples: list[Example], batch_size: int, seed: int, start_epoch: int = 0) -> Iterator[tuple[int, list[Example]]]:
    """Endless stream of (epoch, micro-batch) in shuffled order, epoch after epoch."""
    epoch = start_epoch
    while True:
        order = epoch_order(len(examples), seed, epoch)
        for i in range(0, len(order), batch_size):
            yield epoch, [examples[j] for j in order[i : i + batch_size]]
        epoch += 1


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(n_examples / batch_size) / grad_accum))


@dataclass
class FitResult:
    """What a run produced."""

    history: list[dict]
    adapter_dir: Path


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl, flushed at once so live viewers see each step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def save_checkpoint(model: nn.Module, run_dir: Path, step: int, optimizer, scheduler, scaler) -> Path:
    """Adapter + optimizer/scheduler/scaler/RNG state under checkpoints/step-NNNNNN, written atomically."""
    target = run_dir / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(target, overwrite=True) as tmp:
        save_adapter(model, tmp / "adapter")
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    return target


def fit(model: nn.Module, examples: list[Example], cfg: TrainConfig, run_dir: Path, *, pad_id: int,
        device: torch.device, dtype: torch.dtype, on_step: Callable[[dict], None] | None = None) -> FitResult:
    """Train the model's LoRA parameters on tokenized examples; writes metrics.jsonl and adapter/ in run_dir."""
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    per_epoch = steps_per_epoch(len(examples), cfg.batch_size, cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.03 * total))
    scheduler = make_scheduler(optimizer, warmup=min(warmup, total), total=total, kind=cfg.lr_scheduler)
    # fp16 has too little range for small gradients: scale the loss (bf16 and fp32 do not need it).
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    stream = micro_batches(examples, cfg.batch_size, cfg.seed)
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    history: list[dict] = []
    torch.manual_seed(cfg.seed)
    model.train()
    bar = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for step in range(1, total + 1):
            t0 = time.perf_counter()
            window = [next(stream) for _ in range(cfg.grad_accum)]
            epoch = window[-1][0]
            batches = [collate(mb, pad_id) for _, mb in window]
            lr = scheduler.get_last_lr()[0]
            loss, n_targets = accumulate_gradients(model, batches, device=device, dtype=dtype, scaler=scaler)
            grad_norm = clip_and_step(params, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm, scaler=scaler)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
            record = {"step": step, "epoch": round(epoch + 1, 3), "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": n_tokens / dt, "tokens": n_tokens, "target_tokens": n_targets,
                      "step_s": dt, "elapsed_s": time.perf_counter() - start}
            if device.type == "cuda":
                record["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            writer.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == total:
                tqdm.write(f"step {step:>5}/{total}  loss {loss:.4f}  lr {lr:.2e}  grad_norm {grad_norm:.3f}  "
                           f"tok/s {record['tokens_per_s']:.0f}")
            if on_step is not None:
                on_step(record)
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
                save_checkpoint(model, run_dir, step, optimizer, scheduler, scaler)
    finally:
        bar.close()
        writer.close()
    model.eval()
    adapter_dir = save_adapter(model, run_dir / "adapter")
    return FitResult(history=history, adapter_dir=adapter_dir)
