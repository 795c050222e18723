"""Gemma 4's RMSNorm as two fused kernels: ``y = (x·(mean(x²)+eps)^-½ · w)`` in fp32, rounded to x's dtype.

Why: transformers' Gemma4RMSNorm is ~8 elementwise launches forward (upcast, pow, mean, add, pow, mul, mul,
downcast) and autograd adds ~15 backward, each a full pass over an fp32 copy of the activations. E2B runs ~9 norms
per decoder layer, three times per step with checkpointing (forward, recompute, backward): in the H200 profile of
the graphed 2K QLoRA step (not compiled), elementwise work and copies were 46 % of the GPU time; in the eager step,
fusing the norms removes 42 % of the kernel-launching ops (E2B's layer structure, one LoRA forward+backward:
15,798 → 9,113; CPU proxy `benchmarks/kernels/bench_rms_norm.py --host-ops`). Here the
forward is one kernel (reads x, writes y and one fp32 ``rstd`` per row) and the backward one kernel (reads dy, x,
``rstd``; writes dx). Only the 16-bit input and ``rstd`` are saved, as `slimtune.adapt.rms_norm` does.

Scope: the weight (if any) is frozen, as in LoRA training: no weight gradient (callers fall back to
`slimtune.adapt.rms_norm.RMSNormFunction` when it trains). Rows up to 8,192 values (31B's hidden size is 5,376).
On CUDA with Triton the kernels run (bf16, fp16, fp32); elsewhere `rms_norm_reference` computes the same function
with transformers' op order. The kernels are registered torch ops, opaque to torch.compile and capturable in CUDA
graphs. Each kernel checks its first use against the torch formula (`_checked`).
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # Triton is optional: CPU installs use the reference.
    import triton

    from slimtune.kernels import rms_norm_triton as _k
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    _k = None

__all__ = ["MAX_WIDTH", "fused_rms_norm", "fused_rms_norm_available", "rms_norm", "rms_norm_backward_reference",
           "rms_norm_reference"]

MAX_WIDTH = 8192
"""Longest row the kernels hold whole in registers: 8 warps × 32 threads × 32 fp32 values (sm90 compile with Triton
3.6: 125 registers forward, 128 backward, no spills)."""


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' Gemma4RMSNorm: fp32 ``x·(mean(x²)+eps)^-½``, times ``w`` if given, back in x's dtype."""
    xf = x.float()
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.float()
    return y.type_as(x)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_rms_norm_available(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether `rms_norm` runs the Triton kernels for these inputs (else it computes `rms_norm_reference`)."""
    return (
        _k is not None
        and (x.is_cuda or _interpreting())
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and 0 < x.shape[-1] <= MAX_WIDTH
        and x.numel() > 0
        and (weight is None or (not weight.requires_grad and weight.shape == (x.shape[-1],)
                                and weight.device == x.device and weight.is_contiguous()))
    )


_CHECK_ROWS = 64
_CHECK_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
_checked: dict[tuple, bool] = {}
"""First use of each kernel per (device, dtype, width, weight dtype): its result on the first rows is compared with
the torch formula. If it fails to compile or launch (a GPU Triton does not support, a broken install) or disagrees
(a Triton/GPU pair that miscompiles), that combination computes with torch from then on, with a warning: a crash
would lose the run and a wrong norm would train a broken model without any error. The comparison is skipped
during CUDA-graph capture (it synchronises); captured steps follow eager warm-up steps, which ran it."""


def _launch_checked(kind: str, x: torch.Tensor, weight: torch.Tensor | None, launch, got: torch.Tensor,
                    want, scale=None) -> bool:
    """Run ``launch`` (it fills ``got``); False when torch must compute this call instead (see `_checked`).

    ``want(k)`` is the torch result for the first k rows; the error is relative to ``scale(k)`` when given (the size
    of the terms a result is the difference of: rounding is relative to them, not to a result that cancels to ~0),
    else to the result's own norm."""
    key = (kind, x.device, x.dtype, x.shape[1], None if weight is None else weight.dtype)
    state = _checked.get(key)
    if state is False:
        return False
    if state:
        launch()
        return True
    try:
        launch()
    except Exception as exc:  # noqa: BLE001 - the first launch compiles; any failure there means "use torch"
        return _give_up(key, f"failed to compile or launch ({type(exc).__name__}: {str(exc)[:200]})")
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    rows = min(_CHECK_ROWS, x.shape[0])
    ref = want(rows).double()
    size = ref.norm() if scale is None else scale(rows).double()
    err = float((got[:rows].double() - ref).norm() / size.clamp_min(1e-30))
    if not err <= _CHECK_TOLERANCE[x.dtype]:
        return _give_up(key, f"is {err:.2g} (relative) off the torch formula")
    _checked[key] = True
    return True


def _give_up(key: tuple, why: str) -> bool:
    kind, device, dtype, width, _ = key
    _checked[key] = False
    warnings.warn(f"slimtune RMSNorm {kind} kernel {why} for {dtype} rows of {width} on {device}; computing this "
                  "norm with torch instead (slower, correct). Please report your GPU and Triton version.",
                  RuntimeWarning, stacklevel=4)
    return False


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.pow(x.float().pow(2).mean(-1) + eps, -0.5)


def rms_norm_backward_reference(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                                rstd: torch.Tensor) -> torch.Tensor:
    """dx of the norm in torch (fp32, rounded to x's dtype), for rows (n, width) and their saved ``rstd`` (n,):
    ``x̂ = x·rstd``, ``g = dy·w``, ``dx = rstd·(g − x̂·mean(g·x̂))``. The kernel computes the same."""
    r = rstd[:, None]
    xhat = x.float() * r
    g = _weighted(dy, weight)
    return (r * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)


def _weighted(dy: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """g = dy·w in fp32 (dy alone without a weight)."""
    return dy.float() if weight is None else dy.float() * weight.float()


def _launch_shape(width: int) -> tuple[int, int, int]:
    """(BLOCK_D, rows per program, warps): about 4-8K values per program."""
    block_d = triton.next_power_of_2(width)
    rows = max(1, min(64, 4096 // block_d))
    warps = 4 if block_d * rows <= 4096 else 8
    return block_d, rows, warps


# Registered ops: opaque to torch.compile's tracer, so a compiled decoder layer keeps them as single calls. (Session
# 7 tried a plain autograd.Function for eager calls instead, to save the ops' Python dispatch; an A/B in one process
# on the H200 found no difference beyond machine noise, so there is one entry point.)
@torch.library.custom_op("slimtune::rms_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y and the per-row rstd (fp32) of rows (n, width), through the kernel (torch where it failed its check)."""
    n, width = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    block_d, rows, warps = _launch_shape(width)

    def launch():
        _k._rms_norm_fwd_kernel[(triton.cdiv(n, rows),)](
            x, weight if weight is not None else x, y, rstd, n, width, x.stride(0), y.stride(0), eps,
            HAS_W=weight is not None, ROWS=rows, BLOCK_D=block_d, num_warps=warps)

    if not _launch_checked("forward", x, weight, launch, y, lambda k: rms_norm_reference(x[:k], weight, eps)):
        return rms_norm_reference(x, weight, eps), _rstd(x, eps)
    return y, rstd


@torch.library.custom_op("slimtune::rms_norm_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor) -> torch.Tensor:
    """dx of rows (n, width) from the saved 16-bit x and fp32 rstd, through the kernel (or torch, as above)."""
    n, width = x.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dx = torch.empty_like(x)
    block_d, rows, warps = _launch_shape(width)

    def launch():
        _k._rms_norm_bwd_kernel[(triton.cdiv(n, rows),)](
            dy, x, weight if weight is not None else x, rstd, dx, n, width, dy.stride(0), x.stride(0),
            dx.stride(0), HAS_W=weight is not None, ROWS=rows, BLOCK_D=block_d, num_warps=warps)

    # dx = rstd·(g − x̂·mean(g·x̂)) cancels to ~0 where a row is nearly parallel to g (a 1-wide row always is), so
    # the check measures the error against the size of rstd·g, not of dx.
    if not _launch_checked("backward", x, weight, launch, dx,
                           lambda k: rms_norm_backward_reference(dy[:k], x[:k], weight, rstd[:k]),
                           lambda k: (_weighted(dy[:k], weight) * rstd[:k, None]).norm()):
        return rms_norm_backward_reference(dy, x, weight, rstd)
    return dx


@_fwd_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    return _bwd_op(dy, x, weight, rstd), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4's RMSNorm over the last dim of ``x`` (any leading shape), differentiable in ``x``.

    Args:
        x: Activations, bf16/fp16/fp32.
        weight: Frozen scale of shape (width,), or None for the unscaled norm (Gemma 4's v_norm).
        eps: Added to the mean square.

    Returns:
        The normalised tensor, x's shape and dtype (contiguous).
    """
    if not fused_rms_norm_available(x, weight):
        return rms_norm_reference(x, weight, eps)
    return fused_rms_norm(x, weight, eps)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`rms_norm` through the kernels, for callers that checked `fused_rms_norm_available` themselves."""
    width = x.shape[-1]
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return _fwd_op(x2, weight, float(eps))[0].view(x.shape)
