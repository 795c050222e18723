"""Turn a CUDA out-of-memory during training into a message that says which setting to change."""

from __future__ import annotations

import dataclasses

import torch

from slimtune.memory.sizes import format_gib

_CONTEXT_RESERVE = 0.9
"""Share of the GPU's total memory offered to the planner: the CUDA context and the allocator's cached but unused
blocks live outside the predicted (allocated) peak."""


def explain_oom(cfg, exc: BaseException, gpu_total_bytes: int | None = None) -> str:
    """A readable explanation with concrete next settings: the planner's for this GPU, then simple tips.

    Args:
        gpu_total_bytes: the GPU's total memory; read from CUDA when None (and skipped without CUDA).
    """
    lines = [f"the training step did not fit in GPU memory ({str(exc).splitlines()[0][:160]})."]
    if gpu_total_bytes is None and torch.cuda.is_available():
        free, gpu_total_bytes = torch.cuda.mem_get_info()
        lines.append(f"GPU: {free / 2**30:.1f} GiB free of {gpu_total_bytes / 2**30:.1f} GiB.")
    from slimtune.memory.train_plan import plan_for_config  # noqa: PLC0415

    current = None  # the prediction for these settings, made once for the text and the 8-bit tip
    try:
        current = plan_for_config(_without_budget(cfg))
        lines.append(_prediction_and_plan(cfg, current, gpu_total_bytes))
    except Exception:  # the estimate is a hint; a model we cannot read must not hide the real message
        pass
    tips = []
    saving = _adamw8bit_saving(cfg, current)
    if saving >= 0.5 * 2**30:  # first when it is large: unlike dropping the graphs, it costs no speed
        # 26B-A4B with graphs ran out of memory at a 24 GB card's cap with AdamW and trained with 8-bit AdamW at
        # 5,012 tok/s, against 2,465 eager (BENCHMARKS.md, session 11)
        tips.append(f"--optimizer adamw8bit (~{format_gib(saving)} less optimizer state; CUDA graphs keep working)")
    if cfg.cuda_graphs is True or (cfg.cuda_graphs == "auto" and torch.cuda.is_available()):
        # a graph's memory pool is held for the whole run: 26B-A4B's captured step did not fit a 22.5 GiB cap
        # that its eager step fitted with 3 GiB to spare (BENCHMARKS.md, session 10)
        when = "" if cfg.cuda_graphs is True else " if the log said `cuda_graphs auto: on`"
        tips.append(f"--no-cuda-graphs{when} (a captured step keeps its own memory pool for the whole run)")
    if not cfg.load_in_4bit:
        tips.append("--load-in-4bit (NF4 base weights, ~4x less weight memory)")
    if cfg.batch_size > 1:
        tips.append(f"--batch-size 1 --grad-accum {cfg.batch_size * cfg.grad_accum} (same effective batch)")
    if not cfg.gradient_checkpointing:
        tips.append("drop --no-gradient-checkpointing (recompute activations in backward)")
    tips.append(f"--max-seq-length {max(256, cfg.max_seq_length // 2)} (activations scale with sequence length)")
    lines.append("Try, in this order: " + "; ".join(tips) + ".")
    return " ".join(lines)


def _prediction_and_plan(cfg, current, gpu_total_bytes: int | None) -> str:
    from slimtune.memory.planner import MemoryBudgetError, plan_memory  # noqa: PLC0415
    from slimtune.memory.sizes import parse_memory_size  # noqa: PLC0415
    from slimtune.memory.train_plan import graph_fixed_settings, model_ref, plan_changes  # noqa: PLC0415

    terms = ", ".join(f"{name} {gib:.2f} GiB" for name, gib in current.main_terms(2))
    text = f"Predicted peak for these settings: {format_gib(current.predicted_bytes)} (largest: {terms})."
    if cfg.max_memory is not None:
        budget = parse_memory_size(cfg.max_memory)
    elif gpu_total_bytes:
        budget = int(gpu_total_bytes * _CONTEXT_RESERVE)
    else:
        return text
    # Advice, so nothing is held fixed except what defines the run: the effective batch, the LoRA rank and what
    # it adapts (a 26B-A4B plan without its expert LoRA would fit where the run cannot), and whether it captures.
    context = {k: current.settings[k] for k in ("lora_r", "attention", "activation_bytes", "world_size",
                                                 "distributed", "multimodal", "text_only", "finetune_experts",
                                                 "cuda_graphs")}
    context.update(graph_fixed_settings(cfg))
    try:
        plan = plan_memory(model_ref(cfg.model), cfg.max_seq_length, budget,
                           batch_size=cfg.batch_size * cfg.grad_accum, **context)
    except MemoryBudgetError as err:
        return (f"{text} The memory planner finds nothing that fits {format_gib(budget)} at max_seq_length "
                f"{cfg.max_seq_length}; the longest that fits is {err.longest_seq}.")
    # what would change in this run (plan.changes compares with the planner's fastest start instead)
    flags = ", ".join(f"{k}={v}" for k, v in plan_changes(cfg, plan).items()) or "the current settings"
    return (f"{text} The memory planner's suggestion for {format_gib(budget)}: {flags} "
            f"(predicted {format_gib(plan.predicted_bytes)}); or pass --max-memory {budget / 2**30:.1f}GiB "
            "to apply it.")


def _adamw8bit_saving(cfg, current) -> int:
    """Predicted bytes 8-bit AdamW would save against `current`, cfg's own prediction (0 when cfg already uses it
    or there is no prediction)."""
    if cfg.optimizer != "adamw" or current is None:
        return 0
    from slimtune.memory.train_plan import plan_for_config  # noqa: PLC0415

    try:
        eight_bit = plan_for_config(dataclasses.replace(_without_budget(cfg), optimizer="adamw8bit"))
    except Exception:  # a hint only: it must not hide the real message
        return 0
    return max(0, current.predicted_bytes - eight_bit.predicted_bytes)


def _without_budget(cfg):
    return dataclasses.replace(cfg, max_memory=None) if cfg.max_memory is not None else cfg
