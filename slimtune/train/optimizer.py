"""The optimizer of a run: torch's AdamW, or bitsandbytes' 8-bit AdamW for a quarter of the state memory.

AdamW keeps two fp32 moments per trainable value (8 bytes); AdamW8bit stores them block-wise quantized to
uint8 (2 bytes plus one fp32 scale per 256-value block), which matters for high-rank LoRA or many target modules.
bitsandbytes keeps tensors under `min_8bit_size` (4096 values) in 32-bit: too small to be worth quantizing.
Its state_dict round-trips through torch.save/torch.load(weights_only=True), so checkpoints and --resume work.

bitsandbytes' step() calls torch.cuda.synchronize() after every parameter (for its paged state, which we never
use): on the H200 that was 531 device-wide syncs per 26B-A4B step, each draining the queue the host had built up
ahead of the GPU. `_adamw8bit_class` gives the same optimizer with a step that only queues its kernels.
"""

from __future__ import annotations

import functools

import torch

from slimtune.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(params, *, name: str = "adamw", lr: float, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Build the named optimizer over `params`.

    Args:
        fused: torch AdamW's fused kernel (None = torch's default); ignored by adamw8bit.
        capturable: AdamW that can be captured in a CUDA graph (slimtune.train.cuda_graph): step counts on the
            device and the learning rate a device tensor, so a scheduler's new value reaches every replay.
            Ignored by adamw8bit, which steps eagerly between the graphs' replays.

    Raises:
        ConfigError: unknown name, or adamw8bit without bitsandbytes.
    """
    if name == "adamw":
        extra = {} if fused is None else {"fused": fused}
        if capturable:
            params = list(params)
            device = params[0]["params"][0].device if isinstance(params[0], dict) else params[0].device
            extra.update(capturable=True)
            lr = torch.tensor(float(lr), device=device)  # a float would be baked into the captured kernels
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, **extra)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes); use "
                              "optimizer adamw without it.") from exc
        # weight_decay passed explicitly: bitsandbytes' own default (1e-2) differs from ours.
        return _adamw8bit_class(bnb)(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {name!r})")


_BNB_METHODS = ("check_overrides", "to_gpu", "init_state", "update_step")
"""The bitsandbytes optimizer methods our step calls; a release without them gets bitsandbytes' own step."""


@functools.cache
def _adamw8bit_class(bnb):
    """bitsandbytes' AdamW8bit with a step that does not synchronize the device after each parameter.

    Same state, same kernels and the same state_dict (checkpoints move between the two); the update kernels run on
    the current stream in parameter order, so nothing reads a state before its update has been queued.
    """
    base = bnb.optim.AdamW8bit
    if not all(callable(getattr(base, name, None)) for name in _BNB_METHODS):
        return base

    class AdamW8bit(base):
        @torch.no_grad()
        def step(self, closure=None):
            if getattr(self, "is_paged", False) or not hasattr(self, "initialized"):
                return super().step(closure)  # paged state does need bitsandbytes' syncs
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    AdamW8bit.__qualname__ = AdamW8bit.__name__ = "AdamW8bit"
    return AdamW8bit
