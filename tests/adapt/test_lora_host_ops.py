"""The fused LoRA node keeps its host-op budget: the 2K GPU step is bound by host ops (BENCHMARKS.md)."""

import torch
from torch import nn

from slimtune.adapt.lora import LoraLinear


def _ops(layer, x) -> int:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "cpu"))
    from host_ops import OpCounter

    with OpCounter() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).sum().backward()
    return sum(counter.counts.values())


def test_fused_lora_dispatches_fewer_ops_than_the_module_path():
    # 16-bit base: on CPU the NF4 dequantization is plain torch (tens of ops) while on CUDA it is two
    # bitsandbytes kernels, so only the 16-bit count says the same thing on both devices.
    layer = LoraLinear(nn.Linear(128, 64, bias=False).to(torch.bfloat16).requires_grad_(False), r=4, alpha=8)
    x = torch.randn(2, 8, 128, dtype=torch.bfloat16, requires_grad=True)
    layer.fused = False
    modules = _ops(layer, x)
    layer.fused = True
    fused = _ops(layer, x)
    assert fused < 0.8 * modules, (fused, modules)
