"""The GPU benchmark's model builder, exercised on CPU with a tiny geometry."""

import pytest
import torch

from slimtune.adapt.inject import add_lora
from slimtune.adapt.quantize import is_nf4_linear
from slimtune.bench.random_model import build_random_model
from slimtune.memory.estimate import estimate_training_memory
from slimtune.memory.host_embedding import HostOffloadedEmbedding


@pytest.mark.parametrize("mode", ["qlora", "lora16"])
def test_tiny_random_model_builds_and_trains(mode):
    model = build_random_model("e2b", mode=mode, device="cpu", dtype=torch.float32, tiny=True)
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    assert isinstance(model.get_decoder().embed_tokens_per_layer, HostOffloadedEmbedding)
    assert any(is_nf4_linear(m) for m in model.modules()) == (mode == "qlora")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    add_lora(model, r=4)
    ids = torch.randint(3, model.config.vocab_size, (1, 40))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _build_recording_draws(monkeypatch, variant: str):
    """(tiny QLoRA model of `variant`, the shape of every random tensor the builder drew)."""
    from slimtune.bench import random_model

    drawn = []
    real = random_model._random
    monkeypatch.setattr(random_model, "_random", lambda shape, *a: drawn.append(tuple(shape)) or real(shape, *a))
    model = build_random_model(variant, mode="qlora", device="cpu", dtype=torch.float32, tiny=True)
    monkeypatch.undo()
    return model, drawn


def test_the_tied_output_table_is_drawn_once_and_big_tables_in_slices(monkeypatch):
    from slimtune.bench.random_model import _fill_random

    model, drawn = _build_recording_draws(monkeypatch, "31b")
    table = tuple(model.get_input_embeddings().weight.shape)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert drawn.count(table) == 1  # the lm_head it is tied to was once drawn as a second random table
    gen = torch.Generator().manual_seed(0)
    sliced = _fill_random(torch.empty(10, 3), "cpu", gen, rows_per_slice=4)
    assert sliced.shape == (10, 3) and len({tuple(row.tolist()) for row in sliced}) == 10  # every slice drawn anew
    assert 0.005 < sliced.std() < 0.05


def test_qlora_26b_experts_are_built_in_nf4_one_expert_matrix_at_a_time(monkeypatch):
    from slimtune.adapt.experts_nf4 import NF4Experts

    model, drawn = _build_recording_draws(monkeypatch, "26b-a4b")
    layers = model.model.layers
    assert all(isinstance(layer.experts, NF4Experts) and layer.experts.complete for layer in layers)
    assert max(len(s) for s in drawn) == 2  # never a 3-D 16-bit expert stack, only (out, in) matrices
    e, gu = layers[0].experts.num_experts, layers[0].experts.gate_up_proj
    assert drawn.count((gu.out_features, gu.in_features)) >= e * len(layers)
    add_lora(model, r=4, finetune_experts=True)
    ids = torch.randint(3, model.config.vocab_size, (1, 40))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n)
    lora16 = build_random_model("26b-a4b", mode="lora16", device="cpu", dtype=torch.float32, tiny=True)
    assert lora16.model.layers[0].experts.gate_up_proj.dim() == 3
    with pytest.raises(ValueError, match="mode must be"):
        build_random_model("26b-a4b", mode="nf4", device="cpu", tiny=True)


def test_estimate_grows_with_context_and_shrinks_with_4bit(tiny_dir):
    small = estimate_training_memory("e2b", seq_len=2048, load_in_4bit=True)
    long = estimate_training_memory("e2b", seq_len=8192, load_in_4bit=True)
    lora16 = estimate_training_memory("e2b", seq_len=2048, load_in_4bit=False)
    assert small["total_gib"] < long["total_gib"] and small["total_gib"] < lora16["total_gib"]
    assert set(small["breakdown"]) >= {"weights", "lora_and_optimizer", "loss_chunk"}
    folder = estimate_training_memory(str(tiny_dir("e2b", text_only=True)), seq_len=128)
    assert 0 < folder["total_gib"] < small["total_gib"]
