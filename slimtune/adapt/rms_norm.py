"""Gemma 4's RMSNorm with a lighter backward: saves its 16-bit input instead of an fp32 copy.

transformers' Gemma4RMSNorm computes in fp32: ``y = (x·(mean(x²)+eps)^-½ · w).type_as(x)`` with ``x`` upcast first.
Autograd then keeps that fp32 upcast for the backward: 4 bytes per element for each of a decoder layer's 5-8
hidden-size norms and its q/k/v norms, about half of what a checkpointed layer holds during its backward
(slimtune.memory.estimate). `RMSNormFunction` runs the same forward ops in the same order (bit-identical output)
but saves only the 16-bit input and the per-row ``rstd`` (fp32, one value per row), recomputing the fp32
normalisation in backward. It also replaces autograd's ~15 backward ops per norm by 7.

Backward (``x̂ = x·rstd``, ``g = dy·w``)::

    dx = rstd · (g − x̂ · mean(g·x̂))        dw = Σ_rows dy·x̂   (only if the weight trains; frozen here)

On CUDA (Triton, frozen weight) the module runs `slimtune.kernels.rms_norm` instead: the same function and saved
tensors in one fused kernel each way, not bit-identical (fp32 sum order) but within fp32 rounding.

`swap_rms_norms(model)` replaces every Gemma4RMSNorm of the text decoder by `RecomputeRMSNorm`, which keeps the
same ``weight`` Parameter object (state-dict names, adapters and exports are unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.kernels.rms_norm import fused_rms_norm, fused_rms_norm_available, rms_norm_backward_reference


CHUNK_ELEMENTS = 1 << 22
"""Rows are normalised in chunks of at most this many values (16 MiB per fp32 temporary). Why: the fp32 upcast and
its products are full-size temporaries; on E2B's q_norm at 67K tokens each is 1.1 GiB, and the backward's four of
them alive at once made the measured peak 5.6 GiB higher than planned (H200, session 4). Every row is computed by
the same ops whatever the chunking, so the output bits do not change."""


def _row_chunks(rows: int, width: int, chunk_elements: int):
    step = max(1, chunk_elements // max(1, width))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class RMSNormFunction(torch.autograd.Function):
    """``(x·(mean(x²)+eps)^-½ · w).type_as(x)`` computed in fp32; ``weight`` may be None (no scale)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float,
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        width = x.shape[-1]
        x2 = x.reshape(-1, width)
        out = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
        wf = None if weight is None else weight.float()
        for a, b in _row_chunks(x2.shape[0], width, chunk_elements):
            xf = x2[a:b].float()
            r = torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)  # transformers' op order: same bits
            y = xf * r
            if wf is not None:
                y = y * wf
            out[a:b] = y  # rounds to x's dtype like .type_as(x)
            rstd[a:b] = r
        ctx.save_for_backward(x, weight, rstd)
        ctx.chunk_elements = chunk_elements
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        x2, dy2 = x.reshape(-1, width), dy.reshape(-1, width)
        dx = torch.empty_like(x2)
        want_dw = weight is not None and ctx.needs_input_grad[1]
        dw = torch.zeros(width, dtype=torch.float32, device=x.device) if want_dw else None
        for a, b in _row_chunks(x2.shape[0], width, ctx.chunk_elements):
            dx[a:b] = rms_norm_backward_reference(dy2[a:b], x2[a:b], weight, rstd[a:b, 0])
            if want_dw:
                dw += (dy2[a:b].float() * (x2[a:b].float() * rstd[a:b])).sum(0)
        return dx.view(x.shape), None if dw is None else dw.to(weight.dtype), None, None


class RecomputeRMSNorm(nn.Module):
    """Drop-in for Gemma4RMSNorm (same ``eps``, ``with_scale`` and ``weight``) through `RMSNormFunction`."""

    def __init__(self, eps: float, weight: nn.Parameter | None, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__()
        self.eps = eps
        self.chunk_elements = chunk_elements
        self.with_scale = weight is not None
        if weight is not None:
            self.weight = weight  # the original Parameter: names, dtype, device and freezing unchanged

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.with_scale else None
        if fused_rms_norm_available(hidden_states, weight):  # CUDA: one kernel each way, same saved tensors
            return fused_rms_norm(hidden_states, weight, self.eps)
        return RMSNormFunction.apply(hidden_states, weight, self.eps, self.chunk_elements)

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
