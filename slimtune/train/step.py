"""One optimizer step: gradient accumulation normalised by the target tokens of the WHOLE window.

Each micro-batch contributes `sum_CE / N_window`, where N_window counts target tokens over every micro-batch of
the step (and, under torch.distributed, every rank). Dividing each micro-batch by its own token count and then by
the number of micro-batches — what the standard stack did — weights short samples more than long ones, so
(batch 4, accum 1) and (batch 1, accum 4) would train different models. Here they give the same gradients.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from slimtune.data.collate import count_targets
from slimtune.memory.host_embedding import prefetch_host_embeddings
from slimtune.train.loss import loss_sum


_MEDIA_INPUTS = ("pixel_values", "input_features")


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to the compute dtype for 16-bit runs; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def window_target_tokens(micro_batches: list[dict], parallel=None) -> int:
    """Target tokens of the accumulation window, summed over ranks under `parallel` (on the host: see
    ParallelModel.host_sum)."""
    n = sum(count_targets(b) for b in micro_batches)
    return int(parallel.host_sum([n])[0]) if parallel is not None else n


def accumulate_gradients(model: nn.Module, micro_batches: list[dict], *, device: torch.device,
                         dtype: torch.dtype, scaler=None, parallel=None) -> tuple[float, int]:
    """Run forward/backward over the window; returns (normalised loss of the window, its target tokens).

    Gradients end up equal to those of `sum_CE(window) / N_window`. Under DDP and FSDP2, gradients are averaged
    over ranks, so each rank's loss is multiplied by the world size to keep the global normalisation exact.

    Args:
        model: the plain model (its host-offloaded embeddings are prefetched per batch).
        parallel: a slimtune.train.distributed.ParallelModel; the loss then runs through the DDP/FSDP2 wrapper
            and gradients are reduced over ranks on the last micro-batch only. Every rank must pass the same
            number of micro-batches (an empty share is a dummy batch, see data_stream.dummy_example).
    """
    n_total = window_target_tokens(micro_batches, parallel)
    if n_total == 0:
        return 0.0, 0
    world = parallel.info.world_size if parallel is not None else 1
    scale = world / n_total
    total = torch.zeros((), dtype=torch.float32, device=device)
    for i, cpu_batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
        for key in _MEDIA_INPUTS:  # the processors emit fp32; half-precision towers need their own dtype
            if key in batch and dtype != torch.float32:
                batch[key] = batch[key].to(dtype)
        prefetch_host_embeddings(model, cpu_batch, batch)
        last = i == len(micro_batches) - 1
        with parallel.sync(last) if parallel is not None else contextlib.nullcontext():
            with autocast(device, dtype):
                loss = (parallel.loss(batch) if parallel is not None else loss_sum(model, batch)) * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach() / world
    loss_value = float(total)  # reading it waits for the GPU either way; the sum over ranks then runs on the host
    return (parallel.host_sum([loss_value])[0] if world > 1 else loss_value), n_total


def clip_and_step(params: list[nn.Parameter], optimizer, scheduler, *, max_grad_norm: float,
                  scaler=None) -> float:
    """Unscale (fp16), clip, step the optimizer and scheduler; returns the pre-clip global grad norm.

    A non-finite norm skips the optimizer step (the scheduler still advances, as for fp16's skipped steps)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    limit = max_grad_norm if max_grad_norm > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    # Under FSDP2 the grads are DTensor shards and the norm a DTensor: reduce it over the shards first.
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips the update when the scaled grads overflowed
        scaler.update()
    elif math.isfinite(grad_norm):
        optimizer.step()
    # else: a NaN/inf gradient is not applied (it would make the LoRA weights NaN); slimtune.train.guard counts it
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
