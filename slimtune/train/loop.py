"""The training loop (ours, not HF Trainer): data order, steps, metrics, evaluation, progress and checkpoints."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from slimtune.adapt.adapter_io import save_adapter
from slimtune.data.collate import count_real_tokens
from slimtune.data.tokenize import Example
from slimtune.errors import ConfigError
from slimtune.train import auto_graphs
from slimtune.train.checkpoint import ResumePoint, restore_adapter, restore_rng, save_checkpoint
from slimtune.train.config import TrainConfig
from slimtune.train.cuda_graph import require_graph_step
from slimtune.train.data_stream import DataStream, collate_share, epoch_order, steps_per_epoch
from slimtune.train.distributed import (DistInfo, ParallelModel, on_every_rank, rank_rng_states,
                                        restore_rank_rng)
from slimtune.train.graph_buckets import GraphSteps
from slimtune.train.guard import NonFiniteGuard
from slimtune.train.evaluate import EvalTracker, evaluate, save_best
from slimtune.train.metrics import MetricsWriter, TensorBoardLogger, read_metrics, truncate_metrics
from slimtune.train.optimizer import make_optimizer
from slimtune.train.schedule import host_lr, make_scheduler
from slimtune.train.step import accumulate_gradients, clip_and_step
from slimtune.train.step_readback import StepValues, read_back

__all__ = ["DataStream", "FitResult", "MetricsWriter", "epoch_order", "fit", "parallel_kind", "save_checkpoint",
           "steps_per_epoch"]


@dataclass
class FitResult:
    """What a run produced."""

    history: list[dict]
    adapter_dir: Path
    best_step: int | None = None
    best_eval_loss: float | None = None
    stopped_early: bool = False


@dataclass
class _Launched:
    """A step whose work is queued: what its metrics record needs besides the numbers still on the device."""

    step: int
    epoch: float
    lr: float
    n_tokens: int
    n_targets: int
    t0: float
    values: StepValues


class _Silent:
    """Stands in for the metrics/TensorBoard writers and the progress bar on ranks other than 0."""

    def write(self, *_args) -> None: ...
    def update(self, *_args) -> None: ...
    def set_postfix(self, **_kwargs) -> None: ...
    def close(self) -> None: ...


def parallel_kind(cfg: TrainConfig, info: DistInfo) -> str:
    """single (one process), or cfg.distributed resolved: auto means ddp."""
    if not info.enabled:
        return "single"
    return "fsdp" if cfg.distributed == "fsdp" else "ddp"


def fit(model: nn.Module, examples: list[Example], cfg: TrainConfig, run_dir: Path, *, pad_id: int,
        device: torch.device, dtype: torch.dtype, on_step: Callable[[dict], None] | None = None,
        eval_examples: list[Example] | None = None, resume: ResumePoint | None = None,
        log: Callable[[str], None] = tqdm.write, dist_info: DistInfo | None = None) -> FitResult:
    """Train the model's LoRA parameters on tokenized examples; writes metrics.jsonl and adapter/ in run_dir.

    Args:
        eval_examples: held-out samples; evaluated every cfg.eval_steps steps and at the end, with the best
            adapter copied to run_dir/best/ and early stopping after cfg.early_stopping_patience bad evals.
        resume: a checkpoint to continue from exactly (see slimtune.train.checkpoint).
        dist_info: this process's place in a torchrun job (see slimtune.train.distributed). Every rank calls
            fit; each trains on its own share of every global micro-batch (batch_size × world_size samples),
            and only rank 0 writes metrics, TensorBoard, progress, logs, checkpoints and the adapter.
    """
    run_dir = Path(run_dir)
    info = dist_info or DistInfo()
    main = info.is_main
    if not main:
        log = _silent_log
    torch.manual_seed(cfg.seed + info.rank)  # ranks draw different dropout masks; rank 0 matches 1 process
    if resume is not None:
        restore_adapter(model, resume.path / "adapter")  # before wrapping: FSDP2 then shards these values
    kind = parallel_kind(cfg, info)
    if kind == "fsdp" and dtype == torch.float16:
        raise ConfigError("distributed=fsdp with float16 is not supported: the loss scaler would skip steps "
                          "on some ranks and not others (each sees only its gradient shards). Use dtype "
                          "bfloat16, or distributed: ddp.")
    graphs = cfg.cuda_graphs is True
    if cfg.cuda_graphs == "auto":
        graphs, why = auto_graphs.decide(cfg, model, dtype=dtype, device=device, sharded=kind == "fsdp")
        agreed = on_every_rank(graphs, device) if kind == "ddp" else graphs  # each rank read its own GPU
        if graphs and not agreed:
            graphs, why = False, "another rank stays eager (every rank captures, or none)"
        if device.type == "cuda":
            log(f"cuda_graphs auto: {'on' if graphs else 'off'} ({why})")
    if graphs and kind == "fsdp":
        raise ConfigError("cuda_graphs=true cannot capture FSDP2's sharded steps: use distributed: ddp (the "
                          "model must fit each GPU), or turn cuda_graphs off.")
    # captured data-parallel steps sum their gradients in the graph: no DDP wrapper (slimtune.train.cuda_graph)
    parallel = ParallelModel(model, kind, info, device, captured=graphs)
    params = parallel.parameters()
    capture = graphs and device.type == "cuda"  # elsewhere the same fixed-shape step runs eagerly (tests, CPU)
    if graphs and not capture:
        log("cuda_graphs: no CUDA device, so steps run eagerly (same fixed-shape inputs, no capture)")
    if device.type == "cuda" and not graphs and parallel.kind != "fsdp" and cfg.max_seq_length <= 8192:
        log("speed note: eager steps launch ~20K kernels from Python, so short sequences leave the GPU waiting; "
            "captured steps (cuda_graphs auto, when the line above allows it; --cuda-graphs forces them) ran E2B QLoRA "
            "at 2K tokens 3.5-5x faster on an H200")
    optimizer = make_optimizer(params, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               fused=True if capture else None, capturable=capture)
    if graphs:  # refuse before the first step, not at it (the step itself is built from the first batch)
        require_graph_step(model, dtype=dtype, capture=capture)
    graphed: GraphSteps | None = None
    padding: list[float] = []  # share of padding in the first 20 graphed steps (one hint after them)
    per_epoch = steps_per_epoch(len(examples), cfg.batch_size, cfg.grad_accum, info.world_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.03 * total))
    scheduler = make_scheduler(optimizer, warmup=min(warmup, total), total=total, kind=cfg.lr_scheduler)
    # fp16 has too little range for small gradients: scale the loss (bf16 and fp32 do not need it).
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    guard = NonFiniteGuard(fp16=scaler is not None, lr=cfg.lr)
    stream = DataStream(examples, cfg.batch_size, cfg.seed, rank=info.rank, world_size=info.world_size)
    tracker = EvalTracker(cfg.early_stopping_patience)
    history: list[dict] = []
    first_step, elapsed_before = 1, 0.0
    if resume is not None:
        state = resume.state
        parallel.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        stream.load_state_dict(state["data"])
        tracker.load_state_dict(state["eval"])
        first_step, elapsed_before = resume.step + 1, state.get("elapsed_s", 0.0)
        # After manual_seed: the checkpoint's RNG position wins. Each rank gets its own stream back when the
        # process count is unchanged; otherwise rank 0 continues the saved (rank-0 / single-process) stream.
        fallback_seed = cfg.seed + info.rank * 1_000_003 + resume.step
        if not restore_rank_rng(state.get("rank_rng"), info, device, fallback_seed) and main:
            restore_rng(state)
        if main:
            history = truncate_metrics(run_dir / "metrics.jsonl", resume.step)
        else:
            history = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("step", 0) <= resume.step]
    writer = MetricsWriter(run_dir / "metrics.jsonl", append=resume is not None) if main else _Silent()
    tb = TensorBoardLogger(run_dir, purge_step=first_step, log=log) if main else _Silent()
    model.train()
    bar = (tqdm(total=total, initial=first_step - 1, desc="training", unit="step", dynamic_ncols=True)
           if main else _Silent())
    if device.type == "cuda":  # mem_gib is the training peak (what the planner predicts), not loading's
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter() - elapsed_before
    stopped_early = False
    base_lr = float(scheduler.base_lrs[0])  # once: with a captured step it is a device tensor
    last_ready = 0.0  # when the previous step's numbers reached the host (step times run between these)

    def finish(item: _Launched) -> dict:
        """Wait for a launched step's numbers; its metrics record (non-finite steps counted by the guard)."""
        nonlocal last_ready
        loss, grad_norm = item.values.wait()
        ready = time.perf_counter()
        dt = ready - max(item.t0, last_ready)  # one step ahead, the next step's launch overlaps this one
        last_ready = ready
        record = {"step": item.step, "epoch": item.epoch, "loss": loss, "lr": item.lr, "grad_norm": grad_norm,
                  "tokens_per_s": item.n_tokens / dt, "tokens": item.n_tokens, "target_tokens": item.n_targets,
                  "step_s": dt, "elapsed_s": ready - start}
        if device.type == "cuda":
            record["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if guard.update(item.step, loss, grad_norm):  # raises when it keeps happening
            record["skipped"] = True
            log(f"step {item.step}: loss {loss} / grad norm {grad_norm} is not finite; the update was skipped")
        return record

    def publish(record: dict) -> None:
        writer.write(record)
        tb.write(record)
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        step = record["step"]
        if step % cfg.log_every == 0 or step == total or "eval_loss" in record:
            extra = f"  eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
            log(f"step {step:>5}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  grad_norm "
                f"{record['grad_norm']:.3f}  tok/s {record['tokens_per_s']:.0f}{extra}")
        if on_step is not None and main:
            on_step(record)

    pending: _Launched | None = None  # a captured step launched, its numbers not yet read (the host runs ahead)
    try:
        for step in range(first_step, total + 1):
            t0 = time.perf_counter()
            window = [stream.next() for _ in range(cfg.grad_accum)]
            epoch = window[-1][0]
            batches = [collate_share(share, pad_id) for _, share in window]  # empty share → dummy batch
            lr = host_lr(scheduler, base_lr)
            if graphs:
                # one shape per captured step: max_seq_length when packed, else the batch's length bucket
                if graphed is None:
                    graphed = GraphSteps(model, params, optimizer, device=device, dtype=dtype,
                                         max_grad_norm=cfg.max_grad_norm, capture=capture,
                                         max_seq_length=cfg.max_seq_length, pad_id=pad_id, packed=cfg.packing,
                                         batch_size=cfg.batch_size, rank_sum=parallel.rank_sum)
                loss_t, norm_t, n_targets, padded = graphed([b for b, _ in batches])
                if len(padding) < 20:
                    padding.append(1 - sum(count_real_tokens(b) for b, _ in batches) / padded)
                    if len(padding) == 20 and sum(padding) / 20 > 0.5:
                        padded_to = (f"max_seq_length={cfg.max_seq_length}" if cfg.packing
                                     else "the length bucket of its longest sample")
                        log(f"cuda_graphs: {100 * sum(padding) / 20:.0f}% of each padded batch is padding (every "
                            f"batch is padded to {padded_to}); --packing or a lower --max-seq-length would spend "
                            "that compute on real tokens")
                scheduler.step()
                values = read_back(loss_t, norm_t, device)
            else:
                loss, n_targets = accumulate_gradients(model, [b for b, _ in batches], device=device, dtype=dtype,
                                                       scaler=scaler, parallel=parallel)
                grad_norm = clip_and_step(params, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm,
                                          scaler=scaler)
                values = read_back(loss, grad_norm, device)
            n_tokens = int(parallel.host_sum([sum(count_real_tokens(b) for b, n in batches if n)])[0])
            launched = _Launched(step, round(epoch + 1, 3), lr, n_tokens, n_targets, t0, values)
            if pending is not None:  # the previous step, read now that this one is queued behind it
                publish(finish(pending))
                pending = None
            evaluating = bool(eval_examples) and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total)
            saving = bool(cfg.save_steps) and step % cfg.save_steps == 0 and step < total
            if graphs and not (evaluating or saving or step == total):
                pending = launched  # nothing at this step needs the weights as they are now: run one step ahead
                continue
            record = finish(launched)
            if evaluating:
                with graphed.paused() if graphed is not None else contextlib.nullcontext():
                    record["eval_loss"], _ = evaluate(model, eval_examples, pad_id=pad_id, device=device,
                                                      dtype=dtype, batch_size=cfg.batch_size, parallel=parallel)
                if tracker.update(step, record["eval_loss"]):  # same eval loss on every rank: same decision
                    best_state = parallel.adapter_state()  # a collective under FSDP2: every rank gathers
                    if main:
                        save_best(model, run_dir, step, record["eval_loss"], state=best_state)
            publish(record)
            if tracker.should_stop and step < total:
                log(f"early stopping at step {step}: eval loss has not improved for {tracker.bad_evals} "
                    f"evaluations (best {tracker.best_loss:.4f} at step {tracker.best_step})")
                stopped_early = True
                break
            if saving:
                _checkpoint(parallel, optimizer, scheduler, scaler, run_dir, step, extra={
                    "data": stream.state_dict(), "eval": tracker.state_dict(), "config": cfg.to_dict(),
                    "elapsed_s": time.perf_counter() - start, "rank_rng": rank_rng_states(info, device)})
    finally:
        if graphed is not None:
            graphed.close()
        bar.close()
        writer.close()
        tb.close()
    model.eval()
    final_state = parallel.adapter_state()
    adapter_dir = run_dir / "adapter"
    if main:
        save_adapter(model, adapter_dir, state=final_state)
    return FitResult(history=history, adapter_dir=adapter_dir, best_step=tracker.best_step,
                     best_eval_loss=tracker.best_loss, stopped_early=stopped_early)


def _silent_log(_message: str) -> None:
    """Progress lines of ranks other than 0 go nowhere (rank 0 reports the global numbers)."""


def _checkpoint(parallel: ParallelModel, optimizer, scheduler, scaler, run_dir: Path, step: int, extra: dict):
    """Gather the full LoRA and optimizer state on every rank (collectives under FSDP2); rank 0 writes it."""
    adapter_state = parallel.adapter_state()
    optimizer_state = parallel.optimizer_state(optimizer)
    if parallel.info.is_main:
        save_checkpoint(parallel.model, run_dir, step, optimizer, scheduler, scaler, extra=extra,
                        adapter_state=adapter_state, optimizer_state=optimizer_state)
