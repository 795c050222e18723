"""Flash attention for training Gemma 4: causal, GQA, sliding window, packed documents, key padding; O(T) memory.

Forward (per query head h, KV head ``h // G``; visible keys ``j`` of query ``i`` satisfy ``j <= i``, ``j > i - W`` if a
window is set, same document, key not padded)::

    s_ij = scale · q_i·k_j,   lse_i = log Σ_j exp(s_ij),   o_i = Σ_j exp(s_ij − lse_i) v_j      (0 if nothing visible)

Backward, with ``p_ij = exp(s_ij − lse_i)`` and ``δ_i = o_i·do_i``::

    dv_j = Σ_i p_ij do_i,   ds_ij = p_ij (do_i·v_j − δ_i),   dq_i = scale Σ_j ds_ij k_j,   dk_j = scale Σ_i ds_ij q_i

``dk``/``dv`` are summed over the G query heads sharing a KV head. Only ``lse`` (fp32, one per row) is saved between
forward and backward. On CUDA with Triton the kernels in ``_flash_attention_triton`` run (bf16/fp16 inputs, fp32
accumulation, head_dim a power of two ≤ 512); elsewhere the exact same function is computed by
:func:`slimtune.kernels.attention_reference.attention_fallback`.

Buffers: the forward output is written straight into a ``(batch, seq, heads, head_dim)`` buffer and returned as its
``(batch, heads, seq, head_dim)`` view, so the caller's ``transpose(1, 2)`` back to token-major order is free.
"""

from __future__ import annotations

import functools
import os

import torch

from slimtune.errors import KernelUnavailableError
from slimtune.kernels import flash_attention_stored_bwd as _stored
from slimtune.kernels.attention_reference import attention_fallback, document_bounds
from slimtune.kernels.flash_attention_configs import (  # noqa: F401 - _config, _fitted: used by benchmarks, tests
    KernelConfig,
    _config,
    _decode_configs,
    _encode_configs,
    _fitted,
    _fitting,
)

try:  # Triton is optional: CPU installs use the reference path.
    import triton

    from slimtune.kernels import _flash_attention_bwd_triton as _kb
    from slimtune.kernels import _flash_attention_triton as _k
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    _k = _kb = None

__all__ = ["KernelConfig", "causal_attention_flops", "flash_attention",
           "triton_attention_available"]

_LOG2E = 1.4426950408889634


def _scratch(cfg: KernelConfig, n_programs: int, slots: int, like: torch.Tensor) -> torch.Tensor:
    """Per-program scratch of ``slots`` (block_m × block_n) tiles in the input dtype; the input itself if unused."""
    if cfg.scratch != 1:  # mode 2 never touches its slot (see ``_cut``)
        return like
    return torch.empty(n_programs * slots * cfg.block_m * cfg.block_n, dtype=like.dtype, device=like.device)


