"""The optimizer of a run: torch's AdamW, or bitsandbytes' 8-bit AdamW for a quarter of the state memory.

AdamW keeps two fp32 moments per trainable value (8 bytes); AdamW8bit stores them block-wise quantized to
uint8 (2 bytes plus one fp32 scale per 256-value block), which matters for high-rank LoRA or many target modules.
bitsandbytes keeps tensors under `min_8bit_size` (4096 values) in 32-bit: too small to be worth quantizing.
Its state_dict round-trips through torch.save/torch.load(weights_only=True), so checkpoints and --resume work.
"""

from __future__ import annotations

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
    if capturable:
        raise ConfigError(f"optimizer {name!r} cannot be captured in a CUDA graph; use optimizer adamw with "
                          "cuda_graphs, or turn cuda_graphs off.")
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes); use "
                              "optimizer adamw without it.") from exc
        # weight_decay passed explicitly: bitsandbytes' own default (1e-2) differs from ours.
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {name!r})")
