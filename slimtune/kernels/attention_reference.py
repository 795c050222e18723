"""Pure-torch attention with the exact semantics of :mod:`slimtune.kernels.flash_attention`, plus the CPU fallback.

Visibility of key ``j`` to query ``i`` (queries are the last ``Tq`` of the ``Tk`` positions, bottom-right aligned, so
query ``i`` sits at absolute position ``a = i + Tk - Tq``)::

    causal:   j <= a                    window W:  j > a - W
    docs:     j and a in the same document (a document is a contiguous run of equal ``doc_ids``)
    padding:  key_padding_mask[b, j]

    o_i = softmax_j(scale · q_i·k_j over visible j) · v          (o_i = 0 when no key is visible)

``attention_reference`` is the ground truth for tests (it computes in fp32, or fp64 for fp64 inputs, and materialises
the (Tq, Tk) score matrix). ``attention_fallback`` is what the library runs when the Triton kernels cannot (no CUDA, no
Triton, fp32 inputs, decoding with Tq < Tk): SDPA with an explicit boolean mask, identical up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_fallback", "attention_reference", "document_bounds", "visibility_mask"]


def document_bounds(
    doc_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    batch: int,
    seq: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-token first index and one-past-last index of the token's document.

    Args:
        doc_ids: (batch, seq) integer ids; a document is a maximal run of equal ids. ``None`` if not packed.
        cu_seqlens: (n_docs + 1,) cumulative lengths for batch 1 (flash-attention varlen convention). Tokens past the
            last boundary form one more document.
        batch: Batch size.
        seq: Sequence length.
        device: Device of the result.

    Returns:
        ``(doc_start, doc_end)``, each (batch, seq) int32 contiguous, or ``(None, None)`` when neither input is given.
    """
    if doc_ids is None and cu_seqlens is None:
        return None, None
    idx = torch.arange(seq, device=device)
    if doc_ids is None:
        cu = cu_seqlens.to(device=device, dtype=torch.long).flatten()
        if batch != 1:
            raise ValueError(f"cu_seqlens describes one flattened row, but batch is {batch}; pass doc_ids instead")
        boundary = torch.zeros(1, seq, dtype=torch.bool, device=device)
        starts = cu[(cu > 0) & (cu < seq)]
        boundary[0, starts] = True
    else:
        doc_ids = doc_ids.to(device)
        if doc_ids.shape != (batch, seq):
            doc_ids = doc_ids.expand(batch, seq)
        boundary = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        boundary[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    boundary[:, 0] = True
    start_at = torch.where(boundary, idx, torch.zeros_like(idx))
    doc_start = torch.cummax(start_at, dim=-1).values
    end_marker = torch.zeros_like(boundary)
    end_marker[:, :-1] = boundary[:, 1:]
    end_marker[:, -1] = True
    end_at = torch.where(end_marker, idx + 1, torch.full_like(idx, seq))
    doc_end = torch.cummin(end_at.flip(-1), dim=-1).values.flip(-1)
    return doc_start.to(torch.int32).contiguous(), doc_end.to(torch.int32).contiguous()


def visibility_mask(
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device,
    *,
    causal: bool = True,
    window: int | None = None,
    doc_start: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean (batch, 1, q_len, k_len) mask, True where query i may attend key j (see module docstring).

    ``doc_start`` is the (batch, k_len) output of :func:`document_bounds`; ``key_padding_mask`` is (batch, k_len),
    True for real tokens.
    """
    qa = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    kj = torch.arange(k_len, device=device)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= kj <= qa
    if window is not None:
        allowed &= kj > qa - window
        if not causal:
            allowed &= kj < qa + window
    allowed = allowed.expand(batch, 1, q_len, k_len)
    if doc_start is not None:
        ds = doc_start.to(device).long()
        allowed = allowed & (ds[:, None, k_len - q_len:, None] == ds[:, None, None, :])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention, computed in fp32 (fp64 for fp64 inputs), returned in the input dtype.

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, k_len, head_dim), ``q_heads % kv_heads == 0``, ``q_len <= k_len``.
        v: Same shape as ``k``.
        scale: Score scale; ``None`` means ``head_dim ** -0.5``.
        causal: Causal masking (bottom-right aligned when ``q_len < k_len``).
        window: Sliding window (see module docstring), or ``None``.
        doc_ids: (batch, k_len) document ids (runs), or ``None``.
        cu_seqlens: Cumulative document lengths for batch 1, or ``None``.
        key_padding_mask: (batch, k_len) bool, True for real tokens, or ``None``.

    Returns:
        (batch, q_heads, q_len, head_dim) tensor; rows with no visible key are 0.
    """
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    if scale is None:
        scale = d ** -0.5
    doc_start, _ = document_bounds(doc_ids, cu_seqlens, b, tk, q.device)
    allowed = visibility_mask(b, tq, tk, q.device, causal=causal, window=window, doc_start=doc_start,
                              key_padding_mask=key_padding_mask)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = hq // k.shape[1]
    qf = q.to(compute)
    kf = k.to(compute).repeat_interleave(g, dim=1)
    vf = v.to(compute).repeat_interleave(g, dim=1)
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    seen = allowed.any(dim=-1, keepdim=True)
    scores = torch.where(seen, scores, torch.zeros((), dtype=compute, device=q.device))
    probs = torch.softmax(scores, dim=-1) * seen
    return torch.matmul(probs, vf).to(q.dtype)


def attention_fallback(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    window: int | None = None,
    doc_start: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The library's non-Triton path: SDPA with an explicit boolean mask; same function as the reference.

    Rows with no visible key get one dummy visible key (so SDPA never produces NaN, in the forward or the backward)
    and are then multiplied by 0, so their output and every gradient through them is 0.

    Args:
        q: (batch, q_heads, q_len, head_dim).
        k: (batch, kv_heads, k_len, head_dim).
        v: Same shape as ``k``.
        scale: Score scale.
        causal: Causal masking (bottom-right aligned when ``q_len < k_len``).
        window: Sliding window, or ``None``.
        doc_start: (batch, k_len) int from :func:`document_bounds`, or ``None``.
        key_padding_mask: (batch, k_len) bool, True for real tokens, or ``None``.

    Returns:
        (batch, q_heads, q_len, head_dim) tensor in the input dtype.
    """
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    allowed = visibility_mask(b, tq, tk, q.device, causal=causal, window=window, doc_start=doc_start,
                              key_padding_mask=key_padding_mask)
    seen = allowed.any(dim=-1, keepdim=True)
    first_key = torch.zeros(tk, dtype=torch.bool, device=q.device)
    first_key[0] = True
    safe = allowed | (~seen & first_key)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale, enable_gqa=hq != k.shape[1])
    return out * seen.to(out.dtype)
