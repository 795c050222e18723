"""Chunked lm_head + softcapped cross-entropy with exact gradients, never materialising the full logits.

Gemma 4's vocabulary has V = 262,144 tokens: the fp32 logits of 8K tokens take 8 GiB, and their gradient as much
again. This op runs the lm_head matmul, the softcap, the cross-entropy and its gradient a chunk of tokens at a
time, so only one chunk of logits exists at once.

Math, for one token with hidden state h (H,), tied embedding W (V, H), target y and softcap c::

    z     = W h                                  (V,)  raw logits: matmul in the input dtype, fp32 result
    s     = c * tanh(z / c)                      (V,)  softcapped logits (s = z when c is None), fp32
    lse   = log(sum_j exp(s_j))
    loss  = lse - s_y                            summed over tokens whose label != ignore_index

    dloss/ds_j = softmax(s)_j - [j == y]
    ds_j/dz_j  = 1 - tanh(z_j / c)^2             (1 when c is None)
    dz         = (softmax(s) - onehot(y)) * (1 - tanh(z / c)^2)
    dloss/dh   = W^T dz          -> grad_hidden row, (H,)
    dloss/dW   = dz h^T          -> accumulated over tokens, (V, H), only when weight.requires_grad

"Gradient in forward": the loss is a scalar, so its gradient is ``grad_output * (the gradients above)``. The
forward pass therefore computes, per chunk, the logits, the loss and ``dz``, and immediately contracts ``dz``
into grad_hidden (and grad_weight): two matmuls per chunk and no recomputation. Backward only scales the
stored gradients by ``grad_output``. Rows whose label is ``ignore_index`` are dropped before any matmul (with
assistant-only masks most rows may be ignored), and their grad_hidden rows are zero.

Extra memory while the op runs: one chunk of fp32 logits (``chunk * V * 4`` bytes), plus on CUDA with bf16/fp16
inputs a ``chunk * V`` buffer of ``dz`` in that dtype, plus grad_hidden for the kept rows (``rows * H``) and,
only when the weight needs a gradient, a ``(V, H)`` fp32 accumulator and one matmul temporary of that size.

Backends for the per-chunk elementwise part (softcap, logsumexp, loss, ``dz``):

- CUDA with Triton installed: ``softcap_cross_entropy_triton``: one program per row, two passes over the chunk
  (online logsumexp, then ``dz``), ``dz`` written in place (fp32) or straight into the matmul dtype; no
  chunk-sized temporaries. Chosen over ``torch.compile`` of the chunk function because the in-place write and
  the low-precision ``dz`` output are explicit (Inductor's functionalised graph allocates its own outputs), the
  last chunk's different row count needs no recompile or dynamic-shape guard, there is no compile warm-up, and
  it composes with a user's own ``torch.compile`` without graph breaks inside an autograd.Function.
- Otherwise (CPU, or CUDA without Triton): a pure-torch sequence of in-place ops (about three chunk-sized fp32
  buffers). On CPU bf16/fp16 weights are upcast to fp32 once per call (CPU matmuls have no fp32-output mode for
  them), so CPU math is fp32 throughout.

Set the module attribute ``FORCE_REFERENCE = True`` to send every call to ``linear_cross_entropy_reference``
(full logits, plain autograd), e.g. to rule this op out when debugging; ``ELEMENTWISE_BACKEND`` ("auto",
"triton" or "torch") overrides the backend choice.
"""

from __future__ import annotations

import logging

import torch

from slimtune.errors import ConfigError, KernelUnavailableError
from slimtune.kernels import softcap_cross_entropy_triton as _triton_ce
from slimtune.kernels.linear_cross_entropy_reference import (
    _check_inputs,
    _kept_rows,
    linear_cross_entropy_reference,
)

__all__ = [
    "CPU_CHUNK_BYTES",
    "CUDA_CHUNK_BYTES",
    "ELEMENTWISE_BACKEND",
    "FORCE_REFERENCE",
    "LinearCrossEntropyFunction",
    "default_chunk_size",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
]

logger = logging.getLogger(__name__)

