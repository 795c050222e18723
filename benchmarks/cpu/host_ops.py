"""Host-side aten ops per training step on the real E2B depth (35 layers) with tiny widths — a CPU proxy for the
GPU launch overhead that bounds the 2K step (BENCHMARKS.md: GPU busy ~20 %, ~33 K host ops per step).

Usage: python benchmarks/cpu/host_ops.py [--unfused] [--no-checkpointing]
Prints the total and the most frequent ops of one forward+backward (after a warm-up step).
"""

from __future__ import annotations

import argparse
import collections

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from slimtune.adapt.inject import add_lora
from slimtune.adapt.lora import lora_modules
from slimtune.models.geometry import build_config
from slimtune.train.run import enable_checkpointing
from slimtune.train.step import accumulate_gradients


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (forward, backward and recompute alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def e2b_depth_model(tokens_vocab: int = 512) -> torch.nn.Module:
    """E2B's real structure (35 layers, sliding/full pattern, PLE, KV sharing, double-wide MLP), tiny widths."""
    cfg = build_config("e2b", tiny=False, text_only=True)
    for key, value in dict(hidden_size=64, intermediate_size=128, vocab_size=tokens_vocab,
                           vocab_size_per_layer_input=tokens_vocab, hidden_size_per_layer_input=16, head_dim=16,
                           global_head_dim=32, num_attention_heads=2, sliding_window=16).items():
        setattr(cfg, key, value)
    model = transformers.Gemma4ForCausalLM._from_config(cfg, attn_implementation="sdpa").float()
    model.requires_grad_(False)
    return model


def count_step_ops(*, fused: bool = True, checkpointing: bool = True, seq: int = 64) -> collections.Counter:
    model = e2b_depth_model()
    add_lora(model, r=4, alpha=4)
    for layer in lora_modules(model).values():
        layer.fused = fused
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "targets": ids}
    accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.float32)  # warm-up
    with OpCounter() as counter:
        accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.float32)
    return counter.counts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--unfused", action="store_true", help="LoRA module by module (the pre-fusion path)")
    ap.add_argument("--no-checkpointing", action="store_true")
    a = ap.parse_args()
    counts = count_step_ops(fused=not a.unfused, checkpointing=not a.no_checkpointing)
    print(f"aten ops per step: {sum(counts.values())}")
    print(counts.most_common(15))


if __name__ == "__main__":
    main()
