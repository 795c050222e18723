"""The ground truth for slimtune.kernels.linear_cross_entropy: plain-torch lm_head + softcapped cross-entropy with
full fp32 logits, and the argument checks both share (shapes, devices, label range with the offending position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimtune.errors import ConfigError

__all__ = ["linear_cross_entropy_reference"]


def _check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    softcap: float | None,
    chunk_size: int | None,
) -> None:
    """Raises one ConfigError listing every shape/dtype/argument problem found."""
    problems = []
    if hidden.dim() < 2 or not hidden.is_floating_point():
        problems.append(
            f"hidden must be a floating (tokens, hidden) or (batch, seq, hidden) tensor, got {hidden.dtype} "
            f"{tuple(hidden.shape)}"
        )
    if weight.dim() != 2 or not weight.is_floating_point():
        problems.append(f"weight must be a floating (vocab, hidden) matrix, got {weight.dtype} {tuple(weight.shape)}")
    elif hidden.dim() >= 2 and weight.shape[1] != hidden.shape[-1]:
        problems.append(
            f"weight is {tuple(weight.shape)} but hidden's last dim is {hidden.shape[-1]}: "
            f"expected (vocab, {hidden.shape[-1]})"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        problems.append(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if hidden.dim() >= 2 and tuple(labels.shape) != tuple(hidden.shape[:-1]):
        problems.append(
            f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])} "
            "(shift the labels before calling)"
        )
    if not (hidden.device == weight.device == labels.device):
        problems.append(
            f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device}, {labels.device}"
        )
    if softcap is not None and not softcap > 0:
        problems.append(f"softcap must be None or > 0, got {softcap!r}")
    bad_chunk = isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    if chunk_size is not None and bad_chunk:
        problems.append(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    if problems:
        raise ConfigError("linear_cross_entropy: " + "; ".join(problems))


def _kept_rows(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Indices (into the flattened labels) of rows to score; raises ConfigError on an out-of-range label."""
    flat = labels.reshape(-1)
    kept = (flat != ignore_index).nonzero().squeeze(1)
    targets = flat[kept]
    if targets.numel() > 0:
        low, high = torch.stack(torch.aminmax(targets)).tolist()  # one device sync
        if low < 0 or high >= vocab_size:
            bad = kept[((targets < 0) | (targets >= vocab_size)).nonzero()[0, 0]]
            position = tuple(int(i) for i in torch.unravel_index(bad, labels.shape))
            raise ConfigError(
                f"labels{list(position)} = {int(flat[bad])} is out of range for vocab size {vocab_size}: "
                f"token ids must be in [0, {vocab_size}), or ignore_index={ignore_index} to skip a position. "
                "Check that the tokenizer matches the model's lm_head."
            )
    return kept


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Plain-torch lm_head + (softcapped) cross-entropy with full fp32 logits: the ground truth.

    Args:
        hidden: final hidden states, ``(tokens, hidden)`` or ``(batch, seq, hidden)``.
        weight: lm_head / tied embedding weight, ``(vocab, hidden)``.
        labels: target ids with hidden's leading shape, already shifted; ``ignore_index`` marks skipped rows.
        softcap: ``c`` in ``logits = c * tanh((hidden @ weight.T) / c)``; None for no softcap.
        ignore_index: label value whose rows contribute nothing.

    Returns:
        fp32 scalar: the SUM of per-token cross-entropy over kept rows (0.0 if none).

    Raises:
        ConfigError: mismatched shapes/devices, bad arguments or a label outside ``[0, vocab)``.

    Example:
        >>> loss = linear_cross_entropy_reference(h, model.lm_head.weight, labels, softcap=30.0)
    """
    _check_inputs(hidden, weight, labels, softcap, None)
    _kept_rows(labels, weight.shape[0], ignore_index)
    logits = hidden.reshape(-1, hidden.shape[-1]).float() @ weight.float().T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels.reshape(-1).long(), ignore_index=ignore_index, reduction="sum")
