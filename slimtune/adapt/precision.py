"""Half-precision safety for Gemma 4's audio tower.

The audio attention upcasts q/k/v to fp32 on purpose and then fills masked logits with -1e9. Under fp16
autocast (GPUs without bf16, e.g. T4) its matmuls are cast back to fp16 and the -1e9 fill overflows
("value cannot be converted to type c10::Half"). We keep the tower out of autocast, so it runs in its weights'
dtype with the fp32 attention it was written for. Only the instance's forward is wrapped: module names, state
dict keys and LoRA targets are unchanged, and nothing in transformers is modified.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def keep_out_of_autocast(module: nn.Module) -> None:
    """Run `module` with CPU and CUDA autocast disabled (idempotent)."""
    if getattr(module, "_slimtune_no_autocast", False):
        return
    original = module.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return original(*args, **kwargs)

    module.forward = forward
    module._slimtune_no_autocast = True


def protect_audio_tower(model: nn.Module) -> bool:
    """Apply `keep_out_of_autocast` to a Gemma 4 audio tower; False when the model has none."""
    tower = getattr(getattr(model, "model", None), "audio_tower", None)
    if tower is None:
        return False
    keep_out_of_autocast(tower)
    return True
