"""NF4 (4-bit NormalFloat) base weights through bitsandbytes.

Frozen linear weights become `bitsandbytes.nn.Linear4bit` modules (NF4, double-quantized statistics) that compute
in the model's 16-bit dtype; MoE expert blocks become slimtune.adapt.experts_nf4.NF4Experts (the same format,
stored per expert). Nothing frozen is upcast to fp32: that upcast is why the standard stack's QLoRA
uses more memory than bf16 LoRA on E2B (its 2.35 B-parameter per-layer-embedding table becomes fp32).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from slimtune.models.registry import ModelFamily

# Large frozen projections outside attention/MLP that are worth 4 bits: Gemma 4's per-layer-embedding (PLE) path.
_EXTRA_QUANTIZED = ("per_layer_input_gate", "per_layer_projection", "per_layer_model_projection")


def _bnb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb  # noqa: PLC0415 - optional heavy import, only for 4-bit
    return bnb


def quantizable_linear_names(model: nn.Module, family: ModelFamily) -> list[str]:
    """Names of the nn.Linear modules that 4-bit loading replaces (inner `.linear` of clippable wrappers)."""
    wanted = set(family.attention_modules) | set(family.mlp_modules) | set(_EXTRA_QUANTIZED)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        leaf = parts[-2] if parts[-1] == "linear" and len(parts) > 1 else parts[-1]
        if leaf in wanted:
            names.append(name)
    return names


def make_nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Quantize one frozen nn.Linear to a bitsandbytes NF4 Linear4bit on `device`."""
    bnb = _bnb()
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type="nf4",
        compress_statistics=True,
        device="meta",
    )
    # Quantization happens when Params4bit moves to its device; start from the 16-bit weights, never fp32 copies.
    weight = linear.weight.data.to(compute_dtype)
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    q = q.to(device)
    keep_standard_nf4_layout(q)
    return q


def keep_standard_nf4_layout(model: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking in every NF4 linear of `model` (undoing one already done).

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight at its first eval-mode no-grad forward,
    for good, and from then on multiplies through a kernel without a backward: once training resumes, no gradient
    flows back through the frozen NF4 linears that carry no adapter (E2B/E4B's per-layer gates and projections),
    so every LoRA weight before them got a wrong gradient after the first evaluation (measured: 90 % off), with
    only a warning. The repack also failed outright on linears narrower than a quantization block.
    """
    for module in model.modules():
        if is_nf4_linear(module):
            module.support_avx512bf16_for_cpu = False
            if getattr(nf4_state(module), "packing_format_for_cpu", False):
                module.state_dict()  # bitsandbytes restores its standard layout when it saves the module


def nf4_module_names(model: nn.Module, family: ModelFamily) -> list[str]:
    """Every module 4-bit loading stores in NF4: the family's linears (Linear4bit) and the MoE expert blocks
    (transformers' Gemma4TextExperts → slimtune.adapt.experts_nf4.NF4Experts)."""
    experts = [name for name, module in model.named_modules() if type(module).__name__ == "Gemma4TextExperts"]
    return quantizable_linear_names(model, family) + experts


def quantize_model_nf4(model: nn.Module, family: ModelFamily, compute_dtype: torch.dtype, device) -> int:
    """Replace the family's frozen linears by NF4 Linear4bit modules and the MoE expert blocks by NF4Experts, in
    place; returns how many modules were replaced."""
    # experts_nf4 builds on this module (dequantize_parts): imported here, not at the top, to avoid the cycle
    from slimtune.adapt.experts_nf4 import quantize_experts_nf4  # noqa: PLC0415

    names = quantizable_linear_names(model, family)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make_nf4_linear(getattr(parent, child), compute_dtype, device))
    return len(names) + quantize_experts_nf4(model, compute_dtype, device)


def is_nf4_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear (without importing bitsandbytes when it was never used)."""
    return type(module).__name__ == "Linear4bit"


def dequantize_nf4_weight(module: nn.Module) -> torch.Tensor:
    """The 16-bit weight an NF4 Linear4bit computes with, in plain torch (see `dequantize_bnb_4bit`)."""
    return _dequantize_parts_torch(nf4_parts(module))


def nf4_state(base_layer):
    """The bitsandbytes QuantState of a 4-bit linear, or None (not NF4, or not quantized yet).

    Under FSDP2 the all-gathered weight is a plain uint8 Parameter without bitsandbytes' ``quant_state``; the
    state is then the module's ``quant_state`` (bitsandbytes' own place for it under FSDP; see
    slimtune.train.distributed._fully_shard)."""
    if not is_nf4_linear(base_layer):
        return None
    state = getattr(base_layer.weight, "quant_state", None)
    return state if state is not None else getattr(base_layer, "quant_state", None)


def nf4_parts(base_layer) -> tuple:
    """The tensors and sizes that define a bitsandbytes 4-bit weight in its standard layout (read each call:
    parameters can be replaced)."""
    state = nf4_state(base_layer)
    if getattr(state, "packing_format_for_cpu", False):
        # On CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights for its inference kernel at the first
        # eval-mode forward; the stored layout is no longer the standard one. Saving the module restores it,
        # through bitsandbytes' own code.
        base_layer.state_dict()
        state = base_layer.weight.quant_state
    return _parts(base_layer.weight.data, state)


def _parts(packed: torch.Tensor, state) -> tuple:
    if state.nested:
        s2 = state.state2
        nested = (state.absmax, s2.absmax, s2.code, s2.blocksize, state.offset)
    else:
        nested = (state.absmax, None, None, 0, None)
    return (packed, state.code, *nested, state.blocksize, state.quant_type, tuple(state.shape), state.dtype)


def dequantize_parts(parts: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The 16-bit weight of `nf4_parts` (CUDA: bitsandbytes' kernels; elsewhere: exact plain torch)."""
    packed, code, absmax, nested_absmax, nested_code, nested_block, offset, block, quant_type, shape, wdtype = parts
    if packed.device.type == "cuda":
        if nested_absmax is not None:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, nested_absmax, nested_code, nested_block,
                                                                 torch.float32) + offset
        w = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax.float(), block, quant_type, list(shape), wdtype)
        return w if w.dtype == dtype else w.to(dtype)
    return _dequantize_parts_torch(parts).to(dtype)


