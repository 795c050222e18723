"""Regional torch.compile: each decoder layer compiled on its own (one graph reused by every layer of a shape).

Compiling layer by layer instead of the whole model keeps compile time to seconds, keeps transformers' own
module structure (LoRA swaps, checkpointing, KV sharing untouched) and fuses the elementwise work between
matmuls (RMSNorm, GeGLU, RoPE, residual scaling) that otherwise costs one kernel launch each.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_decoder_layers(model: nn.Module, *, dynamic: bool | None = None, mode: str | None = None) -> int:
    """Compile every text decoder layer in place; returns how many were compiled (0 without torch.compile)."""
    if not hasattr(torch, "compile"):
        return 0
    layers = model.get_decoder().layers
    for layer in layers:
        layer.compile(dynamic=dynamic, mode=mode)
    return len(layers)
