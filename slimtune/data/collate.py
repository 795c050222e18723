"""Batching: right-pad to the longest sample and shift labels into next-token targets."""

from __future__ import annotations

import torch

from slimtune.data.tokenize import IGNORE_INDEX, Example

PACKED_KEY = "position_ids"  # extras key set by slimtune.data.packing.pack_examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into a batch.

    Returns:
        input_ids (B, T), attention_mask (B, T) and targets (B, T) where targets[:, t] is the label of token
        t+1 (IGNORE_INDEX at padding, at the last position and wherever the label was masked). Right padding
        keeps every real token's position ids and causal context identical to running it alone.

        Packed batches (any example with ``extras["position_ids"]``, from ``pack_examples``) instead return
        input_ids, position_ids (B, T), token_mask (B, T) and targets, and NO attention_mask: transformers only
        derives the per-document (block-diagonal) mask from position_ids when attention_mask is None
        (``masking_utils._preprocess_mask_arguments``); with a mask present every document would attend to the
        ones before it. Dropping the padding mask is exact under right padding: a real token never attends to
        a later position, so it never sees a pad. ``token_mask`` marks real tokens (use ``count_real_tokens``).
        Pad positions continue the row's last document (last position + 1, + 2, …): they form no extra
        document, so a batch whose rows each hold one document is still recognised as unpacked (sdpa keeps its
        is_causal fast path) and the attention kernels see no spurious document boundary.
    """
    if any(PACKED_KEY in e.extras for e in examples):
        return _collate_packed(examples, pad_id)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        targets[i, : n - 1] = torch.tensor(e.labels[1:])
    batch = {"input_ids": ids, "attention_mask": mask, "targets": targets}
    if any(e.extras for e in examples):  # multimodal: tower inputs padded to the longest, per-token ids to width
        from slimtune.data.multimodal import stack_extras

        batch.update(stack_extras(examples, width))
    return batch


def _collate_packed(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed batch (see ``collate``). Unpacked examples mixed in count as one document at positions 0..n-1."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    token_mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.empty((len(examples), width), dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        if set(e.extras) - {PACKED_KEY}:
            raise ValueError(f"packed batches are text-only; example {i} has {sorted(e.extras)}")
        pos = e.extras.get(PACKED_KEY, range(n))
        if len(pos) != n:
            raise ValueError(f"example {i}: {len(pos)} position ids for {n} tokens")
        ids[i, :n] = torch.tensor(e.input_ids)
        token_mask[i, :n] = 1
        positions[i, :n] = torch.as_tensor(list(pos), dtype=torch.long)
        positions[i, n:] = torch.arange(1, width - n + 1) + positions[i, n - 1]
        targets[i, : n - 1] = torch.tensor(e.labels[1:])
        # A document's first token must never be the target of the previous document's last token.
        # pack_examples already masks those labels; enforcing it here keeps hand-built packed examples exact too.
        starts = positions[i, 1:n] != positions[i, : n - 1] + 1  # token t+1 opens a new document
        targets[i, : n - 1][starts] = IGNORE_INDEX
    return {"input_ids": ids, "position_ids": positions, "token_mask": token_mask, "targets": targets}


def pad_batch_to(batch: dict[str, torch.Tensor], width: int, pad_id: int,
                 rows: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a text batch to `width` tokens and, with `rows`, append rows of pads up to that many (fixed
    shapes for CUDA-graph steps: an epoch's last batch may hold fewer samples); the loss is unchanged.

    Pads are ignored targets outside every mask; packed position ids continue the last document, as in
    ``collate``, and count 0, 1, ... in a row of pads. Raises ValueError for a batch wider than `width`, with more
    rows than `rows`, or with multimodal inputs.
    """
    have, n = batch["input_ids"].shape[1], batch["input_ids"].shape[0]
    if have > width:
        raise ValueError(f"batch is {have} tokens wide, more than the fixed width {width}")
    if rows is not None and n > rows:
        raise ValueError(f"batch has {n} rows, more than the fixed {rows}")
    extra = set(batch) - {"input_ids", "attention_mask", "targets", "position_ids", "token_mask"}
    if extra:
        raise ValueError(f"only text batches can be padded to a fixed width; this one has {sorted(extra)}")
    fill = {"input_ids": pad_id, "attention_mask": 0, "targets": IGNORE_INDEX, "token_mask": 0}
    out = dict(batch)
    if have < width:
        for key, t in batch.items():
            if key == "position_ids":
                tail = t[:, -1:] + torch.arange(1, width - have + 1)
            else:
                tail = torch.full((n, width - have), fill[key], dtype=t.dtype)
            out[key] = torch.cat([t, tail], dim=1)
    if rows is not None and n < rows:
        for key, t in out.items():
            if key == "position_ids":
                extra_rows = torch.arange(width, dtype=t.dtype).expand(rows - n, width)
            else:
                extra_rows = torch.full((rows - n, width), fill[key], dtype=t.dtype)
            out[key] = torch.cat([t, extra_rows], dim=0)
    return out


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Number of tokens that contribute to the loss in this batch."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def count_real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch, packed (``token_mask``) or not (``attention_mask``)."""
    return int(batch["token_mask" if "token_mask" in batch else "attention_mask"].sum())