FORCE_REFERENCE: bool = False
"""If True, ``linear_cross_entropy`` delegates to ``linear_cross_entropy_reference`` (full fp32 logits)."""

ELEMENTWISE_BACKEND: str = "auto"
"""Per-chunk elementwise backend: "auto" (Triton on CUDA when installed, else torch), "triton" or "torch"."""

CUDA_CHUNK_BYTES: int = 512 * 2**20
"""Target size of one chunk of fp32 logits on CUDA: 512 rows at V = 262,144 (plus 256 MiB of bf16 ``dz``).
Large enough that both matmuls of a chunk are big GEMMs (512 x 262,144 x 1,536), small enough to be < 1% of an
H200 and 16x below the 8 GiB full logits of an 8K sequence. ``benchmarks/kernels/bench_linear_cross_entropy.py
--chunk-sizes`` sweeps it."""

CPU_CHUNK_BYTES: int = 32 * 2**20
"""Target size of one chunk of fp32 logits on CPU (tests, debugging): keeps the working set cache-friendly."""

_CHUNK_ALIGN = 64  # rows; keeps the M dimension of the chunk GEMMs a multiple of the usual tile size
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_warned_no_triton = False
_CPU_FP32_MATH = True  # tests set False to run the CUDA low-precision data path (bf16 dz, bf16 matmuls) on CPU


