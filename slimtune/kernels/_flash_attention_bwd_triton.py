"""dK/dV kernels behind :mod:`slimtune.kernels.flash_attention` (private; math, masking: ``_flash_attention_triton``).

Two ways to compute the key-side gradients of one key block (BLOCK_N keys) of one KV head, looping over the query
blocks (BLOCK_M rows) that can see it and over the G query heads of the group (or a share of them: "split"):

* ``_attn_bwd_dkdv_kernel``: dK and dV in one pass (4 products per step: S, dP, dV, dK). For head_dim 512 both
  accumulators (2 × 512 × BLOCK_N fp32) fill the register file already at BLOCK_N = 32, so S and dP run as
  64 × 32 products split over two warpgroups, i.e. N = 16 per MMA instruction (shared-memory bound, ~40 % of the
  MMA rate: ATTENTION_NOTES.md).
* ``_attn_bwd_dk_or_dv_kernel``: two launches, one for dV (S, dV: 2 products) and one for dK (S, dP, dK: 3 products).
  One accumulator each, so BLOCK_N = 64 fits in registers: S/dP run at N = 32 per warpgroup and the accumulating
  product ``(D × BLOCK_M)·(BLOCK_M × 64)`` at N = 64. 5 instead of 4 products, each on a wider instruction. In the dK
  pass dO is loaded and consumed (dP) before Q is loaded, so their shared-memory tiles never live at the same time
  (K, V resident + one 64-row tile fits in 227 KiB; K, V + Q + dO would need 256 KiB).

``_sum_splits_kernel`` sums the fp32 per-split partial results of dK and dV and casts them, in one launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from slimtune.kernels._flash_attention_triton import _cut, _scratch_slot, _visible


@triton.jit
def _key_block_ranges(DEND, b, n0, T, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query-block ranges that see keys [n0, n0+BLOCK_N): masked [q_lo, full_lo), full [full_lo, full_hi),
    masked [full_hi, q_hi)."""
    q_lo = (n0 // BLOCK_M) * BLOCK_M
    q_hi = tl.minimum(tl.minimum(T, n0 + BLOCK_N - 1 + W), tl.load(DEND + b * T + tl.minimum(n0 + BLOCK_N - 1, T - 1)))
    full_lim = tl.minimum(tl.minimum(T, n0 + W), tl.load(DEND + b * T + n0))
    q_hi_r = ((q_hi + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(((n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, q_hi_r)
    full_hi = tl.maximum(tl.minimum((full_lim // BLOCK_M) * BLOCK_M, q_hi_r), full_lo)
    return q_lo, full_lo, full_hi, q_hi


@triton.jit
def _key_block_program(HK, BLOCK_N: tl.constexpr):
    """(batch, KV head, split, first key) of this program: grid (key blocks, batch × KV heads, splits). Key block 0
    comes first: the earliest keys are seen by the most queries, so they start first."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    split = tl.program_id(2)
    return pid_bk // HK, pid_bk % HK, split, pid_n * BLOCK_N


@triton.jit
def _load_key_rows(PTR, b, hk, n0, stride_b, stride_h, stride_t, offs_n, offs_d, col_ok):
    """Rows n0 + offs_n of KV head hk of batch row b (zeros past T)."""
    return tl.load(PTR + b.to(tl.int64) * stride_b + hk.to(tl.int64) * stride_h + n0.to(tl.int64) * stride_t
                   + offs_n[:, None] * stride_t + offs_d[None, :], mask=col_ok[:, None], other=0.0)


@triton.jit
def _dkdv_loop(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_base, delta_base, dstart_base, k_idx,
               k_valid, slot_p, slot_ds, lo, hi, T, W, qk_scale,
               BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, TRANSPOSED: tl.constexpr,
               HAS_KEY_MASK: tl.constexpr, SCRATCH: tl.constexpr, CONST_STRIDES: tl.constexpr):
    """Accumulate dK, dV of one key block over query rows [lo, hi).

    TRANSPOSED=False keeps keys as rows: dv (BLOCK_N, D) += pᵀ·do, so every product has BLOCK_N rows.
    TRANSPOSED=True keeps the head dim as rows: dvᵀ (D, BLOCK_N) += doᵀ·p and dkᵀ += qᵀ·ds, so every product has
    ≥ 64 rows (BLOCK_M or D) even with BLOCK_N = 32, which lets Hopper use its warpgroup MMA for head_dim 512.
    CONST_STRIDES: the row strides are constexprs and the addresses are rebuilt each step from a scalar row offset
    (immediate offsets instead of hoisted, spilled 64-bit addresses; see ``_dk_or_dv_loop``).
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_base + lo.to(tl.int64) * stride_qt + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = do_base + lo.to(tl.int64) * stride_dot + offs_m[:, None] * stride_dot + offs_d[None, :]
    q_row = lo.to(tl.int64) * stride_qt
    do_row = lo.to(tl.int64) * stride_dot
    for m0 in range(lo, hi, BLOCK_M):
        if CONST_STRIDES:
            q_ptrs = q_base + q_row + offs_m[:, None] * stride_qt + offs_d[None, :]
            do_ptrs = do_base + do_row + offs_m[:, None] * stride_dot + offs_d[None, :]
            q_row += BLOCK_M * stride_qt
            do_row += BLOCK_M * stride_dot
        q_idx = m0 + offs_m
        if MASK:
            row_ok = q_idx < T
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_base + q_idx, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_base + q_idx, mask=row_ok, other=0.0)
            q_dstart = tl.load(dstart_base + q_idx, mask=row_ok, other=0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + q_idx)
            delta = tl.load(delta_base + q_idx)
            q_dstart = q_idx
        if TRANSPOSED:
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.exp2(s - lse[:, None])
            if MASK or HAS_KEY_MASK:
                keep = _visible(q_idx[:, None], k_idx[None, :], q_dstart[:, None], k_valid[None, :], W,
                                MASK, HAS_KEY_MASK)
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            p = p.to(do.dtype)
            if SCRATCH:
                p = _cut(p, slot_p, W > 0, SCRATCH)
                ds = _cut(ds, slot_ds, W > 0, SCRATCH)
            dv = tl.dot(tl.trans(do), p, acc=dv)  # (D, BLOCK_N)
            dk = tl.dot(tl.trans(q), ds, acc=dk)
        else:
            s_t = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M): keys are rows
            p_t = tl.exp2(s_t - lse[None, :])
            if MASK or HAS_KEY_MASK:
                keep = _visible(q_idx[None, :], k_idx[:, None], q_dstart[None, :], k_valid[:, None], W,
                                MASK, HAS_KEY_MASK)
                p_t = tl.where(keep, p_t, 0.0)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            p_t = p_t.to(do.dtype)
            if SCRATCH:
                p_t = _cut(p_t, slot_p, W > 0, SCRATCH)
                ds_t = _cut(ds_t, slot_ds, W > 0, SCRATCH)
            dv = tl.dot(p_t, do, acc=dv)
            dk = tl.dot(ds_t, q, acc=dk)
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit(do_not_specialize=["T", "H", "HK", "G", "HEADS_PER_SPLIT", "W"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, DSTART, DEND, KVALID, SCR,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dks, stride_dkb, stride_dkh, stride_dkt,
                          T, H, HK, G, HEADS_PER_SPLIT, W, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          TRANSPOSED: tl.constexpr, HAS_KEY_MASK: tl.constexpr, SCRATCH: tl.constexpr,
                          QT_C: tl.constexpr = 0, DOT_C: tl.constexpr = 0):
    """dK and dV of one key block. QT_C/DOT_C > 0: the Q/dO row strides as constexprs (KernelConfig variant 2)."""
    if QT_C > 0:
        stride_qt = QT_C
        stride_dot = DOT_C
    b, hk, split, n0 = _key_block_program(HK, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_idx = n0 + offs_n
    col_ok = k_idx < T

    k = _load_key_rows(K, b, hk, n0, stride_kb, stride_kh, stride_kt, offs_n, offs_d, col_ok)
    v = _load_key_rows(V, b, hk, n0, stride_vb, stride_vh, stride_vt, offs_n, offs_d, col_ok)
    k_valid = k_idx
    if HAS_KEY_MASK:
        k_valid = tl.load(KVALID + b.to(tl.int64) * T + k_idx, mask=col_ok, other=0)

    q_lo, full_lo, full_hi, q_hi = _key_block_ranges(DEND, b, n0, T, W, BLOCK_M, BLOCK_N)

    if TRANSPOSED:
        dk = tl.zeros([HEAD_DIM, BLOCK_N], dtype=tl.float32)
        dv = tl.zeros([HEAD_DIM, BLOCK_N], dtype=tl.float32)
    else:
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dstart_base = DSTART + b.to(tl.int64) * T
    if TRANSPOSED:
        slot_p = _scratch_slot(SCR, 0, BLOCK_M, BLOCK_N, 2)
        slot_ds = _scratch_slot(SCR, 1, BLOCK_M, BLOCK_N, 2)
    else:
        slot_p = _scratch_slot(SCR, 0, BLOCK_N, BLOCK_M, 2)
        slot_ds = _scratch_slot(SCR, 1, BLOCK_N, BLOCK_M, 2)
    for g in range(HEADS_PER_SPLIT):
        h = hk * G + split * HEADS_PER_SPLIT + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        row = (b * H + h).to(tl.int64) * T
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, LSE + row, DELTA + row,
                            dstart_base, k_idx, k_valid, slot_p, slot_ds, full_lo, full_hi, T, W, qk_scale,
                            BLOCK_M, HEAD_DIM, False, TRANSPOSED, HAS_KEY_MASK, SCRATCH,
                            QT_C > 0)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, LSE + row, DELTA + row,
                            dstart_base, k_idx, k_valid, slot_p, slot_ds, q_lo, full_lo, T, W, qk_scale,
                            BLOCK_M, HEAD_DIM, True, TRANSPOSED, HAS_KEY_MASK, SCRATCH,
                            QT_C > 0)
        dk, dv = _dkdv_loop(dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, LSE + row, DELTA + row,
                            dstart_base, k_idx, k_valid, slot_p, slot_ds, full_hi, q_hi, T, W, qk_scale,
                            BLOCK_M, HEAD_DIM, True, TRANSPOSED, HAS_KEY_MASK, SCRATCH,
                            QT_C > 0)
    dk = dk * sm_scale
    if TRANSPOSED:
        dk = tl.trans(dk)
        dv = tl.trans(dv)
    base = split.to(tl.int64) * stride_dks + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh \
        + n0.to(tl.int64) * stride_dkt
    offs = offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + base + offs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + base + offs, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dk_or_dv_loop(acc, k, v, q_base, do_base, STRIDE_QT: tl.constexpr, STRIDE_DOT: tl.constexpr, lse_base,
                   delta_base, dstart_base, k_idx,
                   k_valid, slot, lo, hi, T, W, qk_scale,
                   BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, WANT_DK: tl.constexpr,
                   HAS_KEY_MASK: tl.constexpr, SCRATCH: tl.constexpr):
    """Accumulate dKᵀ (WANT_DK) or dVᵀ, shape (D, BLOCK_N), of one key block over query rows [lo, hi)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_row = lo.to(tl.int64) * STRIDE_QT  # scalar offsets of row m0 (int64: T × stride can pass 2³¹)
    do_row = lo.to(tl.int64) * STRIDE_DOT
    for m0 in range(lo, hi, BLOCK_M):
        # Row strides are compile-time constants here: each thread's 16-byte pieces of a tile then sit at immediate
        # offsets from one base address. With run-time strides every piece needs its own 64-bit address, which
        # ptxas hoists out of the loop and spills (offline SASS: ~60 LDL/STL per step of the hd512 loop).
        q_ptrs = q_base + q_row + offs_m[:, None] * STRIDE_QT + offs_d[None, :]
        do_ptrs = do_base + do_row + offs_m[:, None] * STRIDE_DOT + offs_d[None, :]
        q_idx = m0 + offs_m
        row_ok = q_idx < T
        if MASK:
            lse = tl.load(lse_base + q_idx, mask=row_ok, other=float("inf"))
            q_dstart = tl.load(dstart_base + q_idx, mask=row_ok, other=0)
        else:
            lse = tl.load(lse_base + q_idx)
            q_dstart = q_idx
        if WANT_DK:  # dO first: its tile is dead before Q's is loaded (one 64 KiB tile of shared memory for both)
            if MASK:
                do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
                delta = tl.load(delta_base + q_idx, mask=row_ok, other=0.0)
            else:
                do = tl.load(do_ptrs)
                delta = tl.load(delta_base + q_idx)
            dp = tl.dot(do, tl.trans(v))
        if MASK:
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK or HAS_KEY_MASK:
            keep = _visible(q_idx[:, None], k_idx[None, :], q_dstart[:, None], k_valid[None, :], W,
                            MASK, HAS_KEY_MASK)
            p = tl.where(keep, p, 0.0)
        if WANT_DK:
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            if SCRATCH:
                ds = _cut(ds, slot, W > 0, SCRATCH)
            acc = tl.dot(tl.trans(q), ds, acc=acc)
        else:
            p = p.to(q.dtype)
            if SCRATCH:
                p = _cut(p, slot, W > 0, SCRATCH)
            if MASK:
                do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                do = tl.load(do_ptrs)
            acc = tl.dot(tl.trans(do), p, acc=acc)
        q_row += BLOCK_M * STRIDE_QT
        do_row += BLOCK_M * STRIDE_DOT
    return acc


@triton.jit(do_not_specialize=["T", "H", "HK", "G", "HEADS_PER_SPLIT", "W"])
def _attn_bwd_dk_or_dv_kernel(Q, K, V, DO, OUT, LSE, DELTA, DSTART, DEND, KVALID, SCR,
                              stride_qb, stride_qh, STRIDE_QT: tl.constexpr, stride_kb, stride_kh, stride_kt,
                              stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, STRIDE_DOT: tl.constexpr,
                              stride_os, stride_ob, stride_oh, stride_ot,
                              T, H, HK, G, HEADS_PER_SPLIT, W, qk_scale, sm_scale,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              WANT_DK: tl.constexpr, HAS_KEY_MASK: tl.constexpr, SCRATCH: tl.constexpr):
    """dK (WANT_DK) or dV of one key block, accumulated transposed (head dim as rows: every product has ≥ 64 rows)."""
    b, hk, split, n0 = _key_block_program(HK, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_idx = n0 + offs_n
    col_ok = k_idx < T

    k = _load_key_rows(K, b, hk, n0, stride_kb, stride_kh, stride_kt, offs_n, offs_d, col_ok)
    v = k  # the dV pass never reads V
    if WANT_DK:
        v = _load_key_rows(V, b, hk, n0, stride_vb, stride_vh, stride_vt, offs_n, offs_d, col_ok)
    k_valid = k_idx
    if HAS_KEY_MASK:
        k_valid = tl.load(KVALID + b.to(tl.int64) * T + k_idx, mask=col_ok, other=0)
    q_lo, full_lo, full_hi, q_hi = _key_block_ranges(DEND, b, n0, T, W, BLOCK_M, BLOCK_N)

    acc = tl.zeros([HEAD_DIM, BLOCK_N], dtype=tl.float32)
    dstart_base = DSTART + b.to(tl.int64) * T
    slot = _scratch_slot(SCR, 0, BLOCK_M, BLOCK_N, 1)
    for g in range(HEADS_PER_SPLIT):
        h = hk * G + split * HEADS_PER_SPLIT + g
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        row = (b * H + h).to(tl.int64) * T
        acc = _dk_or_dv_loop(acc, k, v, q_base, do_base, STRIDE_QT, STRIDE_DOT, LSE + row, DELTA + row, dstart_base,
                             k_idx, k_valid, slot, full_lo, full_hi, T, W, qk_scale,
                             BLOCK_M, HEAD_DIM, False, WANT_DK, HAS_KEY_MASK, SCRATCH)
        acc = _dk_or_dv_loop(acc, k, v, q_base, do_base, STRIDE_QT, STRIDE_DOT, LSE + row, DELTA + row, dstart_base,
                             k_idx, k_valid, slot, q_lo, full_lo, T, W, qk_scale,
                             BLOCK_M, HEAD_DIM, True, WANT_DK, HAS_KEY_MASK, SCRATCH)
        acc = _dk_or_dv_loop(acc, k, v, q_base, do_base, STRIDE_QT, STRIDE_DOT, LSE + row, DELTA + row, dstart_base,
                             k_idx, k_valid, slot, full_hi, q_hi, T, W, qk_scale,
                             BLOCK_M, HEAD_DIM, True, WANT_DK, HAS_KEY_MASK, SCRATCH)
    if WANT_DK:
        acc = acc * sm_scale
    base = split.to(tl.int64) * stride_os + b.to(tl.int64) * stride_ob + hk.to(tl.int64) * stride_oh \
        + n0.to(tl.int64) * stride_ot
    tl.store(OUT + base + offs_n[:, None] * stride_ot + offs_d[None, :], tl.trans(acc).to(OUT.dtype.element_ty),
             mask=col_ok[:, None])


@triton.jit(do_not_specialize=["N", "SPLIT"])
def _sum_splits_kernel(PARTS, DK, DV, N, SPLIT, BLOCK: tl.constexpr):
    """DK = Σ_s PARTS[0, s], DV = Σ_s PARTS[1, s] (fp32 partials of N elements each, cast to the output dtype)."""
    which = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    src = PARTS + which.to(tl.int64) * SPLIT * N + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(SPLIT):
        acc += tl.load(src, mask=ok, other=0.0)
        src += N
    if which == 0:
        tl.store(DK + offs, acc.to(DK.dtype.element_ty), mask=ok)
    else:
        tl.store(DV + offs, acc.to(DV.dtype.element_ty), mask=ok)
