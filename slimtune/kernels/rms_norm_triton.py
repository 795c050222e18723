"""Triton kernels of Gemma 4's RMSNorm: one launch forward, one launch backward (see slimtune.kernels.rms_norm).

Each program normalises ``ROWS`` rows of ``width`` values held whole in registers (``BLOCK_D`` ≥ width, a power of
two), in fp32: ``rstd = (mean(x²) + eps)^-½``, ``y = x·rstd·w``. The backward reads the 16-bit input again and the
saved fp32 ``rstd``: ``x̂ = x·rstd``, ``g = dy·w``, ``dx = rstd·(g − x̂·mean(g·x̂))`` (the weight is frozen: no dw).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_block(n_rows, width, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows (int64, as a column) and columns, and which of them exist."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < width)[None, :]
    return rows, rows.to(tl.int64)[:, None], cols, row_ok, mask


@triton.jit
def _load_f32(PTR, rows64, stride, cols, mask):
    return tl.load(PTR + rows64 * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _rms_norm_fwd_kernel(X, W, Y, RSTD, n_rows, width, stride_x, stride_y, eps,
                         HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rows64, cols, row_ok, mask = _row_block(n_rows, width, ROWS, BLOCK_D)
    x = _load_f32(X, rows64, stride_x, cols, mask)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / width + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, n_rows, width, stride_dy, stride_x, stride_dx,
                         HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, rows64, cols, row_ok, mask = _row_block(n_rows, width, ROWS, BLOCK_D)
    x = _load_f32(X, rows64, stride_x, cols, mask)
    g = _load_f32(DY, rows64, stride_dy, cols, mask)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if HAS_W:
        g = g * tl.load(W + cols, mask=cols < width, other=0.0).to(tl.float32)[None, :]
    xhat = x * rstd[:, None]
    c = tl.sum(g * xhat, axis=1) / width
    dx = rstd[:, None] * (g - xhat * c[:, None])
    tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
