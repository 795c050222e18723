"""The tiny model the CUDA-graph step tests train: E2B text, PLE rows on the host, LoRA with non-zero B (so the
adapters matter from the first step), checkpointed, in training mode."""

import torch

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.memory.host_embedding import offload_per_layer_embeddings
from slimtune.train.run import enable_checkpointing


def tiny_lora_model(tiny_dir, device, dtype):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype=dtype, device=device,
                                   offload_embeddings=False)
    offload_per_layer_embeddings(model)  # the graph steps bind these rows as static inputs
    slimtune.add_lora(model, r=4, alpha=8, seed=3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            w = layer.lora_B.weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    enable_checkpointing(model)
    model.train()
    return model
