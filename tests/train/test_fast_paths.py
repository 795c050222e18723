"""The fast paths together (slimtune attention, host-offloaded PLE, non-reentrant checkpointing, compiled decoder
layers) give the plain path's loss and LoRA gradients on a tiny Gemma 4: E2B (KV sharing) and 31B (none).

fp32 runs compare tightly, on CPU and on the GPU. In bf16 the bar is "as close to an fp32 run as the plain bf16
path is": a random tiny Gemma 4 has RMS-normalised queries and keys with unit gains and no 1/sqrt(d) scaling, so
its attention is near one-hot and bf16 rounding of the logits decides which key wins — plain bf16 gradients were
88 % (global relative error) away from fp32 ones. Scaling the query norm's gain by 0.1 gives logits of order one
(what trained weights give) and brings that to ~5 %, so a wrong gradient shows instead of drowning in noise.
"""

import shutil

import pytest
import torch

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.data.collate import collate
from slimtune.data.tokenize import Example
from slimtune.train.step import accumulate_gradients

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="torch.compile on CPU needs a C++ compiler")
DEVICES = [pytest.param("cpu", marks=needs_compiler), pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


def _model(tiny_dir, variant, dtype, device):
    model, _ = slimtune.load_model(tiny_dir(variant, text_only=True), dtype=dtype, device=device)
    slimtune.add_lora(model, r=8, alpha=16, seed=3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("q_norm"):
                module.weight.mul_(0.1)  # attention logits of order one (see the module docstring)
        for i, layer in enumerate(lora_modules(model).values()):
            w = layer.lora_B.weight  # drawn on the CPU: the same values on every device
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) * 0.05)
    return model


def _fast_model(tiny_dir, variant, dtype, device):
    from slimtune.adapt.attention import enable_slimtune_attention
    from slimtune.memory.host_embedding import offload_per_layer_embeddings
    from slimtune.train.run import apply_layer_switches

    model = _model(tiny_dir, variant, dtype, device)
    enable_slimtune_attention(model)
    offload_per_layer_embeddings(model)
    apply_layer_switches(model, compile_layers=True, gradient_checkpointing=True)  # training's order
    layers = model.get_decoder().layers
    assert all(hasattr(layer, "_compiled_call_impl") and layer._compiled_call_impl is not None for layer in layers)
    return model


def _loss_and_grads(tiny_dir, variant, device, dtype, *, fast=False):
    """One step's loss and LoRA gradients (fp32, on the CPU) on a padded two-row batch, the same for every run."""
    model = (_fast_model if fast else _model)(tiny_dir, variant, dtype, device)
    g = torch.Generator().manual_seed(7)
    vocab = model.config.get_text_config().vocab_size
    rows = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in (96, 61)]  # padded: 2D masks
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(model, [collate([Example(r, r) for r in rows], pad_id=0)],
                                   device=torch.device(device), dtype=getattr(torch, dtype))
    return loss, {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _distance(a, b):
    """Global relative error ‖a − b‖ / ‖b‖ over all LoRA gradients, and the worst single tensor's."""
    total = sum(float((a[k] - b[k]).norm() ** 2) for k in b) ** 0.5 / sum(float(b[k].norm() ** 2) for k in b) ** 0.5
    worst = max(float((a[k] - b[k]).norm() / (b[k].norm() + 1e-12)) for k in b)
    return total, worst


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_fast_paths_match_plain_in_fp32(tiny_dir, variant, device):
    loss0, g0 = _loss_and_grads(tiny_dir, variant, device, "float32")
    loss1, g1 = _loss_and_grads(tiny_dir, variant, device, "float32", fast=True)
    assert g1.keys() == g0.keys() and all(g.abs().sum() > 0 for g in g1.values())  # no LoRA left without gradient
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0)
    total, worst = _distance(g1, g0)
    assert total <= 2e-3 and worst <= 5e-3, (total, worst)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["e2b", "31b"])
def test_fast_paths_in_bf16_are_as_close_to_fp32_as_plain(tiny_dir, variant, device):
    loss32, g32 = _loss_and_grads(tiny_dir, variant, device, "float32")
    loss_plain, g_plain = _loss_and_grads(tiny_dir, variant, device, "bfloat16")
    loss_fast, g_fast = _loss_and_grads(tiny_dir, variant, device, "bfloat16", fast=True)
    plain_total, plain_worst = _distance(g_plain, g32)
    fast_total, fast_worst = _distance(g_fast, g32)
    assert plain_total < 0.15, plain_total  # the model is well conditioned enough for the comparison to mean something
    assert abs(loss_fast - loss32) <= 2 * abs(loss_plain - loss32) + 1e-2 * abs(loss32)
    assert fast_total <= 1.5 * plain_total + 0.01, (fast_total, plain_total)
    assert fast_worst <= 1.5 * plain_worst + 0.02, (fast_worst, plain_worst)
