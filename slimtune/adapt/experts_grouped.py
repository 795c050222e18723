"""Grouped-GEMM MoE experts: every expert's rows in one ``torch._grouped_mm`` per projection, instead of one Python
iteration (and ~6 small kernels) per routed expert. Used by NF4Experts (QLoRA) and LoraExperts (16-bit or NF4 base,
with expert LoRA); the per-expert loop (slimtune.adapt.experts.route_to_experts) stays as the reference.

Routing (`_sort`): the T·k (token, expert) pairs are sorted by expert and ``offs[e]`` is the end row of expert e's
group (int32 cumulative, the convention of _grouped_mm). Nothing is read back to the host: the loop path syncs once
per block for its group sizes, this one does not. Expert ids >= E (expert-parallel sentinels) are counted in expert
E-1's group with routing weight 0, so they add exactly nothing to the output and get a zero gradient; keeping them
in a group (rather than past offs[-1]) matters because rows past the last offset are left uninitialised by the CUDA
kernel. Empty groups are fine for the row-split products; the per-expert LoRA gradients (whose groups split the
contraction) are zeroed explicitly for experts without rows rather than trusting what the kernel writes there.

Weights (`_GroupedProjection`): y = x·W_eᵀ (+ s·(x·A_eᵀ)·B_eᵀ) for every group's rows. An NF4 stack is dequantized
whole (E, out, in) inside the node's forward and again inside its backward; nothing but the 4-bit buffers is kept
in between. Why: at 2K tokens × top-8 almost all 128 experts are hit, so the stack is dequantized whole (skipping
empty experts would need a host sync), and keeping it for backward would mean one 16-bit stack per layer alive from
forward to backward (26B-A4B: 1.5 GB × 30 layers, the whole saving of QLoRA). Each projection is its own node, so
gate_up's stack (E·2I·H: 1.0 GB bf16 on 26B-A4B) is freed before down's (E·H·I: 0.5 GB) is built, in forward and
in backward: the designed transient is the larger stack alone (slimtune.memory counts it).

Expert LoRA: A (E, r, in) and B (E, out, r) are products of the same groups, so they run as grouped GEMMs too
(two more products per projection forward, four backward, each with r on one side). bmm over padded groups was the
alternative: it needs the largest group size on the host (a sync) and a (E, max_group, in) zero-padded copy of the
activations, which under uneven routing is several times the rows that exist. _grouped_mm needs 16-byte-aligned
strides, so the rank is zero-padded to a multiple of 8 (zero rows of A and zero columns of B change nothing, and
their gradients are dropped by the padding's own backward).

Selection (`use_grouped`): the module switch ``IMPL`` ("auto" | "loop" | "grouped", also the environment variable
SLIMTUNE_EXPERTS_IMPL) forces either path; "auto" takes the grouped path on CUDA with bf16 compute (the only dtype
the CUDA kernel takes) and widths that are multiples of 8, and the loop elsewhere (CPU: the kernel exists in recent
torch, but the loop is the reference there and tests force "grouped" to compare).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.nn import functional as F

from slimtune.adapt.lora_matmul import compute_dtype

IMPLS = ("auto", "loop", "grouped")
IMPL = os.environ.get("SLIMTUNE_EXPERTS_IMPL", "auto")
"""Which MoE experts path runs: "auto" (grouped where `grouped_supported`), "loop" or "grouped" (forced)."""

ALIGN = 8  # 16 bytes of bf16: _grouped_mm's stride alignment


def set_experts_impl(impl: str) -> None:
    """Force the experts path for the whole process ("auto" | "loop" | "grouped")."""
    global IMPL
    if impl not in IMPLS:
        raise ValueError(f"experts implementation must be one of {IMPLS} (got {impl!r})")
    IMPL = impl


@contextlib.contextmanager
def experts_impl(impl: str):
    """`set_experts_impl` for a block of code (tests and benchmarks compare both paths in one process)."""
    before = IMPL
    set_experts_impl(impl)
    try:
        yield
    finally:
        set_experts_impl(before)


def grouped_supported(device: torch.device, dtype: torch.dtype, widths) -> bool:
    """The grouped kernel can run here: CUDA sm80+ (torch >= 2.9's _grouped_mm), bf16, widths multiples of 8."""
    return (hasattr(torch, "_grouped_mm") and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 0) and all(w % ALIGN == 0 for w in widths))