def _dequantize_parts_torch(parts: tuple) -> torch.Tensor:
    packed, code, absmax, nested_absmax, nested_code, nested_block, offset, block, _, shape, wdtype = parts
    n = 1
    for s in shape:
        n *= s
    absmax = _block_absmax_torch(absmax, nested_absmax, nested_code, nested_block, offset)
    raw = packed.contiguous().view(torch.uint8).reshape(-1)
    codes = torch.stack([raw >> 4, raw & 0x0F], dim=-1).reshape(-1)[:n].long()
    full = code.float()[codes] * absmax.repeat_interleave(block)[:n]
    return full.reshape(shape).to(wdtype)


def _block_absmax_torch(absmax, nested_absmax, nested_code, nested_block, offset) -> torch.Tensor:
    if nested_absmax is not None:  # double quantization: 8-bit absmax codes, scaled per nested block, + offset
        scale2 = nested_absmax.float().repeat_interleave(nested_block)[: absmax.numel()]
        absmax = nested_code.float()[absmax.long()] * scale2 + torch.as_tensor(offset, dtype=torch.float32)
    return absmax.float()


def dequantize_bnb_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """Dequantize one bitsandbytes NF4/FP4 weight in plain torch (any device).

    Two 4-bit codes per byte (high nibble first) index ``state.code`` (the 16 NF4/FP4 levels) and are scaled by
    their block's absmax; with double quantization the absmax values are themselves 8-bit codes scaled per
    256-block, plus ``state.offset``. bitsandbytes' own ``dequantize_4bit`` is not used because its CPU kernel
    (0.50.2) returns wrong values when a row's length is not a multiple of the block size (e.g. the 4304-wide MLP
    of the large vision tower); the stored codes are right, only that kernel is not.

    Returns:
        The weight, shaped ``state.shape``, in ``state.dtype``.
    """
    return _dequantize_parts_torch(_parts(packed, state))


def bnb_block_absmax(state) -> torch.Tensor:
    """Per-block absmax of a bitsandbytes 4-bit weight as stored (decoding double quantization), fp32."""
    return _block_absmax_torch(*_parts(state.absmax, state)[2:7])
