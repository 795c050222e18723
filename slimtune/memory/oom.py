"""Turn a CUDA out-of-memory during training into a message that says which setting to change."""

from __future__ import annotations

import torch


def explain_oom(cfg, exc: BaseException) -> str:
    """A readable explanation with concrete next settings (and the estimate for the current ones)."""
    lines = [f"the training step did not fit in GPU memory ({str(exc).splitlines()[0][:160]})."]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(f"GPU: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB.")
    try:
        from slimtune.memory.estimate import estimate_training_memory  # noqa: PLC0415

        est = estimate_training_memory(cfg.model, seq_len=cfg.max_seq_length, batch_size=cfg.batch_size,
                                       load_in_4bit=cfg.load_in_4bit, lora_r=cfg.lora_r,
                                       gradient_checkpointing=cfg.gradient_checkpointing)
        lines.append(f"Estimated need for these settings: {est['total_gib']:.1f} GiB "
                     f"(largest term: {max(est['breakdown'], key=est['breakdown'].get)}).")
    except Exception:  # the estimate is a hint; a model we cannot read must not hide the real message
        pass
    tips = []
    if not cfg.load_in_4bit:
        tips.append("--load-in-4bit (NF4 base weights, ~4x less weight memory)")
    if cfg.batch_size > 1:
        tips.append(f"--batch-size 1 --grad-accum {cfg.batch_size * cfg.grad_accum} (same effective batch)")
    if not cfg.gradient_checkpointing:
        tips.append("drop --no-gradient-checkpointing (recompute activations in backward)")
    tips.append(f"--max-seq-length {max(256, cfg.max_seq_length // 2)} (activations scale with sequence length)")
    lines.append("Try, in this order: " + "; ".join(tips) + ".")
    return " ".join(lines)
