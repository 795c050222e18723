"""Gemma 4's RMSNorm with a lighter backward: saves its 16-bit input instead of an fp32 copy.

transformers' Gemma4RMSNorm computes in fp32: ``y = (x·(mean(x²)+eps)^-½ · w).type_as(x)`` with ``x`` upcast first.
Autograd then keeps that fp32 upcast for the backward: 4 bytes per element for each of a decoder layer's 5-8
hidden-size norms and its q/k/v norms, about half of what a checkpointed layer holds during its backward
(slimtune.memory.estimate). `RMSNormFunction` runs the same forward ops in the same order (bit-identical output)
but saves only the 16-bit input and the per-row ``rstd`` (fp32, one value per row), recomputing the fp32
normalisation in backward. It also replaces autograd's ~15 backward ops per norm by 7.

Backward (``x̂ = x·rstd``, ``g = dy·w``)::

    dx = rstd · (g − x̂ · mean(g·x̂))        dw = Σ_rows dy·x̂   (only if the weight trains; frozen here)

`swap_rms_norms(model)` replaces every Gemma4RMSNorm of the text decoder by `RecomputeRMSNorm`, which keeps the
same ``weight`` Parameter object (state-dict names, adapters and exports are unchanged).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNormFunction(torch.autograd.Function):
    """``(x·(mean(x²)+eps)^-½ · w).type_as(x)`` computed in fp32; ``weight`` may be None (no scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)  # transformers' op order: same bits
        y = xf * rstd
        if weight is not None:
            y = y * weight.float()
        ctx.save_for_backward(x, weight, rstd)
        return y.type_as(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = dy.float() if weight is None else dy.float() * weight.float()
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (dy.float() * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None


class RecomputeRMSNorm(nn.Module):
    """Drop-in for Gemma4RMSNorm (same ``eps``, ``with_scale`` and ``weight``) through `RMSNormFunction`."""

    def __init__(self, eps: float, weight: nn.Parameter | None) -> None:
        super().__init__()
        self.eps = eps
        self.with_scale = weight is not None
        if weight is not None:
            self.weight = weight  # the original Parameter: names, dtype, device and freezing unchanged

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(hidden_states, self.weight if self.with_scale else None, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, with_scale={self.with_scale}, saves the 16-bit input"


def swap_rms_norms(model: nn.Module) -> int:
    """Replace the text decoder's Gemma4RMSNorm modules by RecomputeRMSNorm in place; returns how many.

    The vision and audio towers keep theirs (they run frozen, mostly without gradients).
    """
    text = model.get_decoder() if hasattr(model, "get_decoder") else model
    names = [n for n, m in text.named_modules() if type(m).__name__ == "Gemma4RMSNorm"]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = text.get_submodule(parent_name) if parent_name else text
        old = getattr(parent, child)
        setattr(parent, child, RecomputeRMSNorm(old.eps, old.weight if old.with_scale else None))
    return len(names)
