"""Triton kernels of Gemma 4's RMSNorm: one launch forward, one launch backward (see slimtune.kernels.rms_norm).

Each program normalises ``ROWS`` rows of ``width`` values held whole in registers (``BLOCK_D`` ≥ width, a power of
two), in fp32: ``rstd = (mean(x²) + eps)^-½``, ``y = x·rstd·w``. The backward reads the 16-bit input again and the
saved fp32 ``rstd``: ``x̂ = x·rstd``, ``g = dy·w``, ``dx = rstd·(g − x̂·mean(g·x̂))`` (the weight is frozen: no dw).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, width, stride_x, stride_y, eps,
                         HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < width
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / width + eps)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, n_rows, width, stride_dy, stride_x, stride_dx,
                         HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < width
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        g = g * w[None, :]
    xhat = x * rstd[:, None]
    c = tl.sum(g * xhat, axis=1) / width
    dx = rstd[:, None] * (g - xhat * c[:, None])
    tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
