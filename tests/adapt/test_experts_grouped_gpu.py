"""Grouped-GEMM experts on CUDA in bf16 at the real 26B-A4B expert shapes (128 experts, hidden 2816, expert width
704, top-8): the three-kernel stack dequantization equals the per-expert one, grouped equals the per-expert loop
(outputs, input and expert-LoRA gradients) for NF4 and 16-bit bases under uneven routing with empty and
single-token experts, and one layer's forward + backward peaks at one dequantized stack (gate_up's), never both.
Runs on the device; skipped without CUDA. `-s` prints the peak and a one-layer timing of both paths."""

import time

import pytest
import torch
from torch import nn

from slimtune.adapt.experts import LoraExperts
from slimtune.adapt.experts_grouped import experts_impl, use_grouped
from slimtune.adapt.experts_nf4 import NF4Experts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
E, H, INTER, TOP_K, T = 128, 2816, 704, 8, 384
EMPTY, SINGLE = (5, 77, 120), 42  # experts with no token, and one with exactly one
GATE_UP_BYTES = E * 2 * INTER * H * 2  # 1.015 GB: the designed transient of the grouped NF4 path
DOWN_BYTES = E * H * INTER * 2


class _TensorExperts(nn.Module):
    """A 16-bit experts block shaped like Gemma4TextExperts (what LoraExperts wraps), built on the GPU directly."""

    def __init__(self, gate_up, down, act_fn):
        super().__init__()
        self.num_experts = gate_up.shape[0]
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)
        self.act_fn = act_fn


@pytest.fixture(scope="module")
def nf4():
    """Random 26B-A4B-shaped NF4 experts (std 0.02, the init scale), quantized expert by expert on the GPU."""
    torch.manual_seed(0)
    block = NF4Experts(E, H, INTER, nn.GELU(approximate="tanh"), dtype=torch.bfloat16, device=CUDA)
    for stack in (block.gate_up_proj, block.down_proj):
        for e in range(E):
            stack.quantize_expert(e, torch.randn(stack.out_features, stack.in_features, device=CUDA) * 0.02)
    return block


def _routing(seed=1):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(E, generator=g) ** 3 + 0.01  # uneven: group sizes spread over two orders of magnitude
    p[list(EMPTY)] = 0
    p[SINGLE] = 0
    index = torch.stack([torch.multinomial(p, TOP_K, generator=g) for _ in range(T)])
    index[7, 3] = SINGLE
    counts = torch.bincount(index.reshape(-1), minlength=E)
    assert counts[list(EMPTY)].sum() == 0 and counts[SINGLE] == 1
    weights = torch.softmax(torch.randn(T, TOP_K, generator=g), -1)
    return index.to(CUDA), weights.to(CUDA)


def _lora(base, r=16):
    block = LoraExperts(base, ["gate_up_proj", "down_proj"], r=r, alpha=r,
                        generator=torch.Generator().manual_seed(3)).to(CUDA)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in block.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return block


def _step(module, impl, index, weights):
    module.zero_grad(set_to_none=True)
    x = (torch.randn(T, H, device=CUDA, generator=torch.Generator(CUDA).manual_seed(2))).bfloat16()
    x.requires_grad_(True)
    grad_out = torch.randn(T, H, device=CUDA, generator=torch.Generator(CUDA).manual_seed(5)).bfloat16()
    with experts_impl(impl), torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(x, index, weights)
    y.backward(grad_out)
    return {"y": y.float(), "x": x.grad.float(),
            **{n: p.grad.float() for n, p in module.named_parameters() if p.requires_grad}}


def _assert_close(got, expect):
    """Same bf16 weights and products; only the kernels' accumulation order differs: 1% of the norm."""
    assert got.keys() == expect.keys()
    for name, ref in expect.items():
        err = (got[name] - ref).norm() / ref.norm()
        assert ref.norm() > 0 and err <= 1e-2, (name, err.item())


def test_auto_picks_grouped_on_cuda_bf16():
    x = torch.zeros(2, H, device=CUDA, dtype=torch.bfloat16)
    with experts_impl("auto"):
        assert use_grouped(x, (H, INTER)) and not use_grouped(x.half(), (H, INTER))


def test_whole_stack_dequantization_equals_per_expert(nf4):
    for stack in (nf4.gate_up_proj, nf4.down_proj):
        whole = stack.dequantize_all(torch.bfloat16)  # the three-kernel path (26B-A4B's blocks align)
        assert whole.shape == stack.shape and whole.dtype == torch.bfloat16
        for e in range(E):
            assert torch.equal(whole[e], stack.dequantize(e)), e


@pytest.mark.parametrize("base_kind", ["nf4", "16bit"])
def test_grouped_equals_loop_with_expert_lora(nf4, base_kind):
    if base_kind == "nf4":
        base = nf4
    else:
        base = _TensorExperts(nf4.gate_up_proj.dequantize_all(torch.bfloat16),
                              nf4.down_proj.dequantize_all(torch.bfloat16), nf4.act_fn)
    module = _lora(base)
    index, weights = _routing()
    loop, grouped = _step(module, "loop", index, weights), _step(module, "grouped", index, weights)
    _assert_close(grouped, loop)
    for name in ("gate_up_proj", "down_proj"):  # CUDA's empty groups: exactly zero factor gradients
        a = grouped[f"adapters.{name}.lora_A"].view(E, 16, -1)
        assert a[list(EMPTY)].abs().max() == 0 and a[SINGLE].abs().max() > 0, name


def test_nf4_experts_without_lora_grouped_equals_loop(nf4):
    index, weights = _routing(seed=6)
    _assert_close(_step(nf4, "grouped", index, weights), _step(nf4, "loop", index, weights))


def test_one_layer_peak_is_one_dequantized_stack(nf4):
    """Forward + backward of NF4 experts with expert LoRA, grouped: the extra memory is gate_up's 16-bit stack
    (1.015 GB) plus its 64-block absmax (fp32, 32 MB, twice while it is built) and a few hundred tokens'
    activations; gate_up and down are never alive together (that would be 1.52 GB)."""
    module = _lora(nf4)
    index, weights = _routing()
    stats = {}
    for impl in ("loop", "grouped"):
        _step(module, impl, index, weights)  # warm-up: kernels, cuBLAS workspaces
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(3):
            _step(module, impl, index, weights)
        torch.cuda.synchronize()
        stats[impl] = ((torch.cuda.max_memory_allocated() - base) / 2**20, (time.perf_counter() - start) / 3)
    print(f"\none 26B-A4B expert layer, {T} tokens x top-{TOP_K}, fwd+bwd: "
          + ", ".join(f"{k}: +{mib:.0f} MiB, {s * 1e3:.1f} ms" for k, (mib, s) in stats.items()))
    designed = GATE_UP_BYTES + 2 * E * (2 * INTER * H // 64) * 4 + 96 * 2**20
    assert stats["grouped"][0] * 2**20 <= designed, (stats, designed / 2**20)
    assert stats["grouped"][0] * 2**20 < GATE_UP_BYTES + DOWN_BYTES
