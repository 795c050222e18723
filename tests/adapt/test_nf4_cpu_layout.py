"""QLoRA on CPU keeps backpropagating through NF4 linears after evaluation (slimtune.adapt.quantize).

bitsandbytes repacks a Linear4bit at its first eval-mode no-grad forward on CPUs with AVX512-BF16 and from then on
multiplies through a kernel without a backward: the frozen NF4 linears without an adapter (E2B's per-layer gates
and projections) stopped passing gradients back, and every LoRA weight before them trained on a wrong gradient
after the first evaluation. The first test fails on that old behaviour on such CPUs (CI's); elsewhere bitsandbytes
never repacks and it holds either way.
"""

import pytest
import torch

import slimtune
from slimtune.adapt.inject import trainable_parameters
from slimtune.adapt.quantize import is_nf4_linear, nf4_state
from slimtune.data.collate import collate
from slimtune.data.tokenize import Example
from slimtune.train.step import accumulate_gradients

bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _qlora(tiny_dir):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True, size="demo"), dtype=torch.float32,
                                   device="cpu", load_in_4bit=True)
    return model


def _batch(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.get_text_config().vocab_size, (48,), generator=g).tolist()
    return collate([Example(ids, ids)], pad_id=0)


def _lora_grads(model, batch):
    model.train()
    params = trainable_parameters(model)
    for p in params:
        p.grad = None
    accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.float32)
    return [p.grad.clone() for p in params]


def test_lora_gradients_are_the_same_after_an_evaluation_forward(tiny_dir):
    model = _qlora(tiny_dir)
    slimtune.add_lora(model, r=4, alpha=8, seed=0)
    plain = [n for n, m in model.named_modules() if is_nf4_linear(m) and not n.endswith("base_layer")]
    assert plain  # NF4 linears without an adapter: the gradient has to pass through bitsandbytes' own forward
    batch = _batch(model)
    before = _lora_grads(model, batch)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    after = _lora_grads(model, batch)
    worst = max(float((a - b).norm() / (a.norm() + 1e-12)) for a, b in zip(before, after, strict=True))
    assert worst < 1e-6, worst


def test_a_model_repacked_before_add_lora_gets_the_standard_layout_back(tiny_dir):
    model = _qlora(tiny_dir)
    name, linear = next((n, m) for n, m in model.named_modules()
                        if is_nf4_linear(m) and m.in_features % nf4_state(m).blocksize == 0)
    x = torch.randn(3, linear.in_features)
    want = linear(x)
    # what bitsandbytes' first eval forward does on an AVX512-BF16 CPU, done by hand so that every CPU runs it
    linear.weight.data, linear.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        linear.weight.data, nf4_state(linear))
    assert nf4_state(linear).packing_format_for_cpu
    slimtune.add_lora(model, r=4, alpha=8, seed=0)
    assert not getattr(nf4_state(linear), "packing_format_for_cpu", False), name
    assert not linear.support_avx512bf16_for_cpu
    x.requires_grad_(True)
    got = linear(x)
    got.sum().backward()
    # bitsandbytes' repack round trip is slightly lossy itself (weights move by ~0.5 % of their largest value)
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2)
    assert x.grad is not None and x.grad.abs().sum() > 0
