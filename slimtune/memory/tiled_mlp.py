"""Sequence-tiled MLP: the decoder MLP runs over chunks of tokens and keeps only its input for backward.

Gemma 4's MLP is `down(gelu(gate(x)) · up(x))` with an intermediate 4–12× the hidden size, and autograd keeps
gate(x), gelu(·), up(x) and their product for backward: about 4·T·I values per layer, the biggest activations
inside a checkpointed layer's recompute at long context. The MLP is per token, so running it over chunks of
`chunk_size` tokens gives the same numbers; the custom autograd Function below saves only `x` and recomputes each
chunk in backward, so a full-length intermediate never exists. The price is one more MLP forward per step.

The wrapper reuses the original MLP's own forward (no modeling code is copied) and registers the original's
children under their own names, so parameter names, state-dict keys and LoRA layers are unchanged.
LoRA dropout inside the MLP is supported: the RNG state at the start of the forward is replayed in backward and
chunks are recomputed in the same order, so every chunk draws the masks it drew in forward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from slimtune.errors import ConfigError


def _autocast_state(device_type: str):
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(device_type: str, dtype):
    # Backward runs outside the forward's autocast: put back exactly the forward's state, off included.
    if dtype is None:
        return torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type) \
            else contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


class _TiledMLPFunction(torch.autograd.Function):
    """y = cat(mlp(x[chunk]) for chunk); backward recomputes chunk by chunk. Only x is saved.

    Trainable parameters (the LoRA weights) are inputs so their gradients come back through autograd once, summed
    over chunks (a nested backward into `.grad` would fire gradient hooks once per chunk, which DDP refuses).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, wrapper: "SequenceTiledMLP", *params: torch.Tensor) -> torch.Tensor:
        ctx.wrapper, ctx.params = wrapper, params
        ctx.autocast = {d: _autocast_state(d) for d in {x.device.type, "cpu"}}
        ctx.rng = wrapper.rng_state(x.device)
        flat = x.reshape(-1, x.shape[-1])
        out = None
        with torch.no_grad():
            for start, stop in wrapper.chunks(flat.shape[0]):
                y = wrapper.run_mlp(flat[start:stop])
                if out is None:
                    out = y.new_empty((flat.shape[0], y.shape[-1]))
                out[start:stop] = y
        ctx.save_for_backward(x)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        wrapper = ctx.wrapper
        params = list(ctx.params)
        flat = x.detach().reshape(-1, x.shape[-1])
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        with contextlib.ExitStack() as stack:
            stack.enter_context(wrapper.replay_rng(x.device, ctx.rng))
            for device_type, dtype in ctx.autocast.items():
                stack.enter_context(_autocast(device_type, dtype))
            for start, stop in wrapper.chunks(flat.shape[0]):
                chunk = flat[start:stop].requires_grad_(grad_x is not None)
                with torch.enable_grad():
                    y = wrapper.run_mlp(chunk)
                wanted = ([chunk] if grad_x is not None else []) + params
                grads = torch.autograd.grad(y, wanted, grad_flat[start:stop], allow_unused=True)
                if grad_x is not None:
                    grad_x[start:stop] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
        grad_x = grad_x.reshape(x.shape) if grad_x is not None else None
        return (grad_x, None, *grad_params)


@torch.compiler.disable  # compiled decoder layers call it eagerly: its backward runs nested autograd
def _tiled(x: torch.Tensor, wrapper: "SequenceTiledMLP", *params: torch.Tensor) -> torch.Tensor:
    return _TiledMLPFunction.apply(x, wrapper, *params)


class SequenceTiledMLP(nn.Module):
    """Drop-in for a decoder MLP that runs it over `chunk_size`-token chunks (see the module docstring).

    Args:
        mlp: the MLP to tile (its forward must treat tokens independently, as Gemma 4's MLP does).
        chunk_size: tokens per chunk (all batch rows flattened together).
    """

    def __init__(self, mlp: nn.Module, chunk_size: int) -> None:
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ConfigError(f"mlp_chunk_size must be a positive integer (got {chunk_size!r})")
        self.chunk_size = chunk_size
        for name, child in mlp.named_children():  # same names: parameter and state-dict keys stay the same
            self.add_module(name, child)
        # The original module, unregistered (its children are ours): plain attributes (config, sizes) are read
        # through it. Its class's forward runs on each chunk with `self` as the module, so children swapped in
        # later (LoRA injected after tiling) are the ones used.
        object.__setattr__(self, "_inner", mlp)
        object.__setattr__(self, "_mlp_forward", type(mlp).forward)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_inner"), name)

    def run_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The original MLP's forward on `x`, with this module's (current) children."""
        return self._mlp_forward(self, x)

    def chunks(self, n: int):
        return [(s, min(s + self.chunk_size, n)) for s in range(0, n, self.chunk_size)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def uses_dropout(self) -> bool:
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())

    def rng_state(self, device: torch.device):
        """The RNG state dropout will start from (None when no dropout is active: nothing to replay)."""
        if not self.uses_dropout():
            return None
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    @contextlib.contextmanager
    def replay_rng(self, device: torch.device, state):
        if state is None:
            yield
            return
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)
            yield

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() <= self.chunk_size:
            return self.run_mlp(x)  # one chunk: nothing to save by tiling
        return _tiled(x, self, *self.trainable_parameters())

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"


def tile_decoder_mlps(model: nn.Module, chunk_size: int) -> int:
    """Swap every text decoder layer's MLP for a SequenceTiledMLP; returns how many were swapped.

    Only the dense MLP (`layer.mlp`) is tiled; 26B-A4B's experts run beside it unchanged.
    """
    n = 0
    for layer in model.get_decoder().layers:
        mlp = layer.mlp
        if isinstance(mlp, SequenceTiledMLP):
            mlp.chunk_size = chunk_size
        else:
            layer.mlp = SequenceTiledMLP(mlp, chunk_size)
        n += 1
    return n
