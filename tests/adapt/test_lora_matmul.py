"""The fused LoRA linear (one autograd node) equals the module-by-module path, and never saves a dequantized W."""

import pytest
import torch
from torch import nn

import slimtune
from slimtune.adapt.lora import LoraLinear, lora_modules
from slimtune.adapt.quantize import make_nf4_linear


def _layer(base, seed=0, dropout=0.0):
    layer = LoraLinear(base, r=4, alpha=8, dropout=dropout, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return layer


def _run(layer, x, fused, seed=5):
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same dropout mask on both paths
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return out.detach().double(), x.grad.double(), layer.lora_A.weight.grad, layer.lora_B.weight.grad


def _rel(a, b):
    return float((a - b).norm() / (b.norm() + 1e-30))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_modules_fp64(dropout):
    base = nn.Linear(48, 40, bias=False).double().requires_grad_(False)
    layer = _layer(base, dropout=dropout).double()
    layer.train()
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    ref, fused = _run(layer, x, False), _run(layer, x, True)
    for a, b in zip(fused, ref):
        assert _rel(a, b) < 1e-12
    assert _rel(ref[3], torch.zeros_like(ref[3])) > 0.1  # the gradients compared are not trivially zero


@pytest.mark.parametrize("nf4", [False, True])
def test_fused_equals_modules_under_bf16_autocast(nf4):
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    base = make_nf4_linear(lin, torch.bfloat16, "cpu") if nf4 else lin.to(torch.bfloat16).requires_grad_(False)
    layer = _layer(base)
    x = torch.randn(3, 10, 128, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, fused = _run(layer, x, False), _run(layer, x, True)
    assert fused[0].dtype == ref[0].dtype
    for a, b in zip(fused, ref):
        assert _rel(a, b) < 2e-2  # bf16: rounding order only
    assert layer.lora_A.weight.grad.dtype == torch.float32  # optimizer state stays fp32


def test_nf4_fused_saves_no_dequantized_weight():
    lin = nn.Linear(256, 192, bias=False)
    layer = _layer(make_nf4_linear(lin, torch.bfloat16, "cpu"))
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(4, 256, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).sum().backward()
    big_float = [s for s in saved if s[0].is_floating_point and s[1] >= 256 * 192]
    assert not big_float, big_float
    layer.fused = False  # control: the hook does see what the module path saves
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).sum().backward()
    assert saved


def test_fused_model_matches_module_path(tiny_dir):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype="float32", device="cpu")
    model.double()
    slimtune.add_lora(model, r=4, alpha=8, seed=1)
    for layer in lora_modules(model).values():
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.05)
    ids = torch.randint(5, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    results = []
    for fused in (False, True):
        for layer in lora_modules(model).values():
            layer.fused = fused
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits  # fp64 (transformers' own loss would upcast to fp32 only)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    # Gemma 4's norms compute in fp32 even in an fp64 model, so summation-order noise surfaces here (loss ~1e-9,
    # LoRA grads ~2e-5 after ten layers); a wrong scaling or a dropped gradient would be ~1e-2. The layer-level
    # tests above check the function itself to 1e-12.
    assert abs(float(l1 - l0)) < 1e-7 * float(l0)
    assert max(_rel(g1[k], g0[k]) for k in g0) < 1e-4
    assert any(k for k in g0 if "k_proj" in k and float(g0[k].norm()) > 0)


def test_fused_nf4_reads_the_standard_layout_after_bitsandbytes_repacked_it():
    # bitsandbytes repacks a CPU NF4 weight for its inference kernel at the first eval-mode forward of the base
    # layer (e.g. generating before LoRA is added); the fused node must still dequantize the real weights.
    # Restoring the standard layout re-quantizes the 8-bit absmax (~5e-4 relative drift: bitsandbytes' own
    # save path does the same); reading the repacked bytes as standard NF4 gives a different matrix (rel ~1).
    # A Linear4bit made outside slimtune (make_nf4_linear turns the repack off: tests/adapt/test_nf4_cpu_layout.py)
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks NF4 weights only on CPUs with AVX512-BF16")
    base = make_nf4_linear(nn.Linear(128, 64, bias=False), torch.bfloat16, "cpu")
    base.support_avx512bf16_for_cpu = True
    layer = _layer(base)
    layer.eval()
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer.fused = False
        reference = layer(x).float()  # bitsandbytes' kernel on its repacked weights
        assert getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False)
        layer.fused = True
        fused = layer(x).float()
    assert _rel(fused, reference) < 2e-2
