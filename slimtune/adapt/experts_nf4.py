"""NF4 (4-bit) storage for the fused MoE expert tensors of Gemma 4 26B-A4B, dequantized one routed expert at a time.

Why: Gemma4TextExperts keeps its experts as two 3-D nn.Parameters, ``gate_up_proj`` (E, 2I, H) and ``down_proj``
(E, H, I). They are not nn.Linear modules, so QLoRA's Linear4bit swap (slimtune.adapt.quantize) leaves them 16-bit:
22.8 B of 26B-A4B's 25 B parameters, ~42 GiB. In NF4 they take ~11 GiB.

Layout (`NF4ExpertStack`): each expert's (out, in) matrix is quantized on its own by bitsandbytes' ``quantize_4bit``
(NF4, blocksize 64, double-quantized absmax: the same call, so the same bytes, as a Linear4bit of that shape), and
the results are stacked with the expert as the leading dimension:

    packed           (E, ⌈out·in/2⌉)   uint8  two 4-bit codes per byte, high nibble first
    absmax           (E, nb=⌈out·in/64⌉) uint8  8-bit code of each 64-block's absmax
    nested_absmax    (E, ⌈nb/256⌉)     fp32   scale of each 256 absmax codes
    nested_offset    (E,)              fp32   mean subtracted from the absmax before it was quantized
    quant_map (16,), nested_quant_map (256,) fp32: the NF4 levels and bitsandbytes' 8-bit dynamic map

Row e of each tensor is expert e's contiguous slice, so dequantizing one expert reads only its own bytes. The
double quantization is per expert rather than over the flattened stack so that no block, 4-bit or nested,
straddles two experts whatever the shapes (26B-A4B's happen to align, other sizes need not); it costs one fp32
offset and at most one partial nested block per expert, < 0.001 bit/weight. Dequantization is
slimtune.adapt.quantize.dequantize_parts (bitsandbytes' kernels on CUDA, exact plain torch elsewhere).

Compute (`NF4Experts`): tokens are grouped by expert (slimtune.adapt.experts.route_to_experts, shared with
LoraExperts); only experts that received tokens run, and each dequantizes its weight inside `NF4ExpertMatmul`,
uses it and drops it. Backward dequantizes again: the node keeps only views of the 4-bit buffers, so at most one
expert's 16-bit weight exists at a time, and none lives across the layer. Expert LoRA (LoraExperts) wraps an
NF4Experts like a Gemma4TextExperts: its base product goes through the same node, its LoRA term is unchanged.

On CUDA in bf16 the same function runs as two grouped GEMMs over all experts instead (slimtune.adapt.experts_grouped:
the stack is dequantized whole inside each projection's node, forward and backward); this loop is the reference.

Why a module swap rather than transformers' experts registry: 5.17 and 5.24 both have ``use_experts_implementation``
(an ``ExpertsInterface`` function chosen by ``config._experts_implementation``), but such a function receives the
transformers module with its 16-bit 3-D parameters, and the choice is per config, not per module. NF4 storage would
still mean replacing those parameters by buffers of other shapes inside a transformers class whose own code (weight
init, save/load, grouped_mm) reads them as (E, out, in) tensors. A separate module with the same call signature,
(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H), leaves transformers' classes and config
untouched, as Linear4bit does for nn.Linear.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from slimtune.adapt.experts import EXPERT_PARAMS, route_to_experts
from slimtune.adapt.experts_grouped import capture_problem, grouped_experts_forward, use_grouped
from slimtune.adapt.lora_matmul import compute_dtype
from slimtune.adapt.quantize import dequantize_parts
from slimtune.errors import UnsupportedModelError

BLOCK = 64  # bitsandbytes' QLoRA blocksize (Linear4bit's default)
NESTED_BLOCK = 256  # bitsandbytes' blocksize for the double-quantized absmax


def _bnb_functional():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnb_f  # noqa: PLC0415 - optional heavy import, only for 4-bit

    return bnb_f


class NF4ExpertMatmul(torch.autograd.Function):
    """y = x · W_eᵀ for one frozen NF4 expert weight W_e (out, in), given by its `dequantize_parts` tuple.

    x (n, in) -> y (n, out). Gradient: dx = dy · W_e; W_e is frozen. W_e is dequantized in forward and again in
    backward; nothing is saved but the parts (views of the module's 4-bit buffers), as in lora_matmul.LoraMatmul.
    """

    @staticmethod
    def forward(ctx, x, parts):
        ctx.parts = parts
        return x @ dequantize_parts(parts, x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ dequantize_parts(ctx.parts, grad_out.dtype), None


class NF4ExpertStack(nn.Module):
    """One (E, out, in) expert tensor stored as NF4, expert by expert (layout in the module docstring).

    Built empty and filled with `quantize_expert`, so a loader never holds more than one expert's 16-bit matrix.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, *, dtype: torch.dtype,
                 device=None) -> None:
        super().__init__()
        if min(num_experts, out_features, in_features) <= 0:
            raise ValueError(f"NF4ExpertStack needs positive sizes, got ({num_experts}, {out_features}, "
                             f"{in_features}).")
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.weight_dtype = dtype  # the 16-bit dtype the weights had; the default dequantization dtype
        n = out_features * in_features
        blocks = -(-n // BLOCK)
        e = num_experts
        self.register_buffer("packed", torch.zeros(e, (n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(e, blocks, dtype=torch.uint8, device=device))
        self.register_buffer("nested_absmax", torch.zeros(e, -(-blocks // NESTED_BLOCK), device=device))
        self.register_buffer("nested_offset", torch.zeros(e, device=device))
        self.register_buffer("quant_map", torch.zeros(16, device=device))
        self.register_buffer("nested_quant_map", torch.zeros(256, device=device))
        self._quantized = [False] * e  # which experts hold weights (a loader must fill all of them)

    @property
    def shape(self) -> torch.Size:
        """(E, out, in): the shape of the 16-bit tensor this stack stands for."""
        return torch.Size((self.num_experts, self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def complete(self) -> bool:
        """Every expert has been quantized into the stack."""
        return all(self._quantized)

    @torch.no_grad()
    def quantize_expert(self, expert: int, weight: torch.Tensor) -> None:
        """Store expert `expert`'s (out, in) weight as NF4 (cast to the stack's 16-bit dtype and device first).

        Raises:
            ValueError: the weight's shape is not (out, in), or the expert index is out of range.
        """
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert index {expert} is out of range for {self.num_experts} experts.")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expert {expert}'s weight has shape {tuple(weight.shape)}; this stack holds "
                             f"({self.out_features}, {self.in_features}) matrices.")
        w = weight.to(device=self.packed.device, dtype=self.weight_dtype)
        packed, state = _bnb_functional().quantize_4bit(w, blocksize=BLOCK, compress_statistics=True,
                                                        quant_type="nf4")
        self.packed[expert].copy_(packed.reshape(-1))
        self.absmax[expert].copy_(state.absmax)
        self.nested_absmax[expert].copy_(state.state2.absmax)
        self.nested_offset[expert].copy_(state.offset)
        self.quant_map.copy_(state.code)
        self.nested_quant_map.copy_(state.state2.code)
        self._quantized[expert] = True

    def parts(self, expert: int, dtype: torch.dtype | None = None) -> tuple:
        """Expert `expert`'s NF4 weight as a `dequantize_parts` tuple: views of row `expert`, no copy."""
        # .float(): a no-op on the fp32 buffers; it keeps them fp32 for bitsandbytes' kernels if a caller cast the
        # model (model.to(bf16) / .double() also casts floating buffers).
        return (self.packed[expert], self.quant_map.float(), self.absmax[expert],
                self.nested_absmax[expert].float(), self.nested_quant_map.float(), NESTED_BLOCK,
                self.nested_offset[expert].float(), BLOCK, "nf4", (self.out_features, self.in_features),
                dtype or self.weight_dtype)

    def dequantize(self, expert: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert `expert`'s weight (out, in) in `dtype` (default: the stack's 16-bit dtype)."""
        return dequantize_parts(self.parts(expert, dtype), dtype or self.weight_dtype)

    def dequantize_all(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole (E, out, in) tensor in `dtype`: for the grouped path (slimtune.adapt.experts_grouped, inside
        one projection's node), export and tests; never kept across a step (it is the 16-bit copy this class
        exists to avoid).

        On CUDA, when neither 64-blocks nor nested 256-blocks straddle two experts (26B-A4B's shapes: 61952 and
        30976 blocks per expert), the rows are one contiguous bitsandbytes tensor: three kernels for all experts,
        each expert's own nested offset added per row of absmax. Otherwise, expert by expert into one buffer.
        """
        dtype = dtype or self.weight_dtype
        e, out_f, in_f = self.shape
        blocks = self.absmax.shape[1]
        if self.packed.is_cuda and (out_f * in_f) % BLOCK == 0 and blocks % NESTED_BLOCK == 0:
            _bnb_functional()  # registers torch.ops.bitsandbytes
            absmax = torch.ops.bitsandbytes.dequantize_blockwise(
                self.absmax.reshape(-1), self.nested_absmax.float().reshape(-1), self.nested_quant_map.float(),
                NESTED_BLOCK, torch.float32).view(e, blocks) + self.nested_offset.float()[:, None]
            w = torch.ops.bitsandbytes.dequantize_4bit(self.packed.reshape(-1), absmax.reshape(-1), BLOCK, "nf4",
                                                       [e * out_f, in_f], self.weight_dtype)
            return (w if w.dtype == dtype else w.to(dtype)).view(e, out_f, in_f)
        w = torch.empty(e, out_f, in_f, dtype=dtype, device=self.device)
        for expert in range(e):
            w[expert].copy_(self.dequantize(expert, dtype))
        return w

    def linear(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x (n, in) · W_eᵀ in the compute dtype (autocast's when on, else x's), through `NF4ExpertMatmul`."""
        dtype = compute_dtype(x)
        return NF4ExpertMatmul.apply(x.to(dtype), self.parts(expert, dtype))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, nf4, block={BLOCK}"


def expert_sizes(experts: nn.Module) -> tuple[int, int, int]:
    """(E, H, I) of a Gemma4TextExperts-like block, checked against the layout NF4Experts computes with.

    Works on meta modules (shapes only). Raises:
        UnsupportedModelError: missing attributes, biases, transposed or non-fused weights, or shapes other than
            gate_up_proj (E, 2I, H) and down_proj (E, H, I).
    """
    name = type(experts).__name__
    missing = [a for a in ("num_experts", "act_fn", *EXPERT_PARAMS) if not hasattr(experts, a)]
    if missing:
        raise UnsupportedModelError(f"{name} has no {missing}: NF4 experts need transformers' Gemma4TextExperts "
                                    "layout (gate_up_proj, down_proj, act_fn, num_experts).")
    odd = [flag for flag in ("has_bias", "is_transposed") if getattr(experts, flag, False)]
    if odd or getattr(experts, "is_concatenated", True) is False:
        raise UnsupportedModelError(f"{name} sets {odd or ['is_concatenated=False']}; NF4 experts support only "
                                    "bias-free, untransposed, concatenated [gate; up] weights (Gemma 4's).")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    e = int(experts.num_experts)
    if (gate_up.dim() != 3 or down.dim() != 3 or gate_up.shape[0] != e or down.shape[0] != e
            or gate_up.shape[1] != 2 * down.shape[2] or gate_up.shape[2] != down.shape[1]):
        raise UnsupportedModelError(f"{name} has gate_up_proj {tuple(gate_up.shape)} and down_proj "
                                    f"{tuple(down.shape)} for {e} experts; expected (E, 2I, H) and (E, H, I).")
    return e, int(down.shape[1]), int(down.shape[2])


class NF4Experts(nn.Module):
    """Drop-in for Gemma4TextExperts with both expert tensors in NF4 (`NF4ExpertStack`); frozen, no parameters.

    forward(hidden (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H), as the module it replaces.
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module, *,
                 dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.act_fn = act_fn
        self.gate_up_proj = NF4ExpertStack(num_experts, 2 * intermediate_dim, hidden_dim, dtype=dtype, device=device)
        self.down_proj = NF4ExpertStack(num_experts, hidden_dim, intermediate_dim, dtype=dtype, device=device)

    @classmethod
    def empty_like(cls, experts: nn.Module, dtype: torch.dtype, device=None) -> NF4Experts:
        """An unfilled NF4Experts with `experts`' sizes (which may be a meta module); fill each stack with
        `quantize_expert`."""
        e, h, i = expert_sizes(experts)
        return cls(e, h, i, experts.act_fn, dtype=dtype, device=device)

    @classmethod
    def from_experts(cls, experts: nn.Module, dtype: torch.dtype, device=None) -> NF4Experts:
        """Quantize a loaded Gemma4TextExperts, one expert matrix at a time (on `device`)."""
        out = cls.empty_like(experts, dtype, device)
        for name in EXPERT_PARAMS:
            stack, weight = getattr(out, name), getattr(experts, name)
            for e in range(stack.num_experts):
                stack.quantize_expert(e, weight[e].detach())
        return out

    @property
    def complete(self) -> bool:
        return self.gate_up_proj.complete and self.down_proj.complete

    def capture_problem(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why a CUDA graph on `device` cannot capture this block (None: it can); see experts_grouped."""
        return capture_problem(device, dtype, (self.hidden_dim, self.intermediate_dim))

    # Compiled decoder layers (slimtune.adapt.compile) call this eagerly, like LoraExperts: the per-expert group
    # sizes are Python ints that change every batch.
    @torch.compiler.disable
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if use_grouped(hidden_states, (self.hidden_dim, self.intermediate_dim)):
            return grouped_experts_forward(hidden_states, top_k_index, top_k_weights, self.num_experts, self.act_fn,
                                           self.gate_up_proj, self.down_proj)

        def run_expert(expert: int, x: torch.Tensor) -> torch.Tensor:
            gate, up = self.gate_up_proj.linear(x, expert).chunk(2, dim=-1)
            return self.down_proj.linear(self.act_fn(gate) * up, expert)

        return route_to_experts(hidden_states, top_k_index, top_k_weights, self.num_experts, run_expert)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, nf4"


def is_plain_experts(module: nn.Module) -> bool:
    """transformers' 16-bit Gemma4TextExperts (what 4-bit loading replaces)."""
    return type(module).__name__ == "Gemma4TextExperts"


def quantize_experts_nf4(model: nn.Module, dtype: torch.dtype, device) -> int:
    """Replace every Gemma4TextExperts of `model` by an NF4Experts (in place); returns how many were replaced.

    Args:
        dtype: the 16-bit dtype the weights are quantized from and dequantized to (the model's).
        device: where the NF4 buffers go (each expert matrix is moved there, then quantized).
    """
    names = [name for name, module in model.named_modules() if is_plain_experts(module)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Experts.from_experts(getattr(parent, child), dtype, device))
    return len(names)
