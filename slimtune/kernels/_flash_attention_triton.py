"""Triton kernels behind :mod:`slimtune.kernels.flash_attention` (private: import the public module instead).

Math (per query head h, its KV head ``h // G``; ``s = scale * q·k``; all sums over visible keys only)::

    forward   m = max_j s_ij,  l = Σ_j exp(s_ij − m),  o_i = Σ_j exp(s_ij − m) v_j / l,  lse_i = m + log l
    backward  p_ij = exp(s_ij − lse_i),  δ_i = Σ_d do_id · o_id
              dv_j = Σ_i p_ij do_i                   (summed over the G query heads of the group)
              ds_ij = p_ij (do_i · v_j − δ_i)
              dq_i = scale Σ_j ds_ij k_j,   dk_j = scale Σ_i ds_ij q_i

Visibility of key j to query i: ``j <= i`` (causal), ``j > i − W`` (sliding window; the launcher passes W = T + 1 for
full layers), ``j >= doc_start[i]`` (packed documents; documents are contiguous runs, so with causality "same document"
is exactly this; one document for unpacked input), ``key_valid[j]`` (padding, only when HAS_KEY_MASK).
Internally ``s`` is kept in base-2 units (``qk_scale = scale·log2 e``)
and the stored ``lse`` is base 2.  A query row that sees no key stores ``lse = +inf``: its output is 0 and every
probability recomputed from it in the backward is ``exp2(s − inf) = 0``, so such rows give 0 and never NaN.

Block skipping: each program visits only the key (or query) blocks that can hold a visible pair, i.e. the range cut by
causality, the window and the document start/end of the block's first/last row; within that range the blocks that are
entirely visible run without the elementwise mask ("full" loop), and only the edge blocks pay for it ("masked" loops).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _visible(q_idx, k_idx, q_dstart, k_valid, W, MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr):
    """Boolean visibility of broadcastable query/key index tiles (see module docstring)."""
    if MASK:
        keep = (k_idx <= q_idx) & (k_idx > q_idx - W) & (k_idx >= q_dstart)
        if HAS_KEY_MASK:
            keep = keep & (k_valid != 0)
    else:
        keep = k_valid != 0
    return keep


@triton.jit
def _cut(x, slot_ptrs, live, MODE: tl.constexpr):
    """Identity on ``x`` that hides the def-use edge from Triton's "chained dot" detection.

    MODE 1: a round trip through this program's global scratch slot (``_through_scratch``; its barriers keep the
    loop from being software-pipelined). MODE 2: the value leaves through an ``scf.if`` on ``live``, a run-time
    argument that is always true but unknown to the compiler (``W > 0``); the never-taken branch yields a value it
    loads, so the ``if`` cannot be folded into a select, and the layout pass's forward slice stops at the yield.
    """
    if MODE == 1:
        y = _through_scratch(x, slot_ptrs)
    else:
        if live:
            y = x
        else:  # never taken; a value loaded inside the branch keeps the `if` from becoming a select
            y = tl.load(slot_ptrs)
    return y


@triton.jit
def _through_scratch(x, slot_ptrs):
    """Return ``x`` after a round trip through this program's global scratch slot (L1/L2 resident).

    Used when ``SCRATCH``: it cuts the def-use chain between two dots, so Triton's layout pass no longer treats the
    first dot as "chained" (which assigns all 8 warps to its M rows and, with M=64, makes both warpgroups compute the
    same S tile); the S/dP products are then split over the warpgroups. The barriers order the slot's reuse (WAR)
    and make the writes visible to the other warps of the program (RAW).
    """
    tl.debug_barrier()
    tl.store(slot_ptrs, x)
    tl.debug_barrier()
    return tl.load(slot_ptrs)


@triton.jit
def _scratch_slot(SCR, which, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, N_SLOTS: tl.constexpr):
    """Pointers (BLOCK_R, BLOCK_C) into this program's scratch slot ``which`` (of N_SLOTS)."""
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    base = SCR + (pid.to(tl.int64) * N_SLOTS + which) * (BLOCK_R * BLOCK_C)
    return base + tl.arange(0, BLOCK_R)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]


