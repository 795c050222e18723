"""Activation offload: the inputs each checkpointed decoder layer keeps for its recompute live in host memory.

With non-reentrant checkpointing, all a decoder layer keeps between forward and backward is what its checkpoint
saved: the positional inputs (hidden states (B, T, H) and, on E2B/E4B, the layer's per-layer input). Summed over
L layers that is L·T·H values — at long context the largest thing left on the GPU. Everything else the layer
holds (position embeddings shared by all layers, the mask, the shared K/V dict) is passed by keyword and kept by
Python reference, small and shared across layers, so it stays where it is.

How: the checkpoint function transformers calls for each layer (`_gradient_checkpointing_func`, the documented
slot of GradientCheckpointingLayer) is wrapped so it runs under `saved_tensors_hooks`. The checkpoint saves its
inputs *before* entering its own hooks, so ours see exactly those inputs and nothing inside the layer.

On CUDA the device→host copy runs on a side stream (ordered after the producing kernels by a stream wait, never a
host sync), into pinned memory from torch's caching host allocator (which keeps a block alive until the copies
recorded on it have finished). `record_stream` keeps the GPU block from being reused before the copy has read it.
In backward, fetching layer i's inputs starts the host→device copy of layer i−1's (the next layer backward
reaches), so the copy overlaps layer i's recompute and backward; the compute stream waits on an event only when
it actually needs the tensor. On CPU the "host copy" is a clone, so CPU tests run the same bookkeeping.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from slimtune.errors import ConfigError

DEFAULT_MIN_BYTES = 256 * 1024
"""Tensors smaller than this stay where they are: a copy's launch and event cost more than the memory saved."""


class _Packed:
    """One offloaded tensor: its host copy, where it came from, and (while prefetched) its way back."""

    __slots__ = ("host", "device", "group", "on_device", "ready", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, group: int) -> None:
        self.host, self.device, self.group = host, device, group
        self.on_device: torch.Tensor | None = None
        self.ready = None  # CUDA event recorded after the prefetch copy


