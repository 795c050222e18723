"""Triton kernel for the elementwise part of one chunk of ``linear_cross_entropy``.

Given a chunk of raw fp32 logits ``z`` (rows, V) from the lm_head matmul and one in-vocabulary target per row
(ignored rows were dropped by the caller), each program handles one row and computes, in fp32::

    s_j   = c * tanh(z_j / c)              (s_j = z_j when softcap c is None)
    lse   = log(sum_j exp(s_j))            (pass 1: online max / rescaled sum over V in blocks)
    loss  = lse - s_y
    dz_j  = (exp(s_j - lse) - [j == y]) * (1 - tanh(z_j / c)^2)     (pass 2; last factor only with softcap)

Pass 2 writes ``dz`` either back into the logits buffer (fp32, in place: every element is read and then
written by the same lane at the same address, so no other lane can observe a half-updated row) or into a
separate ``grad_out`` buffer of the matmul dtype (bf16/fp16), which saves the caller a cast.

Triton is optional: without it this module imports, ``TRITON_AVAILABLE`` is False and
``softcap_cross_entropy_chunk`` raises ``KernelUnavailableError``. On a machine without a GPU the kernel can
still be exercised with ``TRITON_INTERPRET=1`` (set before ``triton`` is first imported) on CPU tensors.
"""

from __future__ import annotations

import torch

from slimtune.errors import KernelUnavailableError

try:  # Triton is an optional dependency; the pure-torch path covers its absence.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

TRITON_AVAILABLE: bool = triton is not None

__all__ = ["TRITON_AVAILABLE", "softcap_cross_entropy_chunk"]

_MAX_BLOCK = 4096  # columns per loop step: 16 KiB of fp32 per program iteration

if TRITON_AVAILABLE:

    @triton.jit
    def _softcap(z, c, HAS_SOFTCAP: tl.constexpr):
        """Returns (s, t) with t = tanh(z / c) and s = c * t; (z, z) when there is no softcap."""
        if HAS_SOFTCAP:
            u = z / c
            # tanh from one exp of a non-positive argument: no overflow, exact sign symmetry.
            e = tl.exp(-2.0 * tl.abs(u))
            t = (1.0 - e) / (1.0 + e)
            t = tl.where(u < 0.0, -t, t)
            return c * t, t
        else:
            return z, z

    @triton.jit
    def _softcap_ce_fwd_bwd_kernel(
        logits_ptr,
        logits_row_stride,
        grad_ptr,
        grad_row_stride,
        labels_ptr,
        loss_ptr,
        n_cols,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: rows * V overflows int32 at V = 262,144
        z_row = logits_ptr + row * logits_row_stride
        label = tl.load(labels_ptr + row).to(tl.int64)
        cols0 = tl.arange(0, BLOCK)

        # Pass 1: running max m and running sum d of exp(s - m) over the row.
        # fp32 scalar tensors (not Python floats), so the loop-carried types are fixed on every Triton version
        m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
        d = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            mask = cols < n_cols
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            s, _t = _softcap(z, softcap, HAS_SOFTCAP)
            s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)

        z_y = tl.load(z_row + label).to(tl.float32)
        s_y, _t_y = _softcap(z_y, softcap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, lse - s_y)

        # Pass 2: dz = (softmax(s) - onehot(y)) * ds/dz, written in the grad buffer's dtype.
        if COMPUTE_GRAD:
            g_row = grad_ptr + row * grad_row_stride
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                mask = cols < n_cols
                z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
                s, t = _softcap(z, softcap, HAS_SOFTCAP)
                g = tl.exp(s - lse)
                g = tl.where(cols == label, g - 1.0, g)
                if HAS_SOFTCAP:
                    g = g * (1.0 - t * t)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


def softcap_cross_entropy_chunk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None,
    *,
    compute_grad: bool = True,
    grad_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row softcapped cross-entropy of a logits chunk, with d(loss)/d(logits) written out.

    Args:
        logits: raw fp32 lm_head output, shape ``(rows, vocab)``, unit stride along vocab. Overwritten with
            ``dz`` when ``compute_grad`` is True and ``grad_out`` is None.
        labels: target ids, shape ``(rows,)``, every one in ``[0, vocab)`` (drop ignored rows first: the kernel
            does not check bounds).
        softcap: the ``c`` in ``c * tanh(z / c)``, or None for plain logits.
        compute_grad: if False only the loss is computed (one pass over the chunk instead of two).
        grad_out: optional ``(rows, vocab)`` buffer (fp32, bf16 or fp16, unit stride along vocab) that receives
            ``dz``; None writes it into ``logits`` in place.

    Returns:
        fp32 tensor ``(rows,)`` of per-row losses ``logsumexp(s) - s[label]``.

    Raises:
        KernelUnavailableError: Triton is not installed.
        ValueError: a buffer has the wrong shape, dtype or layout.

    Example:
        >>> loss_rows = softcap_cross_entropy_chunk(z, y, 30.0)  # z now holds d(sum loss)/dz
    """
    if not TRITON_AVAILABLE:
        raise KernelUnavailableError(
            "softcap_cross_entropy_chunk needs Triton, which is not installed; install `triton` or use the "
            "pure-torch path (linear_cross_entropy picks it automatically)."
        )
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be a 2-D fp32 tensor with unit stride along vocab, got shape {tuple(logits.shape)}, "
            f"dtype {logits.dtype}, strides {logits.stride()}"
        )
    rows, vocab = logits.shape
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {tuple(labels.shape)}")
    if grad_out is None:
        grad_out = logits
    elif grad_out.shape != logits.shape or grad_out.stride(1) != 1:
        raise ValueError(
            f"grad_out must have shape {tuple(logits.shape)} with unit stride along vocab, got "
            f"{tuple(grad_out.shape)} with strides {grad_out.stride()}"
        )
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss
    block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
    _softcap_ce_fwd_bwd_kernel[(rows,)](
        logits,
        logits.stride(0),
        grad_out,
        grad_out.stride(0),
        labels.contiguous(),
        loss,
        vocab,
        float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return loss