def runs_grouped(device: torch.device, dtype: torch.dtype, widths) -> bool:
    """Whether a block computing in `dtype` on `device` takes the grouped path, per the switch `IMPL`."""
    if IMPL not in IMPLS:
        raise ValueError(f"SLIMTUNE_EXPERTS_IMPL must be one of {IMPLS} (got {IMPL!r})")
    if IMPL == "auto":
        return grouped_supported(device, dtype, widths)
    if IMPL == "grouped" and not hasattr(torch, "_grouped_mm"):
        raise RuntimeError(f"experts implementation 'grouped' needs torch._grouped_mm (torch {torch.__version__}).")
    return IMPL == "grouped"


def use_grouped(x: torch.Tensor, widths) -> bool:
    """Whether a block runs grouped for input x (see the module docstring)."""
    return runs_grouped(x.device, compute_dtype(x), widths)


def capture_problem(device: torch.device, dtype: torch.dtype, widths) -> str | None:
    """Why a CUDA graph cannot capture a block's forward and backward on `device` (None: it can).

    The grouped path never reads a value back to the host (offsets stay on the GPU), so a captured step can hold
    it; the loop path reads the group sizes every block. torch's _grouped_mm is sync-free in its Hopper (sm90)
    kernels only: on other GPUs it falls back to a loop over offsets copied to the host.
    """
    if not runs_grouped(device, dtype, widths):
        return "the per-expert loop reads each expert's token count on the host (the grouped path needs bf16 on CUDA)"
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "torch's grouped GEMM reads its offsets on the host on GPUs other than Hopper (sm90)"
    return None


def _weight(base, dtype: torch.dtype) -> torch.Tensor:
    """A base expert weight as (E, out, in) in `dtype`: dequantized for an NF4 stack, cast (no copy if it already
    is `dtype`) for a 16-bit tensor."""
    if isinstance(base, torch.Tensor):
        return base.to(dtype)
    return base.dequantize_all(dtype)


def _mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


class _GroupedProjection(torch.autograd.Function):
    """y (M, out) = x_g · W_gᵀ + s · (x_g · A_gᵀ) · B_gᵀ for each group g of rows (offs), W frozen.

    x (M, in), A (E, r8, in), B (E, out, r8) all in the compute dtype; base a 16-bit (E, out, in) tensor or an
    NF4ExpertStack. Backward, per group: dx = dy·W + s·(dy·B)·A; dA = s·(dy·B)ᵀ·x; dB = s·dyᵀ·(x·Aᵀ); grouped
    GEMMs throughout (the gradient ones split the contraction by offs). Saves x and x·Aᵀ (r8 columns) only with
    factors, and never the 16-bit W of an NF4 base (re-dequantized here, see the module docstring).
    """

    @staticmethod
    def forward(ctx, x, offs, empty, base, lora_a, lora_b, scaling):
        w = _weight(base, x.dtype)
        y = _mm(x, w.transpose(-2, -1), offs)
        del w  # an NF4 stack's 16-bit copy dies here, before the next projection dequantizes its own
        xa = None
        if lora_a is not None:
            xa = _mm(x, lora_a.transpose(-2, -1), offs)
            y = y + _mm(xa, lora_b.transpose(-2, -1), offs) * scaling
        ctx.base, ctx.scaling = base, scaling
        # x only for the factors' gradients: without LoRA, dx needs dy and W alone, and keeping x would hold
        # T·k rows of every checkpoint-free layer's input until its backward (the loop's node keeps none either)
        ctx.save_for_backward(x if lora_a is not None else None, offs, empty, lora_a, lora_b, xa)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, offs, empty, lora_a, lora_b, xa = ctx.saved_tensors
        dy = dy.contiguous()  # an expanded gradient (e.g. of a sum) has zero strides, which the kernel refuses
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dy, _weight(ctx.base, dy.dtype), offs)
        if lora_a is not None:
            ds = dy * ctx.scaling
            dxa = _mm(ds, lora_b, offs)  # (M, r8)
            if ctx.needs_input_grad[0]:
                dx = dx + _mm(dxa, lora_a, offs)
            keep = ~empty[:, None, None]  # experts with no rows: zero, whatever the kernel wrote for an empty K
            if ctx.needs_input_grad[4]:
                da = torch.where(keep, _mm(dxa.t(), x, offs), 0)
            if ctx.needs_input_grad[5]:
                db = torch.where(keep, _mm(ds.t(), xa, offs), 0)
        return dx, None, None, None, da, db, None


