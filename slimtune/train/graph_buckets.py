"""CUDA-graph training steps for batches of any length: one captured step per length bucket.

A captured step needs one shape. Packed runs have it (every sequence is max_seq_length long). Unpacked runs pad
each batch only to its longest sample, so their widths vary from step to step; padding them all to
max_seq_length would spend most of a short-sample dataset's compute on pads. Instead each batch is right-padded
to the next *bucket*: 128·2^k or 192·2^k tokens (at most a third of a batch is bucket padding), capped at
max_seq_length. Each bucket gets its own `GraphedTrainStep` the first time a batch of that width arrives (its
warm-up steps run eagerly, then it captures), so a run with widths up to 2,048 captures at most 9 steps.
(H200, E2B QLoRA, samples up to 2K: eager 1,877 real tok/s, buckets 6.9-7.9K over a 60-step run's second half,
their first captures included; packed 17K. BENCHMARKS.md, session 10.)

What the buckets share, so that memory does not grow with their number:

* one graph memory pool (``torch.cuda.graph_pool_handle()``). Graphs replay one at a time on one stream, and
  what one graph leaves alive (its outputs, its found_inf) is never freed, so a later capture only reuses memory
  that is dead between replays. One caveat makes that enough: another bucket's replay may overwrite a step's
  outputs (loss, grad norm), so they are read before the next step runs (the training loop does);
* the gradients: every step leaves them allocated and zeroed (``shared_grads``), so whichever graph runs next
  adds its backward onto zeros. Setting them to None would free memory an earlier graph still writes.

Per bucket only its static inputs are extra: the token ids, and on E2B/E4B the per-layer-embedding rows the graph
reads (2K tokens: 36 MB on E2B; all buckets together about twice the largest).

``packed=True`` keeps the single fixed-width step that packed runs always used (its own pool, gradients owned by
the graph), through the same interface.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from slimtune.data.collate import pad_batch_to
from slimtune.train.cuda_graph import GraphedTrainStep

SMALLEST_BUCKET = 128


def bucket_widths(max_len: int) -> list[int]:
    """The widths batches are padded to: 128, 192, 256, 384, 512, 768, ... below max_len, then max_len itself."""
    widths, base = [], SMALLEST_BUCKET
    while base < max_len:
        widths += [w for w in (base, base * 3 // 2) if w < max_len]
        base *= 2
    return widths + [max_len]


def bucket_for(width: int, max_len: int) -> int:
    """The smallest bucket holding `width` tokens.

    Raises:
        ValueError: width is over max_len (tokenization cuts samples to max_len, so this is a bug upstream).
    """
    if width > max_len:
        raise ValueError(f"a batch of {width} tokens is wider than max_seq_length={max_len}")
    return next(w for w in bucket_widths(max_len) if w >= width)


class GraphSteps:
    """``steps(micro_batches) -> (loss, grad_norm, n_targets, padded_tokens)``: one training step on a window of
    CPU micro-batches (one per gradient-accumulation step), replayed from a CUDA graph once its bucket has warmed up.

    Args:
        max_seq_length: the widest batch (and the packed width).
        pad_id: token id of the padding.
        packed: every batch is padded to max_seq_length (packed runs: one step, as before buckets existed).
        batch_size: rows every batch is padded to (the run's batch_size: an epoch's last batch may be smaller).
        The rest: as `GraphedTrainStep`. rank_sum (data parallelism): every rank pads to the bucket of the widest
        batch on ANY rank, so all ranks warm up, capture and replay the same bucket's graph at the same step.
        NCCL requires that: a captured collective is collective across ranks, each launching the graph of that
        same capture (NCCL user guide, "Using NCCL with CUDA Graphs").
    """

    def __init__(self, model: nn.Module, params: list[nn.Parameter], optimizer, *, device: torch.device,
                 dtype: torch.dtype, max_grad_norm: float, capture: bool, max_seq_length: int, pad_id: int,
                 packed: bool, batch_size: int, rank_sum=None) -> None:
        self.model, self.params, self.optimizer = model, params, optimizer
        self.device, self.dtype, self.max_grad_norm, self.capture = device, dtype, max_grad_norm, capture
        self.max_seq_length, self.pad_id, self.packed = max_seq_length, pad_id, packed
        self.rows, self.rank_sum = batch_size, rank_sum
        self.pool = torch.cuda.graph_pool_handle() if capture and not packed else None
        self.warmup_stream = torch.cuda.Stream(device) if capture else None  # one for every bucket's warm-up
        self.steps: dict[int, GraphedTrainStep] = {}
        self._last: GraphedTrainStep | None = None

    def __call__(self, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        widest = max(b["input_ids"].shape[1] for b in batches)
        if self.rank_sum is not None and not self.packed:
            widest = int(self.rank_sum.host_max(widest))
        width = self.max_seq_length if self.packed else bucket_for(widest, self.max_seq_length)
        # an epoch's last batch may hold fewer samples: rows of pads (no targets) keep the captured shape
        fixed = [pad_batch_to(b, width, self.pad_id, rows=self.rows) for b in batches]
        step = self.steps.get(width)
        if step is None:
            # Two eager warm-ups for the first bucket (the optimizer creates its state, libraries initialise); one
            # per later bucket is enough for what a new shape needs (kernels compiled for it). An eager E2B 2K
            # step costs ~0.78 s against 0.12 s replayed, and a 2K run has up to 9 buckets.
            step = GraphedTrainStep(self.model, self.params, self.optimizer, fixed[0], device=self.device,
                                    dtype=self.dtype, max_grad_norm=self.max_grad_norm, capture=self.capture,
                                    warmup=1 if self.steps else 2,
                                    pool=self.pool, shared_grads=not self.packed, warmup_stream=self.warmup_stream,
                                    rank_sum=self.rank_sum)
            self.steps[width] = step
        self._last = step
        loss, norm, n_targets = step(fixed if len(fixed) > 1 else fixed[0])
        return loss, norm, n_targets, sum(f["input_ids"].numel() for f in fixed)

    @property
    def captured(self) -> int:
        """How many graphs have been captured so far (all buckets)."""
        return sum(len(s.graphs) for s in self.steps.values())

    @contextlib.contextmanager
    def paused(self):
        """Other forwards (evaluation, generation) in between steps, with the model's per-call paths."""
        with self._last.paused() if self._last is not None else contextlib.nullcontext():
            yield

    def close(self) -> None:
        """Leave graph mode (every bucket's step)."""
        for step in self.steps.values():
            step.close()
        self.steps.clear()
