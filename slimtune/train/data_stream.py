"""The shuffled sample stream of a run and its split over data-parallel ranks.

Every rank walks the SAME global stream (the order is a pure function of seed and epoch) and keeps only its
own share of each global micro-batch, so the ranks never see a sample twice and the position a checkpoint
stores, (epoch, index in global samples), means the same thing whatever the number of processes: a run saved
by 2 processes resumes in 1, or in 4, at the same sample.
"""

from __future__ import annotations

import math

import torch

from slimtune.data.collate import collate
from slimtune.data.tokenize import IGNORE_INDEX, Example
from slimtune.errors import ConfigError


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Shuffled sample order of one epoch; a pure function of (seed, epoch) so runs and resumes repeat it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_share(picked: list, rank: int, world_size: int) -> list:
    """This rank's part of a global micro-batch: every world_size-th item from position `rank`.

    Strided rather than contiguous so a ragged last batch leaves at most one sample of difference between
    ranks (and the shares of all ranks are disjoint and cover `picked` exactly).
    """
    return picked[rank::world_size]


class DataStream:
    """The endless stream of (epoch, micro-batch) in shuffled order, epoch after epoch.

    Each call takes the next `batch_size * world_size` samples of the global order (fewer at the end of an
    epoch) and returns this rank's share, which may be empty when the last global batch is smaller than the
    number of ranks. `index` counts GLOBAL samples into the current epoch's order, so (epoch, index) is what a
    checkpoint stores and it does not depend on the number of processes.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.index = 0, 0
        self._order = epoch_order(len(examples), seed, 0)

    def next_indices(self) -> tuple[int, list[int]]:
        """(epoch, indices into `examples` of this rank's share of the next global micro-batch)."""
        epoch = self.epoch
        picked = self._order[self.index : self.index + self.batch_size * self.world_size]
        self.index += len(picked)
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = epoch_order(len(self.examples), self.seed, self.epoch)
        return epoch, rank_share(picked, self.rank, self.world_size)

    def next(self) -> tuple[int, list[Example]]:
        """(epoch, this rank's micro-batch); the last one of an epoch may be smaller, or empty on some ranks."""
        epoch, picked = self.next_indices()
        return epoch, [self.examples[j] for j in picked]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n_examples": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state["n_examples"] != len(self.examples):
            raise ConfigError(f"the checkpoint was written for {state['n_examples']} training samples but the "
                              f"data now gives {len(self.examples)}; the dataset changed, so the run cannot be "
                              "resumed exactly. Restore the original data or start a new run.")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = epoch_order(len(self.examples), self.seed, self.epoch)


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    """Optimizer steps in one pass over the data with a global micro-batch of batch_size × world_size."""
    return max(1, math.ceil(math.ceil(n_examples / (batch_size * world_size)) / grad_accum))


def dummy_example(pad_id: int) -> Example:
    """A two-token sample with every target ignored: it contributes exactly zero loss and zero gradient.

    A rank whose share of the ragged last batch is empty still runs forward/backward on it, so it takes part in
    the gradient collectives (DDP all-reduce, FSDP2 all-gather / reduce-scatter) instead of leaving the other
    ranks waiting. Its attention mask is real (1s): a fully masked row would give NaN attention, and 0 · NaN
    is NaN.
    """
    return Example([pad_id, pad_id], [IGNORE_INDEX, IGNORE_INDEX])


def collate_share(share: list[Example], pad_id: int) -> tuple[dict, int]:
    """(batch, number of real samples): the share collated, or the dummy batch when the share is empty."""
    if not share:
        return collate([dummy_example(pad_id)], pad_id), 0
    return collate(share, pad_id), len(share)