class ActivationOffloader:
    """Moves tensors saved for backward to host memory and brings them back, one checkpointed layer at a time.

    Args:
        min_bytes: smaller tensors are left alone.

    Counters (for tests and benchmarks): `offloaded_bytes`/`offloaded_tensors` (device→host), `fetched_bytes`
    (host→device), `prefetched_tensors` (fetched ahead of their unpack).
    """

    def __init__(self, min_bytes: int = DEFAULT_MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self.offloaded_bytes = self.offloaded_tensors = 0
        self.fetched_bytes = self.prefetched_tensors = 0
        self._group = 0
        # group id → weak refs to its packed tensors; weak so an abandoned graph frees its host copies.
        self._groups: dict[int, list[weakref.ref]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    # -- forward ---------------------------------------------------------------------------------------------

    def new_group(self) -> int:
        """Start the group of the next checkpointed layer call (the unit of prefetch)."""
        self._group += 1
        if len(self._groups) > 4096:  # graphs that never ran backward (errors, probes): forget their entries
            self._groups = {g: refs for g, refs in self._groups.items() if any(r() is not None for r in refs)}
        return self._group

    def worth_offloading(self, t: torch.Tensor) -> bool:
        """Activations only: big enough, floating point, never a parameter or a view of one."""
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return False
        if not t.is_floating_point() or t.layout != torch.strided or t.numel() == 0:
            return False  # ids/masks, sparse, and torch<2.4's empty placeholder that checkpoint saves
        return t.numel() * t.element_size() >= self.min_bytes

    def pack(self, t: torch.Tensor):
        if not self.worth_offloading(t):
            return t
        host = self._to_host(t)
        packed = _Packed(host, t.device, self._group)
        self._groups.setdefault(self._group, []).append(weakref.ref(packed))
        self.offloaded_bytes += t.numel() * t.element_size()
        self.offloaded_tensors += 1
        return packed

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "cuda":
            return t.detach().clone()  # CPU: same path, the copy is the "host" one
        compute = torch.cuda.current_stream(t.device)
        side = self._side_stream(t.device)
        side.wait_stream(compute)  # the kernels that produce t are queued on compute: copy after them
        with torch.cuda.stream(side):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
        t.record_stream(side)  # t's block must not be handed out again before the copy has read it
        return host

    # -- backward --------------------------------------------------------------------------------------------

    def unpack(self, packed):
        if not isinstance(packed, _Packed):
            return packed
        if packed.on_device is None:  # not prefetched: the first layer backward reaches, or a second backward
            self._prefetch(packed.group, ahead=False)  # this layer's other tensors too, in one go
            if packed.on_device is None:
                self._to_device(packed)
        self._prefetch(packed.group - 1, ahead=True)  # backward reaches the previous layer next: copy it now
        out, packed.on_device = packed.on_device, None  # hand it over: recompute frees it when done
        if packed.device.type == "cuda":
            torch.cuda.current_stream(packed.device).wait_event(packed.ready)
            out.record_stream(torch.cuda.current_stream(packed.device))  # allocated on the side stream
        return out

    def _prefetch(self, group: int, *, ahead: bool) -> None:
        refs = self._groups.pop(group, None)
        for ref in refs or ():
            packed = ref()
            if packed is not None and packed.on_device is None:
                self._to_device(packed)
                self.prefetched_tensors += ahead

    def _to_device(self, packed: _Packed) -> None:
        self.fetched_bytes += packed.host.numel() * packed.host.element_size()
        if packed.device.type != "cuda":
            packed.on_device = packed.host
            return
        side = self._side_stream(packed.device)
        # Allocated on the side stream (its own pool, reused by the next prefetches); ordered after this
        # tensor's device→host copy because both copies run on that same stream.
        with torch.cuda.stream(side):
            packed.on_device = packed.host.to(packed.device, non_blocking=True)
            packed.ready = torch.cuda.Event()
            packed.ready.record(side)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def reset_counters(self) -> None:
        self.offloaded_bytes = self.offloaded_tensors = self.fetched_bytes = self.prefetched_tensors = 0


class _OffloadingCheckpoint:
    """Stands in for a layer's checkpoint function: the same call, with the offload hooks around it."""

    def __init__(self, checkpoint_fn, offloader: ActivationOffloader) -> None:
        self.checkpoint_fn, self.offloader = checkpoint_fn, offloader

    def __call__(self, *args, **kwargs):
        self.offloader.new_group()
        with torch.autograd.graph.saved_tensors_hooks(self.offloader.pack, self.offloader.unpack):
            return self.checkpoint_fn(*args, **kwargs)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layers (Gemma4ForCausalLM and Gemma4ForConditionalGeneration alike)."""
    return model.get_decoder().layers


def enable_activation_offload(model: nn.Module, *, min_bytes: int = DEFAULT_MIN_BYTES) -> ActivationOffloader:
    """Offload the checkpointed inputs of every text decoder layer; call after checkpointing is enabled.

    Enabling checkpointing again afterwards installs a fresh checkpoint function and so turns this off.

    Raises:
        ConfigError: the layers are not checkpointed (there would be no layer boundary to offload).
    """
    layers = decoder_layers(model)
    if not all(getattr(layer, "gradient_checkpointing", False) for layer in layers):
        raise ConfigError("activation_offload moves the inputs that gradient checkpointing keeps per decoder layer "
                          "to host memory, so it needs gradient_checkpointing on; enable it or turn "
                          "activation_offload off.")
    existing = getattr(model, "_slimtune_offloader", None)
    offloader = existing if existing is not None else ActivationOffloader(min_bytes)
    offloader.min_bytes = min_bytes
    for layer in layers:
        fn = layer._gradient_checkpointing_func
        if isinstance(fn, _OffloadingCheckpoint):
            fn = fn.checkpoint_fn
        layer._gradient_checkpointing_func = _OffloadingCheckpoint(fn, offloader)
    model._slimtune_offloader = offloader
    return offloader


def activation_offloader(model: nn.Module) -> ActivationOffloader | None:
    """The model's offloader (its counters), or None when offload is off."""
    return getattr(model, "_slimtune_offloader", None)
