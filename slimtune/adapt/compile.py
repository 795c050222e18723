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
    # Layers differ in shape (sliding/full attention head dims, double-wide MLPs, KV producers/consumers): each
    # variant is one more compiled graph of the same code. Past the default limit of 8, dynamo would silently run
    # the remaining variants eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in layers:
        layer.compile(dynamic=dynamic, mode=mode)
    return len(layers)
