"""One autograd node per LoRA linear: y = x·Wᵀ + s·(d(x)·Aᵀ)·Bᵀ, for a 16-bit or an NF4 frozen W.

Why: the module-by-module path (bitsandbytes' Linear4bit → MatMul4Bit, nn.Linear A, nn.Linear B, autocast casts
of the fp32 A and B, scale, add) costs about ten autograd nodes and Python dispatches per linear. E2B has 245
adapted linears, each run three times a step (forward, checkpoint recompute, backward): the H200 profile showed
the 2K step bound by that CPU work (GPU busy 20–29 %, 33 K host ops per step). Here each linear is one node with
4 GPU kernels forward (dequantize, base matmul, x·Aᵀ, fused add of the update) and 6 backward.

Memory: only the LoRA input and x·Aᵀ (rank r columns) are saved; the dequantized W is never saved — backward
rebuilds it from the 4-bit codes, as bitsandbytes does. All ops are plain aten / registered torch ops
(``torch.ops.bitsandbytes.*``), so torch.compile traces through a decoder layer without a graph break.
"""

from __future__ import annotations

import torch

from slimtune.adapt.quantize import dequantize_parts, nf4_parts, nf4_state


def _weight(weight: torch.Tensor | None, parts: tuple | None, dtype: torch.dtype) -> torch.Tensor:
    if parts is not None:
        return dequantize_parts(parts, dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


class LoraMatmul(torch.autograd.Function):
    """Forward and backward of a frozen linear plus its low-rank update, in the compute dtype.

    Inputs: x (.., in) for the base, xd = dropout(x) for the update (None without dropout), the
    16-bit base weight or None with `parts` (NF4), A (r, in) and B (out, r) in fp32. Gradients come back for x,
    xd, A and B (in their own dtype: fp32); the base weight is frozen.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, parts, lora_a, lora_b, scaling):
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if xd is None else xd.reshape(-1, xd.shape[-1])
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        out = x2 @ _weight(weight, parts, dtype).t()
        xa = xd2 @ a.t()
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.scaling, ctx.parts, ctx.same_input = scaling, parts, xd is None
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        # the compute-dtype copies of A and B (r·(in+out) values) are kept: casting again in backward costs launches
        ctx.save_for_backward(xd2, xa, weight, a, b)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xd2, xa, weight, a, b = ctx.saved_tensors
        dtype = xd2.dtype
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        gb = (g @ b) * ctx.scaling  # (n, r): gradient of the update wrt x·Aᵀ
        grad_x = grad_xd = grad_a = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_x = g @ _weight(weight, ctx.parts, dtype)
            if ctx.same_input:
                grad_x.addmm_(gb, a)
            else:
                grad_xd = (gb @ a).reshape(*grad_out.shape[:-1], a.shape[1])
            grad_x = grad_x.reshape(*grad_out.shape[:-1], grad_x.shape[-1])
        if ctx.needs_input_grad[4]:
            grad_a = (gb.t() @ xd2).to(ctx.lora_dtypes[0])
        if ctx.needs_input_grad[5]:
            grad_b = (g.t() @ xa).mul_(ctx.scaling).to(ctx.lora_dtypes[1])
        if ctx.same_input:
            grad_xd = None
        return grad_x, grad_xd, None, None, grad_a, grad_b, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def lora_matmul(x: torch.Tensor, base_layer, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                dropout=None) -> torch.Tensor:
    """base_layer(x) + scaling · dropout(x)·Aᵀ·Bᵀ through `LoraMatmul` (16-bit nn.Linear or NF4 Linear4bit base)."""
    dtype = compute_dtype(x)
    if x.dtype != dtype:
        x = x.to(dtype)
    xd = dropout(x) if dropout is not None else None  # None, not x: torch.compile refuses one tensor twice
    if nf4_state(base_layer) is not None:
        weight, parts = None, nf4_parts(base_layer)
    else:
        weight, parts = base_layer.weight, None
    out = LoraMatmul.apply(x, xd, weight, parts, lora_a, lora_b, scaling)
    bias = getattr(base_layer, "bias", None)
    return out + bias.to(out.dtype) if bias is not None else out
