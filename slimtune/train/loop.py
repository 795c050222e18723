"""The training loop (ours, not HF Trainer): data order, steps, metrics, evaluation, progress and checkpoints."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from slimtune.adapt.adapter_io import save_adapter
from slimtune.adapt.inject import trainable_parameters
from slimtune.data.collate import collate, count_real_tokens
from slimtune.data.tokenize import Example
from slimtune.errors import ConfigError
from slimtune.train.checkpoint import ResumePoint, restore_adapter, restore_rng, save_checkpoint
from slimtune.train.config import TrainConfig
from slimtune.train.evaluate import EvalTracker, evaluate, save_best
from slimtune.train.metrics import MetricsWriter, TensorBoardLogger, truncate_metrics
from slimtune.train.optimizer import make_optimizer
from slimtune.train.schedule import make_scheduler
from slimtune.train.step import accumulate_gradients, clip_and_step

__all__ = ["DataStream", "FitResult", "MetricsWriter", "epoch_order", "fit", "save_checkpoint",
           "steps_per_epoch"]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled sample order of one epoch; a pure function of (seed, epoch) so runs and resumes repeat it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class DataStream:
    """The endless stream of (epoch, micro-batch) in shuffled order, epoch after epoch.

    Its position (epoch, index) is what resume restores.

    `index` is the offset into the current epoch's order of the next sample to hand out; since the order is
    `epoch_order(n, seed, epoch)`, (epoch, index) is all a checkpoint needs to continue the same sequence.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = epoch_order(len(examples), seed, 0)

    def next(self) -> tuple[int, list[Example]]:
        """(epoch, micro-batch); the last batch of an epoch may be smaller."""
        epoch = self.epoch
        picked = self._order[self.index : self.index + self.batch_size]
        self.index += len(picked)
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = epoch_order(len(self.examples), self.seed, self.epoch)
        return epoch, [self.examples[j] for j in picked]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state["n_examples"] != len(self.examples):
            raise ConfigError(f"the checkpoint was written for {state['n_examples']} training samples but the "
                              f"data now gives {len(self.examples)}; the dataset changed, so the run cannot be "
                              "resumed exactly. Restore the original data or start a new run.")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = epoch_order(len(self.examples), self.seed, self.epoch)


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(math.ceil(n_examples / batch_size) / grad_accum))


@dataclass
class FitResult:
    """What a run produced."""

    history: list[dict]
    adapter_dir: Path
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early: bool = False


def fit(model: nn.Module, examples: list[Example], cfg: TrainConfig, run_dir: Path, *, pad_id: int,
        device: torch.device, dtype: torch.dtype, on_step: Callable[[dict], None] | None = None,
        eval_examples: list[Example] | None = None, resume: ResumePoint | None = None,
        log: Callable[[str], None] = tqdm.write) -> FitResult:
    """Train the model's LoRA parameters on tokenized examples; writes metrics.jsonl and adapter/ in run_dir.

    Args:
        eval_examples: held-out samples; evaluated every cfg.eval_steps steps and at the end, with the best
            adapter copied to run_dir/best/ and early stopping after cfg.early_stopping_patience bad evals.
        resume: a checkpoint to continue from exactly (see slimtune.train.checkpoint).
    """
    run_dir = Path(run_dir)
    params = trainable_parameters(model)
    optimizer = make_optimizer(params, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = steps_per_epoch(len(examples), cfg.batch_size, cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.03 * total))
    scheduler = make_scheduler(optimizer, warmup=min(warmup, total), total=total, kind=cfg.lr_scheduler)
    # fp16 has too little range for small gradients: scale the loss (bf16 and fp32 do not need it).
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    stream = DataStream(examples, cfg.batch_size, cfg.seed)
    tracker = EvalTracker(cfg.early_stopping_patience)
    history: list[dict] = []
    first_step, elapsed_before = 1, 0.0
    torch.manual_seed(cfg.seed)
    if resume is not None:
        state = resume.state
        restore_adapter(model, resume.path / "adapter")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        stream.load_state_dict(state["data"])
        tracker.load_state_dict(state["eval"])
        restore_rng(state)  # after manual_seed: the checkpoint's RNG position wins
        first_step, elapsed_before = resume.step + 1, state.get("elapsed_s", 0.0)
        history = truncate_metrics(run_dir / "metrics.jsonl", resume.step)
    writer = MetricsWriter(run_dir / "metrics.jsonl", append=resume is not None)
    tb = TensorBoardLogger(run_dir, purge_step=first_step, log=log)
    model.train()
    bar = tqdm(total=total, initial=first_step - 1, desc="training", unit="step", dynamic_ncols=True)
    start = time.perf_counter() - elapsed_before
    stopped_early = False
    try:
        for step in range(first_step, total + 1):
            t0 = time.perf_counter()
            window = [stream.next() for _ in range(cfg.grad_accum)]
            epoch = window[-1][0]
            batches = [collate(mb, pad_id) for _, mb in window]
            lr = scheduler.get_last_lr()[0]
            loss, n_targets = accumulate_gradients(model, batches, device=device, dtype=dtype, scaler=scaler)
            grad_norm = clip_and_step(params, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm, scaler=scaler)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            n_tokens = sum(count_real_tokens(b) for b in batches)
            record = {"step": step, "epoch": round(epoch + 1, 3), "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": n_tokens / dt, "tokens": n_tokens, "target_tokens": n_targets,
                      "step_s": dt, "elapsed_s": time.perf_counter() - start}
            if device.type == "cuda":
                record["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if eval_examples and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total):
                record["eval_loss"], _ = evaluate(model, eval_examples, pad_id=pad_id, device=device, dtype=dtype,
                                                  batch_size=cfg.batch_size)
                if tracker.update(step, record["eval_loss"]):
                    save_best(model, run_dir, step, record["eval_loss"])
            writer.write(record)
            tb.write(record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == total or "eval_loss" in record:
                extra = f"  eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                log(f"step {step:>5}/{total}  loss {loss:.4f}  lr {lr:.2e}  grad_norm {grad_norm:.3f}  "
                    f"tok/s {record['tokens_per_s']:.0f}{extra}")
            if on_step is not None:
                on_step(record)
            if tracker.should_stop and step < total:
                log(f"early stopping at step {step}: eval loss has not improved for {tracker.bad_evals} "
                    f"evaluations (best {tracker.best_loss:.4f} at step {tracker.best_step})")
                stopped_early = True
                break
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
                save_checkpoint(model, run_dir, step, optimizer, scheduler, scaler, extra={
                    "data": stream.state_dict(), "eval": tracker.state_dict(), "config": cfg.to_dict(),
                    "elapsed_s": time.perf_counter() - start})
    finally:
        bar.close()
        writer.close()
        tb.close()
    model.eval()
    adapter_dir = save_adapter(model, run_dir / "adapter")
    return FitResult(history=history, adapter_dir=adapter_dir, best_step=tracker.best_step,
                     best_eval_loss=tracker.best_loss, stopped_early=stopped_early)
