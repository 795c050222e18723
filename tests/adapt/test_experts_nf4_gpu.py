"""NF4 MoE experts on CUDA in bf16: bitsandbytes' CUDA dequantization of one expert row gives the same weight as
the plain-torch path, outputs / input gradients / expert-LoRA gradients match the dequantized 16-bit experts, and
the peak stays near the 4-bit stack plus one expert. Runs on the device; skipped without CUDA."""

import pytest
import torch
import transformers
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

import slimtune
from slimtune.adapt.experts import LoraExperts, experts_modules
from slimtune.adapt.experts_nf4 import NF4Experts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")


def _config(experts=8, hidden=192, inter=72):
    """192×72: 144-row gate_up (27648 values, 432 blocks), so neither 64- nor 256-blocks align with experts."""
    cfg = transformers.Gemma4TextConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                        top_k_experts=2, enable_moe_block=True, hidden_activation="gelu_pytorch_tanh")
    cfg._experts_implementation = "eager"
    return cfg


def _nf4_and_reference(cfg, dtype=torch.bfloat16):
    """NF4Experts on CUDA and transformers' module with bitsandbytes' own CUDA round trip of each expert."""
    import bitsandbytes.functional as bnb_f

    torch.manual_seed(0)
    block = Gemma4TextExperts(cfg).to(CUDA, dtype)
    with torch.no_grad():
        block.gate_up_proj.normal_(0, 0.1)
        block.down_proj.normal_(0, 0.1)
    nf4 = NF4Experts.from_experts(block.requires_grad_(False), dtype, CUDA)
    ref = Gemma4TextExperts(cfg).to(CUDA, dtype)
    for name in ("gate_up_proj", "down_proj"):
        rows = []
        for w in getattr(block, name):
            packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            rows.append(bnb_f.dequantize_4bit(packed, state))
        setattr(ref, name, nn.Parameter(torch.stack(rows), requires_grad=False))
    return nf4, ref


def _routing(tokens, used, seed=1):
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(used)
    choice = torch.stack([torch.randperm(len(used), generator=g)[:2] for _ in range(tokens)])
    return used[choice].to(CUDA), torch.rand(tokens, 2, generator=g).to(CUDA)


def test_cuda_dequantization_equals_the_torch_path_per_expert():
    nf4, ref = _nf4_and_reference(_config())
    for name in ("gate_up_proj", "down_proj"):
        stack = getattr(nf4, name)
        on_cpu = {k: v.cpu() for k, v in stack.state_dict().items()}
        for e in range(stack.num_experts):
            got = stack.dequantize(e)  # bitsandbytes' CUDA kernels on this row
            assert got.is_cuda and got.dtype == torch.bfloat16
            assert torch.equal(got, getattr(ref, name)[e]), (name, e)
            stack_cpu = type(stack)(stack.num_experts, stack.out_features, stack.in_features, dtype=torch.bfloat16)
            stack_cpu.load_state_dict(on_cpu)
            # plain-torch path: the same products in fp32, rounded once to bf16 (allow one bf16 ulp)
            torch.testing.assert_close(stack_cpu.dequantize(e), got.cpu(), rtol=2**-8, atol=0)


@pytest.mark.parametrize("used", [[0, 3, 6], list(range(8))], ids=["3of8", "all"])
def test_bf16_output_and_input_gradient_match_dequantized_experts(used):
    cfg = _config()
    nf4, ref = _nf4_and_reference(cfg)
    index, weights = _routing(300, used)
    x = torch.randn(300, cfg.hidden_size, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(300, cfg.hidden_size, device=CUDA, dtype=torch.bfloat16)
    expect = ref(x, index, weights)
    (g_expect,) = torch.autograd.grad(expect, x, grad_out)
    got = nf4(x, index, weights)
    (g_got,) = torch.autograd.grad(got, x, grad_out)
    assert got.dtype == torch.bfloat16 and g_got.dtype == torch.bfloat16
    # same bf16 weights, same per-expert matmuls; only the grouping of rows (and so cuBLAS tiling) differs
    torch.testing.assert_close(got, expect, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(g_got, g_expect, rtol=2e-2, atol=2e-3)


def test_bf16_expert_lora_gradients_match_dequantized_experts():
    cfg = _config()
    nf4, ref = _nf4_and_reference(cfg)
    grads = {}
    index, weights = _routing(256, [1, 2, 5, 7])
    x0 = torch.randn(256, cfg.hidden_size, device=CUDA, dtype=torch.bfloat16)
    grad_out = torch.randn(256, cfg.hidden_size, device=CUDA, dtype=torch.bfloat16)
    for key, base in (("nf4", nf4), ("ref", ref)):
        block = LoraExperts(base, ["gate_up_proj", "down_proj"], r=4, alpha=8,
                            generator=torch.Generator().manual_seed(3)).to(CUDA)
        with torch.no_grad():
            for n, p in block.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.05)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x, index, weights)
        out.backward(grad_out)
        grads[key] = {n: p.grad.float() for n, p in block.named_parameters() if p.requires_grad}
        grads[key]["x"] = x.grad.float()
    assert grads["nf4"].keys() == grads["ref"].keys() and len(grads["nf4"]) == 5
    for name, ref_grad in grads["ref"].items():
        got = grads["nf4"][name]
        assert got.abs().max() > 0, name
        assert (got - ref_grad).norm() <= 1e-2 * ref_grad.norm(), (name, ((got - ref_grad).norm() / ref_grad.norm()))


def test_peak_is_the_4bit_stack_plus_one_expert():
    """E=64 experts of a 2048-wide block: the 16-bit stacks would be 768 MiB; a step may add one expert's
    dequantized weights (12 MiB) and the activations of 512 tokens (~50 MiB), never a dequantized stack."""
    cfg = _config(experts=64, hidden=2048, inter=1024)
    torch.manual_seed(0)
    nf4 = NF4Experts(64, 2048, 1024, nn.GELU(approximate="tanh"), dtype=torch.bfloat16, device=CUDA)
    for stack in (nf4.gate_up_proj, nf4.down_proj):
        for e in range(64):
            stack.quantize_expert(e, torch.randn(stack.out_features, stack.in_features, device=CUDA) * 0.05)
    stack_16bit = 64 * 3 * 2048 * 1024 * 2
    index, weights = _routing(512, list(range(64)))
    x = torch.randn(512, cfg.hidden_size, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    nf4(x, index, weights).float().square().sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < stack_16bit / 4, (extra / 2**20, stack_16bit / 2**20)


def test_tiny_26b_qlora_step_with_expert_lora_on_cuda(tiny_dir):
    from slimtune.train.run import enable_checkpointing

    model, _ = slimtune.load_model(tiny_dir("26b-a4b", text_only=True), dtype="bfloat16", device="cuda",
                                   load_in_4bit=True)
    assert all(isinstance(layer.experts, NF4Experts) and layer.experts.gate_up_proj.packed.is_cuda
               for layer in model.model.layers)
    slimtune.add_lora(model, r=4, alpha=8, finetune_experts=True)
    enable_checkpointing(model)
    model.train()
    ids = torch.randint(5, model.config.vocab_size, (2, 64), device=CUDA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(isinstance(b, LoraExperts) for b in experts_modules(model).values())
