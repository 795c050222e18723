"""Sums over the ranks of a data-parallel job for captured steps (CUDA graphs without the DDP wrapper).

The graph sums the gradients itself (one NCCL all-reduce of a flat buffer); the host sums the numbers it needs
(token counts, the widest batch) through a gloo group, so they do not wait for the GPU's queued work. See
slimtune.train.distributed for why captured steps do without DistributedDataParallel.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


class RankSum:
    """Sums over the ranks of a data-parallel job for the captured step (slimtune.train.distributed's docstring).

    `sum_(tensors)` sums device tensors in place through the default group, in one all-reduce of a flat buffer
    (NCCL on GPUs, whose all-reduce a CUDA graph can capture); `host(values)` sums numbers through a CPU (gloo)
    group, so counting a step's tokens does not wait for the GPU. Built on every rank at the same point (creating a
    group is a collective).
    """

    def __init__(self, device: torch.device) -> None:
        self.world_size = dist.get_world_size()
        self.host_group, self.sum_device = None, torch.device("cpu")
        if dist.get_backend() == "nccl":
            try:
                self.host_group = dist.new_group(backend="gloo")
            except Exception as exc:  # noqa: BLE001 - e.g. gloo cannot resolve this host's name in a container
                # the numbers then travel through NCCL: correct, but each sum waits for the GPU's queued work
                self.sum_device = device
                warnings.warn(f"distributed: no gloo group for host-side sums ({exc}); using NCCL for them (each "
                              "step then waits for the GPU once more)", stacklevel=2)
        self.checked = False

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum every tensor over ranks in place (one flat all-reduce)."""
        _through_flat(tensors, dist.all_reduce)

    def host(self, values: list[float]) -> list[float]:
        return self._reduce([float(v) for v in values], dist.ReduceOp.SUM)

    def host_max(self, value: float) -> float:
        return self._reduce([float(value)], dist.ReduceOp.MAX)[0]

    def _reduce(self, values: list[float], op) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.sum_device)
        dist.all_reduce(t, op=op, group=self.host_group)
        return t.tolist()

    def broadcast_from_first(self, tensors: list[torch.Tensor]) -> None:
        """Give every rank rank 0's values (one flat broadcast): what DDP does when it wraps a model."""
        _through_flat(tensors, lambda flat: dist.broadcast(flat, src=0))

    def check_same(self, n_tensors: int, n_values: int) -> None:
        """Raise unless every rank reduces the same number of gradients and values (else the flat all-reduce
        would mix up tensors or hang). Call at the same step on every rank."""
        total = self.host([n_tensors, n_values])
        if total != [float(self.world_size * n_tensors), float(self.world_size * n_values)]:
            raise RuntimeError(f"ranks disagree on which LoRA parameters got gradients (this rank: {n_tensors} "
                               f"tensors, {n_values} values; summed over ranks: {total}). Train with "
                               "cuda_graphs: false, where DDP handles parameters a rank did not use.")
        self.checked = True


def _through_flat(tensors: list[torch.Tensor], collective) -> None:
    """Run `collective` (in place) on one flat copy of `tensors`, then write the result back into them: one launch
    instead of one per tensor. The copy is fp32 (fp64 when any tensor is), so 16-bit values pass exactly."""
    if not tensors:
        return
    wide = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = torch.cat([t.reshape(-1).to(wide) for t in tensors])
    collective(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))
