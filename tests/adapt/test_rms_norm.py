"""RecomputeRMSNorm: the forward is transformers' Gemma4RMSNorm bit for bit, the backward its gradient, and it
saves a 16-bit input instead of an fp32 copy."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.adapt.rms_norm import RecomputeRMSNorm, swap_rms_norms
from slimtune.train.run import enable_checkpointing


def _pair(dim, with_scale, dtype, weight_grad):
    ref = Gemma4RMSNorm(dim, eps=1e-6, with_scale=with_scale).to(dtype)
    if with_scale:
        with torch.no_grad():
            ref.weight.copy_(torch.randn(dim) * 0.5 + 1)
        ref.weight.requires_grad_(weight_grad)
    ours = RecomputeRMSNorm(ref.eps, ref.weight if with_scale else None)
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_same_output_bits_and_gradients(dtype, with_scale, weight_grad):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 48, generator=g) * 3).to(dtype)
    dy = torch.randn(3, 7, 48, generator=g).to(dtype)
    ref, ours = _pair(48, with_scale, dtype, weight_grad)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), ours(xb)
    assert yb.dtype == dtype and torch.equal(ya, yb)  # same ops, same order
    grads_a = torch.autograd.grad(ya, [xa] + ([ref.weight] if with_scale and weight_grad else []), dy)
    grads_b = torch.autograd.grad(yb, [xb] + ([ours.weight] if with_scale and weight_grad else []), dy)
    # fp32 math in both; the 16-bit result is rounded once (one ulp apart at most where the sums differ)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for a, b in zip(grads_a, grads_b):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).norm() <= tol * a.float().norm()


@pytest.mark.parametrize("chunk_elements", [48, 100, 48 * 21], ids=["1-row", "2-rows-uneven", "one-chunk"])
def test_row_chunks_change_no_bits(chunk_elements):
    """Long sequences are normalised a few rows at a time (bounded fp32 temporaries): output and input gradient
    are the same bits as in one piece, the weight gradient (a sum over rows) equal up to summation order."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 7, 48, generator=g) * 3).to(torch.bfloat16)
    dy = torch.randn(3, 7, 48, generator=g).to(torch.bfloat16)
    weight = torch.nn.Parameter(torch.randn(48, generator=g).to(torch.bfloat16))
    whole, chunked = RecomputeRMSNorm(1e-6, weight), RecomputeRMSNorm(1e-6, weight, chunk_elements=chunk_elements)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = whole(xa), chunked(xb)
    assert torch.equal(ya, yb)
    dxa, dwa = torch.autograd.grad(ya, [xa, weight], dy)
    dxb, dwb = torch.autograd.grad(yb, [xb, weight], dy)
    assert torch.equal(dxa, dxb)
    assert torch.allclose(dwa.float(), dwb.float(), rtol=1e-2, atol=1e-2)


def test_saves_the_16bit_input_not_an_fp32_copy():
    x = torch.randn(64, 256, dtype=torch.bfloat16, requires_grad=True)
    sizes = {}
    for name, norm in zip(("ref", "ours"), _pair(256, True, torch.bfloat16, False)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            norm(x)
        sizes[name] = sum(saved)
    assert sizes["ref"] >= 2 * x.numel() * 4  # transformers: the fp32 upcast (kept by pow and by mul)
    assert sizes["ours"] <= x.numel() * 2 + 64 * 4 + 256 * 2  # x (bf16) + rstd per row + the weight


@pytest.mark.parametrize("variant", ["e2b", "26b-a4b"])
def test_model_with_swapped_norms_equals_the_original(tiny_dir, variant):
    """Whole tiny model, checkpointed, LoRA: same logits, loss and LoRA gradients; state-dict names unchanged."""
    def build(swap):
        model, _ = slimtune.load_model(tiny_dir(variant, text_only=True), dtype="float32", device="cpu",
                                       offload_embeddings=False)
        names = list(model.state_dict())
        n = swap_rms_norms(model) if swap else 0
        slimtune.add_lora(model, r=4, alpha=8, seed=3)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for layer in lora_modules(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
        enable_checkpointing(model)
        model.train()
        return model, names, n

    ref, names_ref, _ = build(False)
    ours, names_ours, n = build(True)
    assert n > 0 and names_ours == names_ref
    assert not any(type(m).__name__ == "Gemma4RMSNorm" for m in ours.get_decoder().modules())
    ids = torch.randint(5, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    out_a, out_b = ref(input_ids=ids, labels=ids), ours(input_ids=ids, labels=ids)
    assert torch.allclose(out_a.logits, out_b.logits, atol=1e-5, rtol=1e-5)
    out_a.loss.backward()
    out_b.loss.backward()
    grads_a = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    grads_b = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys()
    worst = max(float((grads_a[k] - grads_b[k]).norm() / (grads_a[k].norm() + 1e-12)) for k in grads_a)
    assert worst < 1e-4, worst