def triton_attention_available(q: torch.Tensor) -> bool:
    """Whether the Triton kernels can run for ``q``: CUDA, Triton importable, bf16/fp16, head_dim a power of 2 ≤ 512."""
    d = q.shape[-1]
    return (
        _k is not None
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and 16 <= d <= 512
        and d & (d - 1) == 0
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=16)
def _single_document_bounds(batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_start = 0 and doc_end = seq for every token (cached: reused by every layer and step)."""
    return (torch.zeros((batch, seq), dtype=torch.int32, device=device),
            torch.full((batch, seq), seq, dtype=torch.int32, device=device))


def _forward(q, k, v, scale, window, dstart, key_valid, cfg: KernelConfig):
    """Launch the forward kernel; ``window`` and ``dstart`` are always given (see ``flash_attention``)."""
    b, h, t, d = q.shape
    hk = k.shape[1]
    out_btHd = torch.empty((b, t, h, d), dtype=q.dtype, device=q.device)
    o = out_btHd.transpose(1, 2)
    lse = torch.empty((b, h, t), dtype=torch.float32, device=q.device)
    assert cfg.block_m % cfg.block_n == 0, "forward needs BLOCK_M to be a multiple of BLOCK_N"
    grid = (triton.cdiv(t, cfg.block_m), b * h)
    _k._attn_fwd_kernel[grid](
        q, k, v, o, lse, dstart, key_valid if key_valid is not None else lse, _scratch(cfg, grid[0] * grid[1], 1, q),
        torch.empty(grid[0] * grid[1] * cfg.block_m, dtype=torch.float32, device=q.device) if cfg.scratch == 1 else lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        t, h, h // hk, window, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_KEY_MASK=key_valid is not None,
        SCRATCH=int(cfg.scratch), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def _bwd_delta(o, do):
    """delta = rowsum(o · do) in fp32, shape (batch, heads, seq)."""
    b, h, t, d = o.shape
    delta = torch.empty((b, h, t), dtype=torch.float32, device=o.device)
    _k._attn_bwd_delta_kernel[(triton.cdiv(t, 64), b * h)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], t, h, HEAD_DIM=d, BLOCK_M=64, num_warps=4,
    )
    return delta


def _bwd_dq(do, q, k, v, o, lse, delta, scale, window, dstart, key_valid, c: KernelConfig, dq=None, store=None):
    """dQ; with ``c.variant & 1`` the kernel also fills ``delta`` (rowsum(dO·O)) for the dK/dV kernel after it.

    ``store = (buffer, row0, rows, rows_padded, key_rows, half)``: only the chunk of query rows [row0, row0 + rows),
    also writing its P and dS tiles into ``buffer`` (the stored backward: ``flash_attention_stored_bwd``).
    """
    b, h, t, d = q.shape
    if dq is None:
        dq = torch.empty_like(q)
    pds, row0, rows, rows_padded, key_rows, half = store if store is not None else (lse, 0, t, 0, 0, 0)
    grid = (triton.cdiv(rows, c.block_m), b * h)
    _k._attn_bwd_dq_kernel[grid](
        q, k, v, do, dq, lse, delta, dstart, key_valid if key_valid is not None else lse,
        _scratch(c, grid[0] * grid[1], 1, q), o, pds,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *o.stride()[:3],
        t, h, h // k.shape[1], window, scale * _LOG2E, scale, row0, rows_padded, key_rows, half,
        HEAD_DIM=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n, HAS_KEY_MASK=key_valid is not None,
        SCRATCH=int(c.scratch), FUSE_DELTA=bool(c.variant & 1), V_FIRST=bool(c.variant & 2),
        KT_C=k.stride(2) if c.variant & 2 else 0, VT_C=v.stride(2) if c.variant & 2 else 0,
        STORE_PDS=store is not None, ZA=_stored.KEY_TILE, num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return dq


def _bwd_dkdv(do, q, k, v, lse, delta, scale, window, dstart, dend, key_valid, c: KernelConfig):
    """dK, dV (summed over each KV group's query heads).

    With one program per key block (split 1) the kernels write dK/dV in the input dtype directly; when the query
    heads of a group are split over programs (too few key blocks to fill the GPU) they write fp32 partials, summed
    and cast by one more launch.
    """
    b, h, t, d = q.shape
    hk = k.shape[1]
    g = h // hk
    n_blocks = triton.cdiv(t, c.block_n) * b * hk
    split = 1
    while split < g and n_blocks * split < 2 * _num_sms(q.device) and g % (split * 2) == 0 \
            and (c.max_split == 0 or split * 2 <= c.max_split):
        split *= 2
    dk = torch.empty((b, hk, t, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, hk, t, d), dtype=v.dtype, device=v.device)
    if split == 1:
        outs, out_strides = (dk, dv), (0, *dk.stride()[:3])
    else:
        parts = torch.empty((2, split, b, hk, t, d), dtype=torch.float32, device=k.device)
        outs, out_strides = (parts[0], parts[1]), parts[0].stride()[:4]
    grid = (triton.cdiv(t, c.block_n), b * hk, split)
    common = dict(HEAD_DIM=d, BLOCK_M=c.block_m, BLOCK_N=c.block_n, HAS_KEY_MASK=key_valid is not None,
                  SCRATCH=int(c.scratch), num_warps=c.num_warps, num_stages=c.num_stages)
    kvalid = key_valid if key_valid is not None else lse
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *out_strides)
    sizes = (t, h, hk, g, g // split, window, scale * _LOG2E, scale)
    if c.variant == 1:  # separate dV and dK kernels (see _flash_attention_bwd_triton)
        scr = _scratch(c, grid[0] * grid[1] * grid[2], 1, q)
        for want_dk, out in ((False, outs[1]), (True, outs[0])):
            _kb._attn_bwd_dk_or_dv_kernel[grid](q, k, v, do, out, lse, delta, dstart, dend, kvalid, scr,
                                               *strides, *sizes, WANT_DK=want_dk, **common)
    else:  # the single dK/dV kernel (variant 2: with the Q/dO row strides as constexprs)
        _kb._attn_bwd_dkdv_kernel[grid](q, k, v, do, *outs, lse, delta, dstart, dend, kvalid,
                                        _scratch(c, grid[0] * grid[1] * grid[2], 2, q), *strides, *sizes,
                                        TRANSPOSED=bool(c.transposed), QT_C=q.stride(2) if c.variant == 2 else 0,
                                        DOT_C=do.stride(2) if c.variant == 2 else 0, **common)
    if split > 1:
        n = b * hk * t * d
        _kb._sum_splits_kernel[(triton.cdiv(n, 1024), 2)](parts, dk, dv, n, split, BLOCK=1024, num_warps=4)
    return dk, dv


def _backward(do, q, k, v, o, lse, scale, window, dstart, dend, key_valid, cfgs):
    if do.stride(-1) != 1:
        do = do.contiguous()
    if cfgs["dq"].variant & 1:  # the dQ kernel fills delta
        delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    else:
        delta = _bwd_delta(o, do)
    b, h, t, _ = q.shape
    rows = _stored.chunk_rows(b, h, t, cfgs["dq"].block_m, _num_sms(q.device), q.shape[-1]) \
        if cfgs["dq"].variant & 4 and window > t else None
    if rows is not None:  # dQ storing P and dS per chunk of rows, dK/dV as products over them

        def launch_dq(dq, store):  # returns the rows per block of the launch shape that fit this GPU
            def run(c):
                _bwd_dq(do, q, k, v, o, lse, delta, scale, window, dstart, key_valid, c, dq, store)
                return c.block_m
            return _fitting("dq", cfgs["dq"], q, run)

        return _stored.backward_stored(do, q, k, v, lse, scale, dend, rows, cfgs["dq"].block_m, launch_dq)
    dq = _fitting("dq", cfgs["dq"], q, lambda c: _bwd_dq(do, q, k, v, o, lse, delta, scale, window, dstart,
                                                          key_valid, c))
    dk, dv = _fitting("dkdv", cfgs["dkdv"], q, lambda c: _bwd_dkdv(do, q, k, v, lse, delta, scale, window, dstart,
                                                                  dend, key_valid, c))
    return dq, dk, dv


# The kernels as registered torch ops (the only autograd path): torch.compile treats them as opaque calls, so a
# compiled decoder layer stays one graph (no break around attention) and inductor never re-compiles our Triton
# source (its pipeline rejects the head_dim-512 layout trick: H200 run, 2026-11-28).
@torch.library.custom_op("slimtune::flash_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int, dstart: torch.Tensor,
            dend: torch.Tensor, key_valid: torch.Tensor | None, configs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # the launch shape the encoded configs name, or the first smaller one this GPU's shared memory holds
    return _fitting("fwd", _decode_configs(configs)["fwd"], q,
                    lambda c: _forward(q, k, v, scale, window, dstart, key_valid, c))


@_fwd_op.register_fake
def _(q, k, v, scale, window, dstart, dend, key_valid, configs):
    b, h, t, d = q.shape
    return q.new_empty((b, t, h, d)).transpose(1, 2), q.new_empty((b, h, t), dtype=torch.float32)


@torch.library.custom_op("slimtune::flash_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, scale: float, window: int, dstart: torch.Tensor, dend: torch.Tensor,
            key_valid: torch.Tensor | None, configs: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _backward(do, q, k, v, o, lse, scale, window, dstart, dend, key_valid, _decode_configs(configs))
    return dq, dk.contiguous(), dv.contiguous()


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, scale, window, dstart, dend, key_valid, configs):
    return torch.empty_like(q), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_op_setup(ctx, inputs, output):
    q, k, v, scale, window, dstart, dend, key_valid, configs = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], dstart, dend, key_valid)
    ctx.scale, ctx.window, ctx.configs = scale, window, configs


def _fwd_op_backward(ctx, do, _dlse):
    q, k, v, o, lse, dstart, dend, key_valid = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, ctx.scale, ctx.window, dstart, dend, key_valid, ctx.configs)
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_fwd_op_backward, setup_context=_fwd_op_setup)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    doc_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    _configs: dict[str, KernelConfig] | None = None,
) -> torch.Tensor:
    """Causal grouped-query attention with optional sliding window, packed documents and key padding.

    Args:
        q: Queries, shape (batch, q_heads, seq, head_dim); any strides with a unit last stride.
        k: Keys, shape (batch, kv_heads, seq, head_dim); ``q_heads`` must be a multiple of ``kv_heads``.
        v: Values, same shape as ``k``.
        scale: Softmax scale applied to ``q·k``; ``None`` means ``head_dim ** -0.5`` (Gemma 4 passes 1.0).
        window: Sliding window W: query i sees keys j with ``i - W < j <= i``. ``None`` for full causal attention.
        doc_ids: (batch, seq) integer document id per token; a document is a run of equal ids (no attention
            across runs).
        cu_seqlens: Alternative to ``doc_ids`` for batch 1: cumulative document lengths ``[0, l0, l0+l1, ..., seq]``.
        key_padding_mask: (batch, seq) bool, True where the token is real. Padded keys are never attended; query rows
            that see no key at all return 0 (and get 0 gradients).
        doc_bounds: Precomputed ``document_bounds(doc_ids, cu_seqlens, ...)`` (lets every layer of a forward pass
            share one computation); takes precedence over ``doc_ids``/``cu_seqlens``.

    Returns:
        Attention output, shape (batch, q_heads, seq, head_dim), in the input dtype (a view of a token-major buffer).

    Raises:
        KernelUnavailableError: the shapes are inconsistent (head counts, head_dim, sequence lengths).

    Example:
        >>> o = flash_attention(q, k, v, scale=1.0, window=512)  # doctest: +SKIP
    """
    _check_shapes(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if window is not None and window <= 0:
        raise KernelUnavailableError(f"window must be a positive number of tokens, got {window}")
    b, _, t, _ = q.shape
    if window is not None and window >= t:
        window = None  # every causal key is inside the window
    if doc_bounds is not None:
        dstart, dend = doc_bounds
    else:
        dstart, dend = document_bounds(doc_ids, cu_seqlens, b, t, q.device)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(device=q.device, dtype=torch.bool)
        if key_padding_mask.shape != (b, t):
            raise KernelUnavailableError(
                f"key_padding_mask must have shape (batch, seq) = {(b, t)}, got {tuple(key_padding_mask.shape)}"
            )
    use_triton = (triton_attention_available(q) or (_k is not None and _interpreting() and q.dtype == torch.float16)) \
        and k.dtype == q.dtype and v.dtype == q.dtype
    if not use_triton:
        return attention_fallback(q, k, v, scale=scale, window=window, doc_start=dstart,
                                  key_padding_mask=key_padding_mask)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    # a (B, T) copy rather than a bool→uint8 view: inductor cannot lower view(dtype) from bool (H200 run 2026-11-28)
    key_valid = key_padding_mask.to(torch.uint8).contiguous() if key_padding_mask is not None else None
    if dstart is None:  # one document per row: the kernels always read document bounds (one compare per element)
        dstart, dend = _single_document_bounds(b, t, q.device)
    kernel_window = window if window is not None else t + 1  # W > T: every causal key is inside the window
    # _configs: explicit launch shapes (kernel tuning, tests); a window shorter than the sequence has its own
    configs = _encode_configs(q.shape[-1], _configs, windowed=window is not None and window < t)
    return _fwd_op(q, k, v, float(scale), kernel_window, dstart, dend, key_valid, configs)[0]


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise KernelUnavailableError(
            f"flash_attention expects (batch, heads, seq, head_dim) tensors, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise KernelUnavailableError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, seq and head_dim "
            "(queries and keys of the same tokens)"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise KernelUnavailableError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})"
        )


def causal_attention_flops(batch: int, q_heads: int, seq: int, head_dim: int, window: int | None = None) -> float:
    """Matmul FLOPs of the forward, 4·B·H·D per visible (query, key) pair, T²/2 pairs when causal; backward ≈ 2.5×."""
    if window is None or window >= seq:
        pairs = seq * seq / 2
    else:
        pairs = window * (window + 1) / 2 + (seq - window) * window
    return 4.0 * batch * q_heads * head_dim * pairs