def default_chunk_size(vocab_size: int, device: torch.device | str) -> int:
    """Rows per chunk such that one chunk of fp32 logits is about ``CUDA_CHUNK_BYTES`` (CPU: ``CPU_CHUNK_BYTES``).

    Args:
        vocab_size: V, the number of rows of the lm_head weight.
        device: where the logits will live.

    Returns:
        A positive row count; a multiple of 64 whenever it is at least 64.

    Example:
        >>> default_chunk_size(262_144, "cuda")
        512
    """
    budget = CUDA_CHUNK_BYTES if torch.device(device).type == "cuda" else CPU_CHUNK_BYTES
    rows = max(1, budget // (4 * max(1, vocab_size)))
    return rows // _CHUNK_ALIGN * _CHUNK_ALIGN if rows >= _CHUNK_ALIGN else rows


def _use_triton(device: torch.device) -> bool:
    global _warned_no_triton
    if ELEMENTWISE_BACKEND == "torch":
        return False
    if ELEMENTWISE_BACKEND == "triton":
        if not _triton_ce.TRITON_AVAILABLE:
            raise KernelUnavailableError(
                "ELEMENTWISE_BACKEND='triton' but Triton is not installed; install `triton` or set it to 'auto'."
            )
        return True
    if ELEMENTWISE_BACKEND != "auto":
        raise ConfigError(f"ELEMENTWISE_BACKEND must be 'auto', 'triton' or 'torch', got {ELEMENTWISE_BACKEND!r}")
    if device.type != "cuda":
        return False
    if not _triton_ce.TRITON_AVAILABLE and not _warned_no_triton:
        _warned_no_triton = True
        logger.warning("Triton is not installed: linear_cross_entropy falls back to the slower pure-torch chunk path.")
    return _triton_ce.TRITON_AVAILABLE


def _softcap_ce_chunk_torch(
    z: torch.Tensor, y: torch.Tensor, softcap: float | None, compute_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-torch chunk math (see module docstring). ``z`` (rows, V) fp32 is overwritten with ``dz``."""
    rows = torch.arange(z.shape[0], device=z.device)
    if softcap is not None:
        t = z.div_(softcap).tanh_()  # z now holds tanh(z / c)
        s = t * softcap
    else:
        t, s = None, z
    lse = torch.logsumexp(s, dim=-1)
    loss = lse - s[rows, y]
    if not compute_grad:
        return loss, None
    p = s.sub_(lse[:, None]).exp_()  # softmax(s), in s's buffer
    p[rows, y] -= 1.0
    if t is None:
        return loss, p
    return loss, t.square_().neg_().add_(1.0).mul_(p)  # (1 - t^2) * (p - onehot), in z's buffer


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the inputs' dtype with an fp32 result (fp32 accumulation throughout)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # CPU has no fp32-output kernel for bf16/fp16 inputs


def _chunked_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    softcap: float | None,
    chunk_size: int,
    need_grad_h: bool,
    need_grad_w: bool,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss sum, grad wrt h ``(rows, H)`` in h's dtype, and fp32 grad wrt weight, for kept rows only.

    ``row_mask`` (rows,) of 0/1 weights, when given, zeroes the loss and the gradient of masked rows instead of
    the caller dropping them (static shapes: see ``linear_cross_entropy(static_shapes=True)``)."""
    rows, vocab = h.shape[0], weight.shape[0]
    use_triton = _use_triton(h.device)
    compute_grad = need_grad_h or need_grad_w
    # Matmuls run in the weight's dtype (the big tensor is never copied), except on CPU where bf16/fp16 are
    # upcast once so that the whole CPU path is fp32 math.
    w = weight
    if h.device.type != "cuda" and _CPU_FP32_MATH and weight.dtype in _LOW_PRECISION:
        w = weight.float()
    mm_dtype = w.dtype

    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty(rows, h.shape[1], dtype=h.dtype, device=h.device) if need_grad_h else None
    grad_w = torch.zeros(vocab, w.shape[1], dtype=torch.float32, device=h.device) if need_grad_w else None
    dz_buf = None  # Triton writes dz straight into the matmul dtype; reused by every chunk
    if compute_grad and use_triton and mm_dtype != torch.float32:
        dz_buf = torch.empty(min(chunk_size, rows), vocab, dtype=mm_dtype, device=h.device)

    for start in range(0, rows, chunk_size):
        stop = min(start + chunk_size, rows)
        h_c = h[start:stop].to(mm_dtype)
        y_c = y[start:stop]
        z = _mm_fp32(h_c, w.T)  # (chunk, V) fp32: the only chunk-sized fp32 buffer
        if use_triton:
            dz = None if dz_buf is None else dz_buf[: stop - start]
            loss_rows = _triton_ce.softcap_cross_entropy_chunk(z, y_c, softcap, compute_grad=compute_grad, grad_out=dz)
            dz = z if dz is None else dz  # fp32 dz overwrote z in place
        else:
            loss_rows, dz = _softcap_ce_chunk_torch(z, y_c, softcap, compute_grad)  # dz reuses z's buffer
            if dz is not None:
                dz = dz.to(mm_dtype)
        if row_mask is not None:
            m = row_mask[start:stop]
            loss_rows = loss_rows * m
            if dz is not None:
                dz.mul_(m[:, None].to(dz.dtype))
        loss += loss_rows.sum()
        if need_grad_h:
            if mm_dtype == grad_h.dtype:
                torch.mm(dz, w, out=grad_h[start:stop])
            else:  # fp32 math for a bf16/fp16 hidden (CPU), or a hidden/weight dtype mix: cast the result
                grad_h[start:stop] = torch.mm(dz, w)
        if need_grad_w:
            grad_w += _mm_fp32(dz.T, h_c)
        del z, dz
    return loss, grad_h, grad_w


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd glue: forward does all the work (see module docstring); backward scales by grad_output."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        softcap: float | None,
        ignore_index: int,
        chunk_size: int,
        need_grad_h: bool,
        need_grad_w: bool,
        static_shapes: bool = False,
    ) -> torch.Tensor:
        h2d = hidden.reshape(-1, hidden.shape[-1])
        mask = None
        if static_shapes:  # score every row, weight ignored ones by 0: no data-dependent shape, no host sync
            flat = labels.reshape(-1)
            keep = flat != ignore_index
            mask = keep.float()
            kept, all_kept, h = None, True, h2d
            y = torch.where(keep, flat, torch.zeros_like(flat)).long()
        else:
            kept = _kept_rows(labels, weight.shape[0], ignore_index)
            all_kept = kept.numel() == h2d.shape[0]
            h = h2d if all_kept else h2d.index_select(0, kept)
            y = labels.reshape(-1)[kept].long() if not all_kept else labels.reshape(-1).long()
        loss, grad_h, grad_w = _chunked_forward(h, weight, y, softcap, chunk_size, need_grad_h, need_grad_w,
                                                row_mask=mask)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)  # halve what is held until backward
        ctx.hidden_shape, ctx.hidden_dtype, ctx.all_kept = hidden.shape, hidden.dtype, all_kept
        ctx.save_for_backward(grad_h, grad_w, None if all_kept else kept)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_h, grad_w, kept = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            if ctx.all_kept:
                grad_hidden = (grad_h * grad_output).reshape(ctx.hidden_shape)
            else:
                n_rows, width = ctx.hidden_shape.numel() // ctx.hidden_shape[-1], ctx.hidden_shape[-1]
                grad_hidden = grad_output.new_zeros((n_rows, width), dtype=ctx.hidden_dtype)
                if kept.numel() > 0:
                    grad_hidden.index_copy_(0, kept, (grad_h * grad_output).to(ctx.hidden_dtype))
                grad_hidden = grad_hidden.reshape(ctx.hidden_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_w * grad_output
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    static_shapes: bool = False,
) -> torch.Tensor:
    """Summed cross-entropy of ``softcap(hidden @ weight.T)`` against labels, computed chunk by chunk.

    Equals ``linear_cross_entropy_reference`` (to fp32 rounding) without ever holding more than one chunk of
    logits; gradients for ``hidden`` (and ``weight`` when it requires grad) are exact and computed during the
    forward pass.

    Args:
        hidden: final hidden states, ``(tokens, hidden)`` or ``(batch, seq, hidden)``; bf16, fp16 or fp32, any
            strides. Its gradient comes back in its own dtype.
        weight: lm_head / tied embedding weight, ``(vocab, hidden)``. The matmuls run in this dtype (hidden is
            cast to it) with fp32 results.
        labels: integer target ids with hidden's leading shape, already shifted by the caller.
        softcap: ``c`` in ``c * tanh(logits / c)`` (Gemma 4: ``final_logit_softcapping`` = 30.0), or None.
        ignore_index: label value marking rows that are skipped entirely (no matmul, zero gradient).
        chunk_size: rows per chunk; None picks ``default_chunk_size(vocab, device)`` (512 rows at V = 262,144
            on CUDA, i.e. 512 MiB of fp32 logits).
        static_shapes: score every row and weight ignored rows by 0 instead of dropping them: no host sync and
            no data-dependent shape, as CUDA-graph capture needs. Labels are then NOT range-checked here (the
            caller checks them on the host); ignored rows cost their share of the lm_head matmuls.

    Returns:
        fp32 scalar: the SUM of per-token losses over kept rows (0.0 if every row is ignored); divide by the
        number of kept tokens for the mean.

    Raises:
        ConfigError: mismatched shapes/devices, bad arguments, or a label outside ``[0, vocab)`` (the message
            names the value, its position and the vocab size).
        KernelUnavailableError: ``ELEMENTWISE_BACKEND`` is "triton" but Triton is not installed.

    Example:
        >>> h = model.model(input_ids).last_hidden_state[:, :-1]            # (B, T-1, H)
        >>> loss_sum = linear_cross_entropy(h, model.lm_head.weight, input_ids[:, 1:], softcap=30.0)
        >>> (loss_sum / (input_ids[:, 1:] != -100).sum()).backward()
    """
    if FORCE_REFERENCE:
        return linear_cross_entropy_reference(hidden, weight, labels, softcap=softcap, ignore_index=ignore_index)
    _check_inputs(hidden, weight, labels, softcap, chunk_size)
    grad_enabled = torch.is_grad_enabled()
    need_grad_h = grad_enabled and hidden.requires_grad
    need_grad_w = grad_enabled and weight.requires_grad
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], hidden.device)
    softcap = float(softcap) if softcap is not None else None
    return LinearCrossEntropyFunction.apply(
        hidden, weight, labels, softcap, int(ignore_index), chunk_size, need_grad_h, need_grad_w, bool(static_shapes)
    )
