"""NF4 MoE experts (slimtune.adapt.experts_nf4) on the tiny 26B-A4B: the NF4 module computes what transformers'
experts compute with the dequantized weights (outputs, input and expert-LoRA gradients), dequantizes only routed
experts one at a time, trains, merges and is planned as 4-bit. Streaming load (one expert slice per read, the
same bytes and logits as from_pretrained + quantize_model_nf4) is checked in tests/models/test_stream_load.py."""

import json
import weakref

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

import slimtune
from slimtune.adapt import experts_nf4
from slimtune.adapt.experts import experts_modules
from slimtune.adapt.experts_nf4 import NF4Experts, NF4ExpertStack, quantize_experts_nf4
from slimtune.errors import UnsupportedModelError

pytestmark = pytest.mark.filterwarnings("ignore:returning the tokenizer instead of the processor")


def _config(experts=6, hidden=96, inter=40):
    """A text config for a lone experts block: 96×40 gives 64-blocks and nested 256-blocks that do not align with
    the experts (60 and 120 blocks per expert), the case a flattened layout would get wrong."""
    cfg = transformers.Gemma4TextConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                                        top_k_experts=2, enable_moe_block=True, hidden_activation="gelu_pytorch_tanh")
    cfg._experts_implementation = "eager"  # the reference is transformers' own per-expert loop
    return cfg


def _experts(cfg, seed=0):
    torch.manual_seed(seed)
    block = Gemma4TextExperts(cfg)
    with torch.no_grad():
        block.gate_up_proj.normal_(0, 0.1)
        block.down_proj.normal_(0, 0.1)
    return block.requires_grad_(False)


def _dequantized(nf4: NF4Experts, cfg) -> Gemma4TextExperts:
    """transformers' module holding the weights NF4Experts computes with (fp32)."""
    ref = Gemma4TextExperts(cfg)
    ref.gate_up_proj = nn.Parameter(nf4.gate_up_proj.dequantize_all(torch.float32), requires_grad=False)
    ref.down_proj = nn.Parameter(nf4.down_proj.dequantize_all(torch.float32), requires_grad=False)
    return ref


def _bitsandbytes_reference(block: Gemma4TextExperts, cfg) -> Gemma4TextExperts:
    """transformers' module with each expert matrix quantized and dequantized by bitsandbytes on its own (as a
    Linear4bit weight): independent of NF4ExpertStack's slicing, so a wrong expert row or offset shows up."""
    import bitsandbytes.functional as bnb_f

    from slimtune.adapt.quantize import dequantize_bnb_4bit

    def roundtrip(w):
        return dequantize_bnb_4bit(*bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))

    ref = Gemma4TextExperts(cfg)
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(block, name)
        setattr(ref, name, nn.Parameter(torch.stack([roundtrip(w) for w in weight]), requires_grad=False))
    return ref


def _routing(tokens, experts, used, seed=1):
    """top-2 routing of `tokens` tokens onto the expert ids in `used` only (others get no token)."""
    g = torch.Generator().manual_seed(seed)
    used = torch.tensor(used)
    choice = torch.stack([torch.randperm(len(used), generator=g)[:2] for _ in range(tokens)])
    return used[choice], torch.rand(tokens, 2, generator=g)


def _dequant_log(monkeypatch):
    """Record every expert dequantization: (stack packed buffer, expert row) and a weakref to its result."""
    log = []
    real = experts_nf4.dequantize_parts

    def spy(parts, dtype):
        w = real(parts, dtype)
        log.append((parts[0].untyped_storage().data_ptr(), parts[0].storage_offset() // parts[0].numel(),
                     weakref.ref(w)))
        return w

    monkeypatch.setattr(experts_nf4, "dequantize_parts", spy)
    return log


@pytest.mark.parametrize("used", [[0, 2, 5], [1, 4], list(range(6))], ids=["3of6", "2of6", "all"])
def test_output_and_input_gradient_equal_the_dequantized_module(monkeypatch, used):
    cfg = _config()
    block = _experts(cfg)
    nf4 = NF4Experts.from_experts(block, torch.float32)
    ref = _bitsandbytes_reference(block, cfg)
    index, weights = _routing(37, 6, used)
    x = torch.randn(37, cfg.hidden_size, requires_grad=True)
    expect = ref(x, index, weights)
    grad_out = torch.randn(expect.shape, generator=torch.Generator().manual_seed(2))
    (g_expect,) = torch.autograd.grad(expect, x, grad_out)
    log = _dequant_log(monkeypatch)
    got = nf4(x, index, weights)
    forward = [(p, e) for p, e, _ in log]
    # no dequantized weight outlives its matmul: none is alive between forward and backward
    assert not [e for _, e, w in log if w() is not None]
    (g_got,) = torch.autograd.grad(got, x, grad_out)
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-6), (got - expect).abs().max()
    assert torch.allclose(g_got, g_expect, rtol=1e-5, atol=1e-6), (g_got - g_expect).abs().max()
    # only routed experts, each dequantized once per projection in forward and once again in backward
    stacks = {nf4.gate_up_proj.packed.untyped_storage().data_ptr(), nf4.down_proj.packed.untyped_storage().data_ptr()}
    assert sorted(forward) == sorted((p, e) for p in stacks for e in used)
    assert sorted((p, e) for p, e, _ in log[len(forward):]) == sorted(forward)


