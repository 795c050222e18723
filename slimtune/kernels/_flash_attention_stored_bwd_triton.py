"""dK/dV from stored P and dS tiles: the second half of the "stored" backward (private; see
``flash_attention_stored_bwd``).

The dQ kernel of one chunk of query rows computes P and dS anyway; with ``STORE_PDS`` it writes them into two chunk
buffers laid out, per (batch, KV head), as KR key rows × G·RRP columns (column ``g·RRP + row − ROW0``: query head g
of the group, row of the chunk). Then, for each key::

    dv_j = Σ_(g, i) p_ij do_i,g        dk_j = Σ_(g, i) ds_ij q_i,g      (scale applied by the caller)

are plain matrix products over the chunk's (head, row) pairs. This kernel runs them for both outputs in one launch
(grid axis 2 = batch × KV head × {dV, dK}) and adds the result into fp32 accumulators that live across chunks.

Block skipping: a key tile [k0, k0 + BLOCK_K) only takes rows from ``max(k0, ROW0)`` (causality) up to the end of the
document of its last key (packed documents); the dQ kernel wrote every value inside that range (zeros where it
skipped blocks: ``_store_pds_zeros``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "G", "HK", "ROW0", "RR", "RRP", "KR", "pds_half", "acc_half"])
def _dkdv_from_pds_kernel(PDS, Q, DO, ACC, DEND,
                          stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
                          T, G, HK, ROW0, RR, RRP, KR, pds_half, acc_half,
                          HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_Q: tl.constexpr, ROW_MASK: tl.constexpr):
    """ROW_MASK: mask the P/dS tiles' rows too. Needed when the dQ kernel ran blocks of fewer rows than BLOCK_Q
    (smaller GPUs): then the rows of a tile past ``q_hi`` may lie in dQ blocks that never wrote this key tile."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_z = tl.program_id(2)
    want_dk = pid_z % 2  # 0: dV from P and dO, 1: dK from dS and Q
    bh = pid_z // 2
    b = bh // HK
    hk = bh % HK
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    key_ok = offs_k < KR

    # RRP and the chunk's first row are multiples of 64 and key tiles start at multiples of BLOCK_K: every row
    # and step offset below is a multiple of 64 elements, which lets the tile loads be 16-byte vector loads
    ld = tl.multiple_of(G * RRP, 64)
    a_base = PDS + tl.multiple_of(want_dk.to(tl.int64) * pds_half + (bh.to(tl.int64) * KR) * ld, 64)
    if want_dk == 1:
        x_base = Q + b.to(tl.int64) * stride_qb + (hk * G).to(tl.int64) * stride_qh
        stride_xh = stride_qh
        stride_xt = stride_qt
    else:
        x_base = DO + b.to(tl.int64) * stride_dob + (hk * G).to(tl.int64) * stride_doh
        stride_xh = stride_doh
        stride_xt = stride_dot

    q_lo = tl.maximum(k0, ROW0)
    last_key = tl.minimum(k0 + BLOCK_K, KR) - 1
    q_hi = tl.minimum(tl.load(DEND + b * T + last_key), ROW0 + RR)
    n_q = tl.maximum(q_hi - q_lo + BLOCK_Q - 1, 0) // BLOCK_Q
    # loop-invariant address tiles plus one scalar offset per step: few instructions besides the MMAs
    a_ptrs = a_base + offs_k[:, None] * ld + offs_q[None, :]
    x_ptrs = x_base + offs_q[:, None] * stride_xt + offs_d[None, :]
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for it in range(0, G * n_q):  # one flat loop over (query head of the group, row tile): pipelined as one
        g = it // n_q
        r0 = q_lo + (it - g * n_q) * BLOCK_Q
        row_ok = (r0 + offs_q) < q_hi
        # without ROW_MASK the P/dS tile is read whole: its rows past q_hi belong to the dQ block of row q_hi - 1,
        # which wrote the whole key tile (zeros past T and where it skipped), and those rows of Q/dO load as zeros
        if ROW_MASK:
            a_ok = key_ok[:, None] & row_ok[None, :]
        else:
            a_ok = key_ok[:, None]
        a = tl.load(a_ptrs + tl.multiple_of(g * RRP + r0 - ROW0, 64), mask=a_ok, other=0.0)
        x = tl.load(x_ptrs + (g.to(tl.int64) * stride_xh + r0.to(tl.int64) * stride_xt), mask=row_ok[:, None],
                    other=0.0)
        acc = tl.dot(a, x, acc=acc)
    out = ACC + want_dk.to(tl.int64) * acc_half + (bh.to(tl.int64) * T + offs_k[:, None]) * HEAD_DIM + offs_d[None, :]
    prev = tl.load(out, mask=key_ok[:, None], other=0.0)
    tl.store(out, prev + acc, mask=key_ok[:, None])