def _lora_factors(adapter, dtype: torch.dtype):
    """An ExpertLora's factors as grouped operands: A (E, r8, in) and B (E, out, r8), rank zero-padded to a multiple
    of 8, in `dtype`. Differentiable (view, permute, pad and cast carry the gradients back to PEFT's layout)."""
    if adapter is None:
        return None, None, 0.0
    e, r = adapter.num_experts, adapter.r
    pad = -r % ALIGN
    a = adapter.lora_A.view(e, r, adapter.in_features)
    b = adapter.lora_B.view(adapter.out_features, r, e).permute(2, 0, 1)
    # contiguous: with nothing to pad or cast, B would stay a permuted view of (out, r, E), whose inner matrix is
    # neither row- nor column-major, which _grouped_mm refuses
    return (F.pad(a, (0, 0, 0, pad)).to(dtype).contiguous(), F.pad(b, (0, pad)).to(dtype).contiguous(),
            adapter.scaling)


class _Dispatch(torch.autograd.Function):
    """x[token]: each token's row once per expert it is routed to (sorted rows), with a gather as backward.

    Autograd's own backward of x[token] (and the forward of the index_add_ that combined the rows again) scatter
    with atomic adds: 30 layers x 2 forwards of 26B-A4B spent 22 ms of a 408 ms captured step in index_add_
    (H200, session 10), and bf16 atomics round after every one of a token's k additions, in no fixed order. Each
    token has exactly k sorted rows, at the positions `inv` lists (inv[t·k + j] = the row of the pair (t, j)), so
    both directions are gathers: the backward sums token t's rows as grad[inv].view(T, k, H).sum(1).
    """

    @staticmethod
    def forward(ctx, x, token, inv, top_k):
        ctx.save_for_backward(inv)
        ctx.top_k = top_k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv).unflatten(0, (-1, ctx.top_k)).sum(1), None, None, None


class _Unsort(torch.autograd.Function):
    """y[inv]: the expert-sorted rows back in (token, k) order; the backward gathers with `order`, the inverse
    permutation (not autograd's scatter for an index it cannot know is a permutation)."""

    @staticmethod
    def forward(ctx, y, inv, order):
        ctx.save_for_backward(order)
        return y.index_select(0, inv)

    @staticmethod
    def backward(ctx, grad):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None, None


def _combine(y: torch.Tensor, inv: torch.Tensor, order: torch.Tensor, top_k_index: torch.Tensor,
             top_k_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Σ_k w[t, k] · y[row of (t, k)] as one batched (1 × k)·(k × H) product per token: the weighting and the sum
    in one pass over the rows, accumulated in fp32 by the GEMM. (Multiplying first promoted the bf16 rows to fp32
    with the fp32 routing weights: a (T·k, H) fp32 copy, a cast back, then the sum.) Sentinel pairs weigh 0."""
    top_k = top_k_index.shape[-1]
    rows = _Unsort.apply(y, inv, order).unflatten(0, (-1, top_k))  # (T, k, H)
    w = top_k_weights.masked_fill(top_k_index >= num_experts, 0).to(rows.dtype)
    return torch.bmm(w.unsqueeze(1), rows).squeeze(1)


def _sort(top_k_index: torch.Tensor, num_experts: int):
    """(order: the (token, k) pair of each sorted row, token of each sorted row, inv: the sorted row of each pair,
    offs int32, empty-expert mask), without a host sync."""
    top_k = top_k_index.shape[-1]
    ids = top_k_index.reshape(-1).clamp(max=num_experts - 1)  # sentinels join the last group (module docstring)
    order = torch.argsort(ids, stable=True)
    ends = torch.searchsorted(ids[order], torch.arange(num_experts, device=ids.device), right=True)
    empty = torch.diff(ends, prepend=ends.new_zeros(1)) == 0
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return order, order // top_k, inv, ends.to(torch.int32), empty


def grouped_experts_forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                            num_experts: int, act_fn, gate_up, down, gate_up_lora=None,
                            down_lora=None) -> torch.Tensor:
    """Σ_k top_k_weights[t, k] · expert_{top_k_index[t, k]}(x_t): what route_to_experts computes with
    gate_up → act_fn(gate)·up → down per expert, in two grouped projections.

    gate_up / down: 16-bit (E, out, in) tensors or NF4ExpertStacks; *_lora: an ExpertLora or None.
    """
    if hidden_states.shape[0] == 0:
        return torch.zeros_like(hidden_states)
    order, token, inv, offs, empty = _sort(top_k_index, num_experts)
    dtype = compute_dtype(hidden_states)
    x = _Dispatch.apply(hidden_states, token, inv, top_k_index.shape[-1]).to(dtype)

    def project(inp, base, adapter):
        a, b, s = _lora_factors(adapter, dtype)
        return _GroupedProjection.apply(inp, offs, empty, base, a, b, s)

    gate, up = project(x, gate_up, gate_up_lora).chunk(2, dim=-1)
    y = project(act_fn(gate) * up, down, down_lora)
    return _combine(y, inv, order, top_k_index, top_k_weights, num_experts).to(hidden_states.dtype)
