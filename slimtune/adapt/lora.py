"""`LoraLinear`: a frozen base linear (16-bit `nn.Linear` or NF4 `Linear4bit`) plus a trainable low-rank update.

    y = base(x) + scaling · B(A(dropout(x)))        A: (r, in), B: (out, r), B initialised to zero

A and B live in fp32 so optimizer updates are not lost to bf16 rounding; under autocast their matmuls still run
in 16-bit. The submodule names (`base_layer`, `lora_A`, `lora_B`) match PEFT's, so state-dict keys and therefore
saved adapters are interchangeable with PEFT's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtune.adapt.lora_matmul import lora_matmul
from slimtune.adapt.quantize import nf4_state


def _fusable(base: nn.Module) -> bool:
    return type(base) is nn.Linear or nf4_state(base) is not None


class LoraLinear(nn.Module):
    """Low-rank adapter around a frozen linear layer.

    Args:
        base_layer: the frozen nn.Linear or bitsandbytes Linear4bit being adapted.
        r: rank of the update.
        alpha: LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).
        dropout: dropout probability applied to the adapter's input only.
        use_rslora: rank-stabilised scaling.
        generator: RNG for A's initialisation (reproducible adapters).
    """

    def __init__(self, base_layer: nn.Module, *, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fused = True  # one autograd node (slimtune.adapt.lora_matmul); False runs the modules one by one
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ kaiming-uniform(a=√5) (nn.Linear's default, as PEFT does), B = 0 so training starts at the base."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform with a=sqrt(5) reduces to this bound
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and _fusable(self.base_layer):
            dropout = None if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout
            return lora_matmul(x, self.base_layer, self.lora_A.weight, self.lora_B.weight, self.scaling, dropout)
        return self.forward_modules(x)

    def forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """The same function module by module (the reference the fused path is tested against)."""
        out = self.base_layer(x)
        # Outside autocast the fp32 adapter would meet 16-bit activations; cast explicitly in that case only.
        lora_in = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.lora_dropout(lora_in))) * self.scaling
        return out + update.to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A in fp32, shape (out, in): what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, rslora={self.use_rslora}"


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """All LoRA layers of a model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
