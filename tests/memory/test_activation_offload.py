"""Activation offload: checkpointed layer inputs really go to the host and come back, and training is unchanged."""

import pytest
import torch

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.data.collate import collate
from slimtune.data.tokenize import Example
from slimtune.errors import ConfigError
from slimtune.memory.activation_offload import (
    ActivationOffloader,
    activation_offloader,
    enable_activation_offload,
)
from slimtune.train.run import enable_checkpointing
from slimtune.train.step import accumulate_gradients


def _model(tiny_dir, variant):
    model, _ = slimtune.load_model(tiny_dir(variant, text_only=True), dtype="float32", device="cpu")
    slimtune.add_lora(model, r=4, alpha=8, seed=2)
    torch.manual_seed(11)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    # fp64 end to end (any difference is a real one, not rounding); the MoE's grouped_mm has no fp64 kernel.
    return model if variant == "26b-a4b" else model.double()


def _batch(model, n=2, t=40):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, model.config.vocab_size, (n, t), generator=g).tolist()
    return collate([Example(x, x) for x in ids], pad_id=0)


def _grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.float32)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["e2b", "31b", "26b-a4b"])
def test_offload_gives_the_same_loss_and_gradients(tiny_dir, variant):
    plain = _model(tiny_dir, variant)
    enable_checkpointing(plain)
    batch = _batch(plain)
    loss0, g0 = _grads(plain, batch)
    model = _model(tiny_dir, variant)
    enable_checkpointing(model)
    off = enable_activation_offload(model, min_bytes=0)
    loss1, g1 = _grads(model, batch)
    assert loss1 == loss0
    for name, g in g0.items():
        assert torch.equal(g1[name], g), name  # the same values recomputed from bit-identical copies
    # Each layer's positional inputs went out and came back: hidden states, plus the per-layer input on E2B.
    per_layer = 2 if model.config.hidden_size_per_layer_input else 1
    layers = model.config.num_hidden_layers
    assert off.offloaded_tensors == per_layer * layers
    hidden_bytes = batch["input_ids"].numel() * model.config.hidden_size * model.dtype.itemsize
    assert off.offloaded_bytes >= layers * hidden_bytes
    assert off.fetched_bytes == off.offloaded_bytes
    # Every layer but the last (where backward starts) was fetched while the layer after it was in backward.
    assert off.prefetched_tensors == off.offloaded_tensors - per_layer


def test_small_tensors_and_parameters_stay(tiny_dir):
    off = ActivationOffloader(min_bytes=1024)
    small = torch.randn(8)  # 32 bytes
    big = torch.randn(1024)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    assert off.pack(small) is small
    assert off.pack(weight) is weight
    assert off.pack(weight.t()) is not None and not off.worth_offloading(weight.t())  # a view of a parameter
    assert not off.worth_offloading(torch.zeros(4096, dtype=torch.long))  # ids, masks: not activations
    packed = off.pack(big)
    assert packed is not big and off.offloaded_bytes == big.numel() * 4
    assert torch.equal(off.unpack(packed), big)


def test_needs_checkpointing(tiny_dir):
    model = _model(tiny_dir, "31b")
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        enable_activation_offload(model)


def test_nothing_offloaded_without_grad_and_enabling_twice_keeps_one_offloader(tiny_dir):
    model = _model(tiny_dir, "e2b")
    enable_checkpointing(model)
    off = enable_activation_offload(model, min_bytes=0)
    assert enable_activation_offload(model, min_bytes=0) is off is activation_offloader(model)
    batch = _batch(model)
    model.train()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert off.offloaded_tensors == 0
    _grads(model, batch)
    assert off.offloaded_tensors == 2 * model.config.num_hidden_layers  # wrapped once, not twice


def test_gradient_accumulation_and_retained_graph(tiny_dir):
    """Two micro-batches per step, and a second backward over the same graph, still see their own inputs."""
    plain = _model(tiny_dir, "e2b")
    enable_checkpointing(plain)
    model = _model(tiny_dir, "e2b")
    enable_checkpointing(model)
    enable_activation_offload(model, min_bytes=0)
    a, b = _batch(plain, t=24), _batch(plain, n=1, t=33)
    grads = []
    for m in (plain, model):
        m.train()
        m.zero_grad(set_to_none=True)
        accumulate_gradients(m, [a, b], device=torch.device("cpu"), dtype=torch.float32)
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=a["input_ids"]).logits.float().pow(2).mean()
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()  # the host copies are kept for a second backward
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * first[n])
