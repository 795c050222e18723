"""KV sharing (E2B/E4B): cache on/off and checkpointing on/off must not change logits or gradients (mode 2)."""

import pytest
import torch

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.data.collate import collate
from slimtune.data.tokenize import Example
from slimtune.memory.activation_offload import enable_activation_offload
from slimtune.train.step import accumulate_gradients


def _model(tiny_dir, variant="e2b"):
    model, _ = slimtune.load_model(tiny_dir(variant, text_only=True), dtype="float32", device="cpu")
    assert (model.config.num_kv_shared_layers > 0) == (variant == "e2b")
    slimtune.add_lora(model, r=4, alpha=8, seed=2)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    return model


def _batch(model, n=2, t=80):
    """Sequences longer than the sliding window, so sliding producers/consumers really differ from full ones."""
    assert t > model.config.sliding_window
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, model.config.vocab_size, (n, t), generator=g).tolist()
    return collate([Example(x, x) for x in ids], pad_id=0)


def _producer_layers(model) -> list[int]:
    cfg = model.config
    first_shared = cfg.num_hidden_layers - cfg.num_kv_shared_layers
    prod = {}
    for i in range(first_shared):
        prod[cfg.layer_types[i]] = i
    return sorted(prod.values())


def _grads(model, batch, checkpointing: str | None, offload: bool = False):
    if checkpointing is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        if checkpointing == "reentrant":
            model.enable_input_require_grads()  # reentrant needs a grad-requiring input to backprop at all
        if offload:  # after enabling: it wraps the checkpoint function just installed
            enable_activation_offload(model, min_bytes=0)
    model.train()
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.float32)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def test_use_cache_does_not_change_logits(tiny_dir):
    model = _model(tiny_dir).eval()
    batch = _batch(model)
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], use_cache=True).logits
        b = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant,offload", [("e2b", False), ("e2b", True), ("31b", True)],
                         ids=["e2b", "e2b-offload", "31b-offload"])
def test_non_reentrant_checkpointing_keeps_every_gradient(tiny_dir, variant, offload):
    """Also with activation offload: the producer's K/V gradients survive the host round trip of layer inputs."""
    model = _model(tiny_dir, variant)
    batch = _batch(model)
    plain = _grads(model, batch, None)
    ckpt = _grads(model, batch, "non_reentrant", offload=offload)
    if offload:
        assert model._slimtune_offloader.offloaded_tensors > 0
    producers = _producer_layers(model)
    checked = 0
    for name, g in plain.items():
        assert torch.allclose(ckpt[name], g, rtol=1e-5, atol=1e-7), name
        if any(f"layers.{i}.self_attn.{p}" in name for i in producers for p in ("k_proj", "v_proj")):
            assert g.abs().sum() > 0
            checked += 1
    assert checked >= 2 * len(producers)  # lora_A and lora_B of each producer k_proj (and v_proj)


def test_reentrant_checkpointing_drops_producer_gradients(tiny_dir):
    """Documents why we never use reentrant checkpointing: consumer→producer K/V gradients go missing."""
    model = _model(tiny_dir)
    batch = _batch(model)
    plain = _grads(model, batch, None)
    reent = _grads(model, batch, "reentrant")
    producers = _producer_layers(model)
    diffs = [float((reent[n] - g).norm() / g.norm()) for n, g in plain.items()
             if any(f"layers.{i}.self_attn.k_proj" in n for i in producers) and g.norm() > 0]
    assert diffs and max(diffs) > 1e-3, diffs


@pytest.mark.parametrize("split", ["producers-only", "first-layer-only"])
def test_partial_checkpointing_keeps_every_gradient(tiny_dir, split):
    """checkpoint_layers=k: the first k layers recompute, the rest keep their activations. The mix must give the
    plain path's gradients (KV producers checkpointed, their consumers not, and the reverse), and really recompute
    only those k layers."""
    from slimtune.train.run import enable_checkpointing

    model = _model(tiny_dir)
    batch = _batch(model)
    plain = _grads(model, batch, None)
    cfg = model.config
    k = cfg.num_hidden_layers - cfg.num_kv_shared_layers if split == "producers-only" else 1
    enable_checkpointing(model, k)
    layers = list(model.get_decoder().layers)
    calls = [0] * len(layers)  # self_attn runs once per layer forward, again when a checkpointed layer recomputes
    hooks = [layer.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    model.train()
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.float32)
    for h in hooks:
        h.remove()
    assert calls == [2 if i < k else 1 for i in range(len(layers))], calls
    for name, g in plain.items():
        p = dict(model.named_parameters())[name]
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7), name