def test_an_unused_expert_changes_nothing_and_a_used_one_does():
    """Guards the slice arithmetic: corrupting a routed expert's codes moves the output, an unrouted one's not."""
    cfg = _config()
    nf4 = NF4Experts.from_experts(_experts(cfg), torch.float32)
    index, weights = _routing(20, 6, [0, 3])
    x = torch.randn(20, cfg.hidden_size)
    before = nf4(x, index, weights)
    nf4.down_proj.packed[4].fill_(0x77)
    assert torch.equal(nf4(x, index, weights), before)
    nf4.down_proj.packed[3].fill_(0x77)
    assert not torch.allclose(nf4(x, index, weights), before)


def test_stack_matches_bitsandbytes_per_expert_and_odd_sizes_work():
    import bitsandbytes.functional as bnb_f

    from slimtune.adapt.quantize import dequantize_bnb_4bit

    w = torch.randn(3, 7, 51, dtype=torch.bfloat16)  # 357 values per expert: odd bytes, partial last block
    stack = NF4ExpertStack(3, 7, 51, dtype=torch.bfloat16)
    for e in range(3):
        stack.quantize_expert(e, w[e])
    for e in range(3):
        packed, state = bnb_f.quantize_4bit(w[e], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(stack.packed[e], packed.reshape(-1))
        assert torch.equal(stack.dequantize(e), dequantize_bnb_4bit(packed, state))
        assert stack.dequantize(e).dtype == torch.bfloat16
    assert (stack.dequantize_all(torch.float32) - w.float()).abs().max() < 0.2 * w.abs().max()
    with pytest.raises(ValueError, match=r"shape \(7, 50\)"):
        stack.quantize_expert(0, torch.zeros(7, 50))
    with pytest.raises(ValueError, match="out of range"):
        stack.quantize_expert(3, w[0])


def test_non_gemma_layouts_are_refused():
    cfg = _config()
    block = _experts(cfg)
    block.is_transposed = True
    with pytest.raises(UnsupportedModelError, match="is_transposed"):
        NF4Experts.from_experts(block, torch.float32)
    block = _experts(cfg)
    block.down_proj = nn.Parameter(torch.zeros(6, 96, 41))
    with pytest.raises(UnsupportedModelError, match=r"expected \(E, 2I, H\)"):
        NF4Experts.from_experts(block, torch.float32)


@pytest.fixture
def moe_path(tiny_dir):
    return tiny_dir("26b-a4b", text_only=True)


def _randomize_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _ids(model, n=2, t=24, seed=1):
    return torch.randint(5, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _qlora(path, dequantize_experts=False, randomize=True):
    """load_in_4bit model with expert LoRA (B random unless `randomize` is False: PEFT's zero init); optionally
    its NF4 experts swapped for 16-bit dequantized copies."""
    model, _ = slimtune.load_model(path, dtype="float32", device="cpu", load_in_4bit=True)
    if dequantize_experts:
        for layer in model.model.layers:
            layer.experts = _dequantized(layer.experts, model.config)
    slimtune.add_lora(model, r=4, alpha=8, finetune_experts=True, seed=3)
    if randomize:
        _randomize_b(model)
    return model


def test_expert_lora_gradients_on_nf4_equal_those_on_dequantized_experts(moe_path):
    ours, ref = _qlora(moe_path), _qlora(moe_path, dequantize_experts=True)
    blocks = experts_modules(ours)
    assert blocks and all(isinstance(b.base_layer, NF4Experts) for b in blocks.values())
    assert all(type(b.base_layer).__name__ == "Gemma4TextExperts" for b in experts_modules(ref).values())
    ids = _ids(ours)
    ours.train(), ref.train()
    loss, loss_ref = ours(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
    loss.backward()
    loss_ref.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        g, r = p.grad, grads[name]
        assert g is not None and (g - r).norm() <= 1e-4 * r.norm() + 1e-9, name
        checked += ".adapters." in name
    assert checked == 4 * len(blocks)
    with torch.no_grad():  # inference folds each routed expert's delta into its dequantized weight
        ours.eval(), ref.eval()
        assert (ours(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-5


def test_prequantized_checkpoint_gets_nf4_experts_too(moe_path, tmp_path):
    """transformers' bitsandbytes loading keeps 3-D experts 16-bit; load_in_4bit quantizes them afterwards."""
    from slimtune.export.merge_4bit import quantize_to_nf4

    (tmp_path / "q").mkdir()
    quantize_to_nf4(moe_path, tmp_path / "q")
    with pytest.warns(UserWarning, match="not streamable"):
        model, _ = slimtune.load_model(tmp_path / "q", dtype="float32", device="cpu", load_in_4bit=True)
    assert all(isinstance(layer.experts, NF4Experts) for layer in model.model.layers)
    assert quantize_experts_nf4(model, torch.float32, "cpu") == 0


def test_merged_export_of_a_qlora_expert_run_reloads_with_our_logits(moe_path, tmp_path):
    """The adapter trained on NF4 experts is plain PEFT; merging folds its expert deltas into the 16-bit base's
    fused tensors (HF layout). Reference: our model on that 16-bit base with the adapter. The merge never sees the
    NF4 copy (it streams the base checkpoint), so the QLoRA model itself is not the reference: on this tiny random
    model NF4 rounding alone moves logits by O(1)."""
    from slimtune.export import export

    run = tmp_path / "run"
    qlora = _qlora(moe_path)
    slimtune.save_adapter(qlora, run / "adapter")
    (run / "config.yaml").write_text(f"model: {moe_path}\nload_in_4bit: true\n", encoding="utf-8")
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"][:2] == ["model.layers.0.experts.gate_up_proj", "model.layers.0.experts.down_proj"]
    out = export(run, "merged-16bit", tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.model.layers[0].experts.gate_up_proj.dim() == 3  # plain HF layout, no NF4 tensors
    ours16, _ = slimtune.load_model(moe_path, dtype="float32", device="cpu")
    slimtune.load_adapter(ours16, run / "adapter")
    plain = AutoModelForCausalLM.from_pretrained(moe_path, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 5, 364, 324, 547, 100, 200, 300, 17, 42]])
    again, _ = slimtune.load_model(moe_path, dtype="float32", device="cpu", load_in_4bit=True)
    slimtune.load_adapter(again, run / "adapter")  # and it goes back onto NF4 experts unchanged
    assert all(isinstance(b.base_layer, NF4Experts) for b in experts_modules(again).values())
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=ids).logits, qlora.eval()(input_ids=ids).logits)
        got, expect = merged(input_ids=ids).logits, ours16.eval()(input_ids=ids).logits
        base = plain(input_ids=ids).logits
    assert (got - base).abs().max() > 0.05  # the merge changed the model
    # merge rounds W + ΔW once, the live model adds the update in fp32 (measured 1.5e-5 here); a wrong expert
    # slice or B layout is O(0.1)
    assert (got - expect).abs().max() <= 5e-5
    delta = qlora.model.layers[0].experts.adapters["down_proj"].delta_weight()
    assert torch.allclose(merged.model.layers[0].experts.down_proj,
                          plain.model.layers[0].experts.down_proj + delta, atol=1e-6)
    # GGUF goes through the same 16-bit merge: the expert tensor it writes is the merged one, in bf16
    import gguf
    import numpy as np

    out = export(run, "gguf-bf16", tmp_path / "gguf", progress=False)
    (path,) = out.glob("*.gguf")
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_down_exps.weight")
    values = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type))).float()
    want = merged.model.layers[0].experts.down_proj.detach()
    assert torch.equal(values.reshape(want.shape), want.to(torch.bfloat16).float())


def test_planner_counts_26b_experts_as_4bit():
    from slimtune.memory.estimate import GIB, NF4_BYTES_PER_PARAM
    from slimtune.memory.model_shape import read_model_shape
    from slimtune.memory.planner import predict

    shape = read_model_shape("26b-a4b")
    experts = 30 * 128 * (2 * 704 * 2816 + 2816 * 704)  # gate_up (E, 2I, H) + down (E, H, I) per layer
    assert shape.quantizable >= experts and shape.other < 1e9  # embeddings, norms, routers
    plan = predict("26b-a4b", 2048, load_in_4bit=True)
    assert plan.breakdown["weights"] * GIB >= experts * NF4_BYTES_PER_PARAM
    assert plan.predicted_gib < 16  # 16-bit experts alone were 42 GiB
    assert predict("26b-a4b", 2048, load_in_4bit=False).predicted_gib > 45
