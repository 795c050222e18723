"""Batching: right-pad to the longest sample and shift labels into next-token targets."""

from __future__ import annotations

import torch

from slimtune.data.tokenize import IGNORE_INDEX, Example


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into a batch.

    Returns:
        input_ids (B, T), attention_mask (B, T) and targets (B, T) where targets[:, t] is the label of token
        t+1 (IGNORE_INDEX at padding, at the last position and wherever the label was masked). Right padding
        keeps every real token's position ids and causal context identical to running it alone.
    """
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
    for key in examples[0].extras:
        batch[key] = torch.cat([e.extras[key] for e in examples])
    return batch


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Number of tokens that contribute to the loss in this batch."""
    return int((batch["targets"] != IGNORE_INDEX).sum())
