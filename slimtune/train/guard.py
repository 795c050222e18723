"""Non-finite steps are skipped, and a run whose loss or gradients stay NaN/inf stops with what to change.

A NaN gradient applied by AdamW turns every LoRA weight it touches into NaN, and every later step trains a broken
model while the loop keeps printing losses (the standard stack's behaviour). Here the step is not applied
(slimtune.train.step.clip_and_step; captured steps pass ``found_inf`` to the fused AdamW), the metrics mark it
``skipped``, and `NonFiniteGuard` raises once it happens several times in a row. fp16 runs are allowed more:
their loss scaler skips overflowing steps on purpose while it lowers the scale.
"""

from __future__ import annotations

import math

from slimtune.errors import TrainingDivergedError

PATIENCE = 3
"""Consecutive non-finite steps that stop a bf16/fp32 run."""
PATIENCE_FP16 = 20
"""... and an fp16 run: the loss scaler halves its scale on each overflow (2^16 → 1 in 16 steps)."""


class NonFiniteGuard:
    """Counts consecutive steps with a non-finite loss or gradient norm; raises after `patience` of them."""

    def __init__(self, *, fp16: bool, lr: float) -> None:
        self.patience = PATIENCE_FP16 if fp16 else PATIENCE
        self.fp16, self.lr = fp16, lr
        self.run: list[int] = []

    def update(self, step: int, loss: float, grad_norm: float) -> bool:
        """Record a step; returns True when it was non-finite (its update was skipped)."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.run = []
            return False
        self.run.append(step)
        if len(self.run) >= self.patience:
            raise TrainingDivergedError(
                f"training diverged: the loss or the gradient norm was NaN/inf at steps {self.run[0]}-{step} "
                f"({len(self.run)} in a row; last loss {loss}, grad norm {grad_norm}). Those updates were skipped, "
                f"so the LoRA weights are the last finite ones, but the run cannot continue. Try: a lower lr "
                f"(now {self.lr:g}), max_grad_norm 1.0, "
                + ("dtype bfloat16 if the GPU has it (fp16 overflows), " if self.fp16 else "")
                + "and check the data for extreme or empty samples. Resume from the last checkpoint with --resume."
            )
        return True
