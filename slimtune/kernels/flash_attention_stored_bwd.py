"""The "stored" backward of full causal attention: dQ with P and dS written out, then dK and dV as matrix products.

Why: the usual flash backward computes S = QKᵀ and dP = dO·Vᵀ twice, once in the dQ kernel and once in the dK/dV
kernel (7 products for 5 distinct ones). At head_dim 512 the dK/dV kernel is also the slow one: its two 512-wide
fp32 accumulators fill the register file, so it runs 32-key tiles on narrow MMA instructions (ATTENTION_NOTES.md).
Here the dQ kernel, which has to compute P and dS anyway, stores them (bf16, exactly the values the fused kernels feed
their products); dK = scale·dSᵀQ and dV = PᵀdO are then plain products over (query head, row) pairs, with nothing
recomputed and wide MMA tiles (``_flash_attention_stored_bwd_triton``).

Memory stays O(T): query rows go in chunks of ``rows`` (a multiple of the dQ block), so the two buffers hold
``2 × batch × q_heads × rows × seq`` values (bf16) at a time; ``rows`` fills whole waves of dQ programs on this GPU,
up to ``WAVES`` of them and within ``BUFFER_BUDGET_BYTES`` (default: four times the size of Q, at most 1 GiB); when
the budget does not hold one wave the fused kernels run instead. dK/dV accumulate over chunks in fp32 (8 bytes per
key and head_dim entry of each KV head).

Only for layers without a sliding window (a window makes the fused kernels skip most key blocks, while the
products here would run over each chunk's whole key range).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from slimtune.kernels.flash_attention_configs import _config, _fitting

try:
    import triton

    from slimtune.kernels import _flash_attention_stored_bwd_triton as _ks
except ImportError:  # pragma: no cover - CPU installs never reach this module's launchers
    triton = _ks = None

# Key tile of the dK/dV products (= the zero-fill alignment of the dQ kernel's stores, its ZA).
KEY_TILE = 128
# Largest size of the two chunk buffers together. None: four times the size of Q, clamped to [256 MiB, 1 GiB]. So a
# layer's backward holds at most 1 GiB more than with the fused kernels (E2B, H200: 8K +0.28 GiB for 9.41 instead
# of 10.91 ms, 32K +1.1 GiB for 139.8 instead of 177.5 ms); from ~33K tokens on at 8 heads not one wave of rows
# fits and the fused kernels run. A larger budget buys speed: 5 GiB gives 4 waves, 8.39 ms at 8K, 132.5 at 32K.
BUFFER_BUDGET_BYTES: int | None = None
# Most rows per chunk, in whole waves of dQ programs: more rows, fewer chunks (H200, E2B full layer, 8K: 1 wave
# 9.41 ms fwd+bwd, 2 waves 8.95, 4 waves 8.39; the fused kernels 10.91), at 4 × batch × q_heads × seq bytes per row.
WAVES = 4
# Tests: fill the chunk buffers with NaN first, so a value the products read but the dQ kernel never wrote shows.
POISON_BUFFERS = False


class ProductTile(NamedTuple):
    """Launch shape of the dK/dV products: head_dim columns and query rows per step, warps, pipeline stages."""

    block_d: int
    block_q: int
    num_warps: int
    num_stages: int


PRODUCT_TILE = ProductTile(128, 64, 8, 3)  # 96 KiB of shared memory
# Smaller tiles for GPUs with less shared memory (Triton refuses the launch before running it): 32 and 6 KiB.
_SMALLER_TILES = (ProductTile(64, 32, 4, 2), ProductTile(32, 16, 4, 1))

def chunk_rows(batch: int, q_heads: int, seq: int, block_m: int, n_sms: int, head_dim: int = 512) -> int | None:
    """Query rows per chunk (a multiple of 64 and of ``block_m``), or None: the fused kernels then run instead.

    A chunk's dQ launch has rows / block_m × batch × q_heads programs, one per SM at a time (their shared memory), so
    the rows fill whole waves, never one program more (H200, 8K: 17 blocks = 136 programs on 132 SMs ran a second,
    almost empty wave per chunk: 12.39 ms against the fused kernels' 10.91). As many waves as ``WAVES`` allows and the
    buffer budget holds; when not even one wave fits, None (a partial wave leaves SMs idle in every chunk).
    """
    unit = _row_unit(block_m)
    seq_rows = -(-seq // unit) * unit
    budget = BUFFER_BUDGET_BYTES
    if budget is None:
        budget = min(max(4 * batch * seq * q_heads * head_dim * 2, 256 << 20), 1 << 30)
    fits = budget // (4 * batch * q_heads * max(seq, 1))  # 2 buffers × 2 bytes × B·H × seq × rows
    # the kernels address a buffer's key rows with int32 offsets, key × G·rows (G ≤ q_heads): keep them below 2^31
    fits = min(fits, (2**31 - 1) // (q_heads * max(seq, 1)))
    rows = 0
    for waves in range(1, WAVES + 1):  # row blocks of k waves: floor(k × SMs / (batch × q_heads)) dQ programs each
        blocks = max(1, waves * n_sms // (batch * q_heads))
        candidate = -(-blocks * block_m // unit) * unit
        if candidate >= seq_rows and fits >= seq_rows:
            return seq_rows  # the whole sequence in one chunk
        if candidate > fits:
            break
        rows = candidate
    return rows or None


def backward_bytes(batch: int, q_heads: int, kv_heads: int, seq: int, head_dim: int, n_sms: int | None = None) -> int:
    """Bytes the stored backward adds while one full (unwindowed) layer's backward runs: the two chunk buffers and
    the fp32 dK/dV accumulators; 0 where the default config runs the fused kernels. For the memory plan."""
    cfg = _config(head_dim, "dq", None)
    if not cfg.variant & 4:
        return 0
    rows = chunk_rows(batch, q_heads, seq, cfg.block_m, n_sms if n_sms is not None else _planning_sms(), head_dim)
    if rows is None:
        return 0
    return 4 * batch * q_heads * seq * rows + 8 * batch * kv_heads * seq * head_dim


@functools.cache
def _planning_sms() -> int:
    """SMs of the GPU this process trains on; the H200's 132 without one (planning ahead). Once: the planner asks
    for every layer of every plan it weighs."""
    try:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    except (AssertionError, RuntimeError):  # no CUDA build, no device
        return 132


def _row_unit(block_m: int) -> int:
    """Chunk rows come in multiples of this: whole dQ blocks, and 64 so the products' row tiles stay aligned."""
    return max(block_m, 64)


def backward_stored(do, q, k, v, lse, scale, dend, rows, block_m, launch_dq):
    """dQ, dK, dV of full causal attention through the chunk buffers.

    ``launch_dq(dq, store)`` runs the dQ kernel for one chunk with ``store = (buffer, row0, rows, rows_padded,
    key_rows, half)``, writing the chunk's rows of ``dq`` and the two buffers, and returns the rows per block it
    ran (``block_m`` or, on GPUs with less shared memory, fewer).
    """
    b, h, t, d = q.shape
    hk = k.shape[1]
    g = h // hk
    unit = _row_unit(block_m)  # the dQ blocks of a chunk end inside its padded columns
    rrp_max = -(-rows // unit) * unit
    pds = torch.empty(2 * b * hk * t * g * rrp_max, dtype=q.dtype, device=q.device)
    if POISON_BUFFERS:
        pds.fill_(float("nan"))
    acc = torch.zeros((2, b * hk, t, d), dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    for row0 in range(0, t, rows):
        rr = min(rows, t - row0)
        rrp = -(-rr // unit) * unit
        kr = row0 + rr  # keys a row of this chunk can see
        half = b * hk * kr * g * rrp
        ran_block_m = launch_dq(dq, (pds, row0, rr, rrp, kr, half))

        def products(tile: ProductTile) -> None:
            block_d = min(tile.block_d, d)
            _ks._dkdv_from_pds_kernel[(triton.cdiv(kr, KEY_TILE), d // block_d, b * hk * 2)](
                pds, q, do, acc, dend, *q.stride()[:3], *do.stride()[:3],
                t, g, hk, row0, rr, rrp, kr, half, b * hk * t * d,
                HEAD_DIM=d, BLOCK_K=KEY_TILE, BLOCK_D=block_d, BLOCK_Q=tile.block_q,
                # whole row tiles only where each lies in one dQ block that wrote it (see the kernel)
                ROW_MASK=ran_block_m % tile.block_q != 0 or KEY_TILE % tile.block_q != 0,
                num_warps=tile.num_warps, num_stages=tile.num_stages,
            )

        _fitting("products", PRODUCT_TILE, q, products, smaller=_SMALLER_TILES)
    dk = acc[1].mul_(scale).to(k.dtype).view(b, hk, t, d)
    dv = acc[0].to(v.dtype).view(b, hk, t, d)
    return dq, dk, dv