@triton.jit
def _fwd_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, q_idx, q_dstart, kvalid_base, slot_p, slot_a,
              lo, hi, T, W, qk_scale,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr,
              HAS_KEY_MASK: tl.constexpr, SCRATCH: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + lo.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + lo.to(tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
    for n0 in range(lo, hi, BLOCK_N):
        k_idx = n0 + offs_n
        if MASK:
            k = tl.load(k_ptrs, mask=k_idx[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        if MASK or HAS_KEY_MASK:
            k_valid = k_idx
            if HAS_KEY_MASK:
                k_valid = tl.load(kvalid_base + k_idx, mask=k_idx < T, other=0)
            keep = _visible(q_idx[:, None], k_idx[None, :], q_dstart[:, None], k_valid[None, :], W,
                            MASK, HAS_KEY_MASK)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SCRATCH:  # the rescale feeds the PV dot's accumulator: cut that link too
            alpha = _cut(alpha, slot_a, W > 0, SCRATCH)
        acc = acc * alpha[:, None]
        if MASK:
            v = tl.load(v_ptrs, mask=k_idx[:, None] < T, other=0.0)
        else:
            v = tl.load(v_ptrs)
        p_lo = p.to(v.dtype)
        if SCRATCH:
            p_lo = _cut(p_lo, slot_p, W > 0, SCRATCH)
        acc = tl.dot(p_lo, v, acc=acc)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return acc, m_i, l_i


@triton.jit
def _query_block_ranges(DSTART, b, m0, T, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-block ranges of query rows [m0, m0+BLOCK_M).

    Masked [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi).
    """
    lo = tl.maximum(tl.maximum(m0 - W + 1, 0), tl.load(DSTART + b * T + m0))
    need = tl.maximum(m0 + BLOCK_M - W, tl.load(DSTART + b * T + tl.minimum(m0 + BLOCK_M - 1, T - 1)))
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    full_hi = m0  # BLOCK_M % BLOCK_N == 0: every key block strictly left of m0 is fully causal-visible
    full_lo = tl.maximum(lo, ((need + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit(do_not_specialize=["T", "H", "G", "W"])
def _attn_fwd_kernel(Q, K, V, O, LSE, DSTART, KVALID, SCR, SCR_ALPHA,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     T, H, G, W, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_KEY_MASK: tl.constexpr, SCRATCH: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest (latest) query blocks first
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qt
    q = tl.load(q_base + tl.arange(0, BLOCK_M)[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    kvalid_base = KVALID + b.to(tl.int64) * T
    q_dstart = tl.load(DSTART + b * T + offs_m, mask=row_ok, other=0)

    lo, full_lo, full_hi, hi = _query_block_ranges(DSTART, b, m0, T, W, BLOCK_M, BLOCK_N)
    slot = _scratch_slot(SCR, 0, BLOCK_M, BLOCK_N, 1)
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    slot_a = SCR_ALPHA + pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, q_dstart,
                              kvalid_base, slot, slot_a, full_lo, full_hi, T, W, qk_scale,
                              BLOCK_N, HEAD_DIM, False, HAS_KEY_MASK, SCRATCH)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, q_dstart,
                              kvalid_base, slot, slot_a, lo, full_lo, T, W, qk_scale,
                              BLOCK_N, HEAD_DIM, True, HAS_KEY_MASK, SCRATCH)
    acc, m_i, l_i = _fwd_loop(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, q_dstart,
                              kvalid_base, slot, slot_a, full_hi, hi, T, W, qk_scale,
                              BLOCK_N, HEAD_DIM, True, HAS_KEY_MASK, SCRATCH)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_ot
    tl.store(o_base + tl.arange(0, BLOCK_M)[:, None] * stride_ot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=["T"])
def _attn_bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt, T, H,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, t] = Σ_d o·do (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot
                + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
                 + offs_m[:, None].to(tl.int64) * stride_dt + offs_d[None, :], mask=row_ok[:, None],
                 other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, q_idx, q_dstart, kvalid_base, slot_ds,
             lo, hi, T, W, qk_scale, pds_tile, pds_rows, pds_ld, pds_half, KR,
             BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
             SCRATCH: tl.constexpr, V_FIRST: tl.constexpr, STORE_PDS: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = k_base + lo.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + lo.to(tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
    k_row = lo.to(tl.int64) * stride_kt
    v_row = lo.to(tl.int64) * stride_vt
    for n0 in range(lo, hi, BLOCK_N):
        k_idx = n0 + offs_n
        if V_FIRST:
            # V's tile is dead after dP, before K's is loaded: both share one slot of shared memory. The strides are
            # constexprs here: addresses from a scalar row offset plus immediates, nothing hoisted and spilled.
            k_ptrs = k_base + k_row + offs_n[:, None] * stride_kt + offs_d[None, :]
            v_ptrs = v_base + v_row + offs_n[:, None] * stride_vt + offs_d[None, :]
            k_row += BLOCK_N * stride_kt
            v_row += BLOCK_N * stride_vt
            if MASK:
                v = tl.load(v_ptrs, mask=k_idx[:, None] < T, other=0.0)
            else:
                v = tl.load(v_ptrs)
            dp = tl.dot(do, tl.trans(v))
        if MASK:
            k = tl.load(k_ptrs, mask=k_idx[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
        if not V_FIRST:
            if MASK:
                v = tl.load(v_ptrs, mask=k_idx[:, None] < T, other=0.0)
            else:
                v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASK or HAS_KEY_MASK:
            k_valid = k_idx
            if HAS_KEY_MASK:
                k_valid = tl.load(kvalid_base + k_idx, mask=k_idx < T, other=0)
            keep = _visible(q_idx[:, None], k_idx[None, :], q_dstart[:, None], k_valid[None, :], W,
                            MASK, HAS_KEY_MASK)
            p = tl.where(keep, p, 0.0)
        if not V_FIRST:
            dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        if STORE_PDS:  # keys as rows of the chunk buffers (see _store_pds_zeros); dK, dV come from them afterwards
            # rows past T store their exact zeros (lse = +inf there), so the products may read whole row tiles
            at = pds_tile + (pds_rows[:, None] + k_idx[None, :] * pds_ld)
            if MASK:
                keep_st = k_idx[None, :] < KR
                tl.store(at, p.to(k.dtype), mask=keep_st)
                tl.store(at + pds_half, ds, mask=keep_st)
            else:  # keys left of the block's first row: all below KR
                tl.store(at, p.to(k.dtype))
                tl.store(at + pds_half, ds)
        if SCRATCH:
            ds = _cut(ds, slot_ds, W > 0, SCRATCH)
        dq = tl.dot(ds, k, acc=dq)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit(do_not_specialize=["T", "H", "G", "W", "ROW0", "RRP", "KR", "pds_half"])
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, DSTART, KVALID, SCR, O, PDS,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt, stride_ob, stride_oh, stride_ot,
                        T, H, G, W, qk_scale, sm_scale, ROW0, RRP, KR, pds_half,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_KEY_MASK: tl.constexpr, SCRATCH: tl.constexpr, FUSE_DELTA: tl.constexpr,
                        V_FIRST: tl.constexpr, KT_C: tl.constexpr = 0, VT_C: tl.constexpr = 0,
                        STORE_PDS: tl.constexpr = False, ZA: tl.constexpr = 128):
    """dQ of one query block. FUSE_DELTA: also compute δ = rowsum(dO·O) of the block here (dO is loaded anyway) and
    store it for the dK/dV kernel launched after this one, instead of a separate delta launch. V_FIRST: load V and
    compute dP before loading K, so the two key-side tiles never live together in shared memory (head_dim 512:
    Q, dO resident 128 KiB + one 64-key tile 64 KiB fits, where K and V together would need 256 KiB); it also takes
    the K/V row strides as constexprs KT_C/VT_C (as the split dK/dV kernel does for Q/dO).

    STORE_PDS: this launch covers the query rows [ROW0, ROW0 + grid·BLOCK_M) of a chunk and also writes every P and dS
    tile it computes into the chunk buffers PDS (P) and PDS + pds_half (dS), laid out per (batch, KV head) as KR key
    rows × G·RRP columns (column g·RRP + row − ROW0 for query head g of the group), plus zeros where a later
    ``_flash_attention_stored_bwd_triton`` product reads but this kernel skips (see ``_store_pds_zeros``)."""
    if V_FIRST:
        stride_kt = KT_C
        stride_vt = VT_C
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0) + ROW0 // BLOCK_M
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + m0.to(tl.int64) * stride_qt
                + offs_r[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + m0.to(tl.int64) * stride_dot
                 + offs_r[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=float("inf"))
    if FUSE_DELTA:
        o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + m0.to(tl.int64) * stride_ot
                    + offs_r[:, None] * stride_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=row_ok)
    else:
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    kvalid_base = KVALID + b.to(tl.int64) * T
    q_dstart = tl.load(DSTART + b * T + offs_m, mask=row_ok, other=0)

    lo, full_lo, full_hi, hi = _query_block_ranges(DSTART, b, m0, T, W, BLOCK_M, BLOCK_N)
    slot = _scratch_slot(SCR, 0, BLOCK_M, BLOCK_N, 1)
    pds_ld = tl.multiple_of(G * RRP, 64)
    pds_tile = PDS + ((b * (H // G) + hk).to(tl.int64) * KR) * pds_ld + (h % G) * RRP + (m0 - ROW0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, q_dstart, kvalid_base,
                  slot, full_lo, full_hi, T, W, qk_scale, pds_tile, offs_r, pds_ld, pds_half, KR,
                  BLOCK_N, HEAD_DIM, False, HAS_KEY_MASK, SCRATCH, V_FIRST, STORE_PDS)
    dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, q_dstart, kvalid_base,
                  slot, lo, full_lo, T, W, qk_scale, pds_tile, offs_r, pds_ld, pds_half, KR,
                  BLOCK_N, HEAD_DIM, True, HAS_KEY_MASK, SCRATCH, V_FIRST, STORE_PDS)
    dq = _dq_loop(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, q_dstart, kvalid_base,
                  slot, full_hi, hi, T, W, qk_scale, pds_tile, offs_r, pds_ld, pds_half, KR,
                  BLOCK_N, HEAD_DIM, True, HAS_KEY_MASK, SCRATCH, V_FIRST, STORE_PDS)
    if STORE_PDS:
        _store_pds_zeros(pds_tile, pds_ld, pds_half, lo, hi, KR, BLOCK_M, BLOCK_N, ZA, DQ.dtype.element_ty)
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + m0.to(tl.int64) * stride_dqt
             + offs_r[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _store_pds_zeros(pds_tile, pds_ld, pds_half, lo, hi, KR,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ZA: tl.constexpr, DTYPE: tl.constexpr):
    """Zeros for the key blocks of [0, KR) that the products after this kernel read but the dQ loops skipped.

    Those products take keys in tiles of ZA (aligned) and, for a key tile, every query row from the tile's first key
    up to the end of the last key's document. Such rows see the whole tile except keys before their block's first
    visited key ``lo`` (a document starting inside the tile) and keys after its last one (the diagonal): so the
    blocks from ``lo`` rounded down to ZA, and from the end of the last visited block up to ``hi`` rounded up to ZA.
    """
    _store_zero_keys(pds_tile, pds_ld, pds_half, (lo // ZA) * ZA, lo, KR, BLOCK_M, BLOCK_N, DTYPE)
    _store_zero_keys(pds_tile, pds_ld, pds_half, ((hi + BLOCK_N - 1) // BLOCK_N) * BLOCK_N,
                     tl.minimum(((hi + ZA - 1) // ZA) * ZA, KR), KR, BLOCK_M, BLOCK_N, DTYPE)


@triton.jit
def _store_zero_keys(pds_tile, pds_ld, pds_half, start, end, KR,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr):
    """Zeros into both buffers (P, dS) for the keys [start, end) of this program's rows, in blocks of BLOCK_N."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M)
    zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=DTYPE)
    for n0 in range(start, end, BLOCK_N):
        k_idx = n0 + offs_n
        at = pds_tile + (offs_r[:, None] + k_idx[None, :] * pds_ld)
        keep = k_idx[None, :] < KR
        tl.store(at, zero, mask=keep)
        tl.store(at + pds_half, zero, mask=keep)
