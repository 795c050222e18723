"""A training step's loss and gradient norm, read back to the host without stalling the GPU.

Why: reading a device number (`float(loss)`) waits for every kernel queued before it. A captured step (CUDA graphs)
is one launch, so after such a wait the GPU idles while the host collates the next batch, gathers its offloaded
embedding rows and launches the next graph: on an H200, E2B QLoRA at 2K spent 14 of its 126 ms per step that way
(BENCHMARKS.md, session 11, call T). Instead the copy to pinned host memory is queued right behind the step, and
the training loop waits for it only after it has launched the next step (slimtune.train.loop), so the host's work
overlaps the GPU's. The copy also has to happen there: the next replay overwrites the graph's output tensors.
"""

from __future__ import annotations

import torch


class StepValues:
    """(loss, grad norm) of one step on their way to the host; `wait()` returns them as floats."""

    def __init__(self, host, ready: torch.cuda.Event | None) -> None:
        self.host, self.ready = host, ready

    def wait(self) -> tuple[float, float]:
        if self.ready is not None:
            self.ready.synchronize()  # this step's work and the copy after it have finished; later steps may run
        return float(self.host[0]), float(self.host[1])


def read_back(loss, grad_norm, device: torch.device) -> StepValues:
    """Queue the copy of a step's loss and grad norm (device tensors, or floats already on the host) behind the
    step's work and mark when it is done. Nothing waits here. Off CUDA the numbers are read at once."""
    if device.type != "cuda":
        return StepValues((float(loss), float(grad_norm)), None)
    if isinstance(loss, torch.Tensor):
        pair = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        host = torch.empty(2, dtype=torch.float32, pin_memory=True)
        host.copy_(pair, non_blocking=True)
    else:  # the eager step's numbers are host floats already; the event still times the step's last kernels
        host = (float(loss), float(grad_norm))
    ready = torch.cuda.Event()
    ready.record()
    return StepValues(host, ready)
