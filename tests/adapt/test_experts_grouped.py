"""Grouped-GEMM experts (slimtune.adapt.experts_grouped) against the per-expert loop, on CPU in fp32 (torch's CPU
_grouped_mm): outputs, input gradients and expert-LoRA gradients, NF4 and 16-bit bases, under uneven routing with
experts that get no token or exactly one, expert-parallel sentinels, an unpadded and a padded rank, and a whole
tiny 26B-A4B QLoRA model. CUDA bf16 at the real 26B-A4B shapes: tests/adapt/test_experts_grouped_gpu.py."""

import pytest
import torch
import transformers
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

import slimtune
from slimtune.adapt import experts_grouped
from slimtune.adapt.experts import LoraExperts, experts_modules
from slimtune.adapt.experts_grouped import experts_impl, set_experts_impl, use_grouped
from slimtune.adapt.experts_nf4 import NF4Experts

pytestmark = [pytest.mark.filterwarnings("ignore:returning the tokenizer instead of the processor"),
              pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")]

E, H, INTER, TOP_K, T = 12, 64, 24, 4, 40  # 26B-A4B-like: many experts, top-k of 8 scaled down, widths % 8 == 0
EMPTY, SINGLE = 3, 7  # expert 3 gets no token, expert 7 exactly one


def _config():
    cfg = transformers.Gemma4TextConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E,
                                        top_k_experts=TOP_K, enable_moe_block=True,
                                        hidden_activation="gelu_pytorch_tanh")
    cfg._experts_implementation = "eager"
    return cfg


def _block(seed=0):
    torch.manual_seed(seed)
    block = Gemma4TextExperts(_config())
    with torch.no_grad():
        block.gate_up_proj.normal_(0, 0.1)
        block.down_proj.normal_(0, 0.1)
    return block.requires_grad_(False)


def _routing(seed=1):
    """Uneven top-4 routing: expert e drawn with weight ∝ (e + 1)², expert EMPTY never, SINGLE once (token 5)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, E + 1, dtype=torch.float) ** 2
    p[EMPTY] = p[SINGLE] = 0
    index = torch.stack([torch.multinomial(p, TOP_K, generator=g) for _ in range(T)])
    index[5, 2] = SINGLE
    counts = torch.bincount(index.reshape(-1), minlength=E)
    assert counts[EMPTY] == 0 and counts[SINGLE] == 1 and counts.max() >= 4 * counts[counts > 0].min()
    return index, torch.rand(T, TOP_K, generator=g)


def _lora(base, r, seed=3):
    block = LoraExperts(base, ["gate_up_proj", "down_proj"], r=r, alpha=2 * r,
                        generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in block.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return block


def _run(module, impl, index, weights, calls):
    """Output, input gradient and every trainable gradient of one forward + backward under `impl`."""
    module.zero_grad(set_to_none=True)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    grad_out = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    before = calls[0]
    with experts_impl(impl):
        y = module(x, index, weights)
    y.backward(grad_out)
    assert (calls[0] > before) == (impl == "grouped"), "the path that ran is not the one asked for"
    return {"y": y.detach(), "x": x.grad, **{n: p.grad for n, p in module.named_parameters() if p.requires_grad}}


@pytest.fixture
def calls(monkeypatch):
    """Count torch._grouped_mm calls, so a test knows which path ran."""
    count = [0]
    real = torch._grouped_mm

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    return count


def _assert_equal(got, expect):
    assert got.keys() == expect.keys()
    for name, ref in expect.items():
        assert ref is not None and ref.abs().max() > 0, name
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("base_kind", ["nf4", "16bit"])
@pytest.mark.parametrize("r", [3, 8], ids=["r3-padded", "r8"])
def test_expert_lora_grouped_equals_loop(base_kind, r, calls):
    block = _block()
    base = NF4Experts.from_experts(block, torch.float32, "cpu") if base_kind == "nf4" else block
    module = _lora(base, r)
    index, weights = _routing()
    loop, grouped = _run(module, "loop", index, weights, calls), _run(module, "grouped", index, weights, calls)
    assert len(loop) == 6  # y, x and A, B of both projections
    _assert_equal(grouped, loop)
    # the expert without tokens gets exactly zero LoRA gradient, the single-token one a non-zero one
    for name, adapter in module.adapters.items():
        a_grad = grouped[f"adapters.{name}.lora_A"].view(E, r, -1)
        assert a_grad[EMPTY].abs().max() == 0 and a_grad[SINGLE].abs().max() > 0, name


@pytest.mark.parametrize("params", [["gate_up_proj"], ["down_proj"]])
def test_one_adapted_tensor_on_a_16bit_base_grouped_equals_loop(params, calls):
    """The other projection runs the base product alone (no factors) inside the same grouped node."""
    module = LoraExperts(_block(), params, r=5, alpha=5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)) * 0.1)
    index, weights = _routing()
    loop = _run(module, "loop", index, weights, calls)
    assert len(loop) == 4
    _assert_equal(_run(module, "grouped", index, weights, calls), loop)


def test_nf4_experts_grouped_equals_loop(calls):
    nf4 = NF4Experts.from_experts(_block(), torch.float32, "cpu")
    index, weights = _routing()
    _assert_equal(_run(nf4, "grouped", index, weights, calls), _run(nf4, "loop", index, weights, calls))


def test_no_grad_inference_and_sentinel_ids(calls):
    """Under no_grad the loop folds each expert's delta; grouped keeps the factors apart: same output. Ids >= E
    (expert-parallel sentinels) contribute nothing on either path."""
    module = _lora(NF4Experts.from_experts(_block(), torch.float32, "cpu"), 4)
    index, weights = _routing()
    index[::3, 1] = E  # a sentinel in every third token
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with experts_impl("loop"):
            expect = module(x, index, weights)
        with experts_impl("grouped"):
            got = module(x, index, weights)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    x.requires_grad_(True)
    grads = {impl: _run(module, impl, index, weights, calls) for impl in ("loop", "grouped")}
    _assert_equal(grads["grouped"], grads["loop"])


def test_bf16_autocast_grouped_is_close_to_loop(calls):
    """CPU bf16 autocast: both paths run 16-bit products from fp32 factors; equal within bf16 rounding."""
    module = _lora(_block().to(torch.bfloat16), 8)
    index, weights = _routing()
    out = {}
    for impl in ("loop", "grouped"):
        module.zero_grad(set_to_none=True)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), experts_impl(impl):
            y = module(x, index, weights)
        y.float().square().sum().backward()
        out[impl] = {"y": y.float(), "x": x.grad.float(),
                     **{n: p.grad for n, p in module.named_parameters() if p.requires_grad}}
    for name, ref in out["loop"].items():
        got = out["grouped"][name]
        assert got.dtype == ref.dtype and (got - ref).norm() <= 2e-2 * ref.norm(), name


def test_dequantize_all_is_every_expert():
    stack = NF4Experts.from_experts(_block(), torch.float32, "cpu").gate_up_proj
    want = torch.stack([stack.dequantize(e, torch.float32) for e in range(stack.num_experts)])
    assert torch.equal(stack.dequantize_all(torch.float32), want)


def test_auto_is_the_loop_on_cpu_and_the_switch_is_checked():
    x = torch.zeros(2, H)
    with experts_impl("auto"):
        assert not use_grouped(x, (H, INTER))  # CPU: the loop is the reference
    with experts_impl("grouped"):
        assert use_grouped(x, (H, INTER))
    with pytest.raises(ValueError, match="one of"):
        set_experts_impl("fast")
    assert experts_grouped.IMPL in experts_grouped.IMPLS


def test_tiny_26b_qlora_expert_lora_model_grouped_equals_loop(tiny_dir, calls):
    """The whole tiny 26B-A4B (NF4 experts + expert LoRA + attention/MLP LoRA): same loss and gradients."""
    model, _ = slimtune.load_model(tiny_dir("26b-a4b", text_only=True), dtype="float32", device="cpu",
                                   load_in_4bit=True)
    slimtune.add_lora(model, r=4, alpha=8, finetune_experts=True, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assert all(isinstance(b.base_layer, NF4Experts) for b in experts_modules(model).values())
    ids = torch.randint(5, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    model.train()
    result = {}
    for impl in ("loop", "grouped"):
        model.zero_grad(set_to_none=True)
        before = calls[0]
        with experts_impl(impl):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert (calls[0] > before) == (impl == "grouped")
        result[impl] = (loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert abs(result["grouped"][0] - result["loop"][0]) <= 1e-6
    for name, ref in result["loop"][1].items():
        got = result["grouped"][1][name]
        assert (got - ref).norm() <= 1e-5 * ref.norm() + 1e-9, name


def test_planner_counts_one_dequantized_gate_up_stack_for_26b_qlora():
    from slimtune.memory.estimate import GIB
    from slimtune.memory.planner import predict

    stack = 128 * 2 * 704 * 2816  # gate_up (E, 2I, H): the larger of the two, dequantized alone
    qlora = predict("26b-a4b", 2048, load_in_4bit=True)
    assert qlora.breakdown["nf4_expert_stack"] * GIB == pytest.approx(stack * (2 + 1 / 8), rel=1e-3)
    assert predict("26b-a4b", 2048, load_in_4bit=False).breakdown.get("nf4_expert_stack", 0) == 0


def test_without_factors_the_input_rows_are_not_saved():
    """NF4Experts alone (QLoRA without expert LoRA): dx needs only dy and W, so the node must not keep its T·k
    input rows (the loop's NF4ExpertMatmul keeps none); the activation between the projections is autograd's."""
    nf4 = NF4Experts.from_experts(_block(), torch.float32, "cpu")
    index, weights = _routing()
    x = torch.randn(T, H, requires_grad=True)
    rows = x.detach()[experts_grouped._sort(index, E)[1]]  # the gathered input, sorted by expert
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.detach()) or t, lambda t: t), \
            experts_impl("grouped"):
        nf4(x, index, weights)
    assert saved and not any(t.shape == rows.shape and torch.equal(t, rows) for t in saved)


def test_dispatch_and_combine_are_exact():
    """Routing rows out to the experts and back (float64): the values and gradients of x[token], and of the
    weighted sum Σ_k w[t, k]·y[row of (t, k)] written with index_add_, sentinel expert ids included."""
    dtype = torch.float64
    index, weights = _routing()
    index[3, 1] = E  # an expert-parallel sentinel: its row exists, with weight 0
    order, token, inv, _, _ = experts_grouped._sort(index, E)
    pairs = torch.arange(T).repeat_interleave(TOP_K)
    assert torch.equal(token[inv], pairs) and torch.equal(order[inv], torch.arange(T * TOP_K))
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    y = torch.randn(T * TOP_K, H, dtype=dtype, requires_grad=True)
    w = weights.to(dtype).requires_grad_(True)
    torch.autograd.gradcheck(lambda a: experts_grouped._Dispatch.apply(a, token, inv, TOP_K), (x,))
    torch.autograd.gradcheck(lambda b: experts_grouped._Unsort.apply(b, inv, order), (y,))
    assert torch.equal(experts_grouped._Dispatch.apply(x, token, inv, TOP_K), x[token])
    got = experts_grouped._combine(y, inv, order, index, w, E)
    kept = w.masked_fill(index >= E, 0).reshape(-1)[order]
    want = torch.zeros(T, H, dtype=dtype).index_add_(0, token, y * kept[:, None])
    torch.testing.assert_close(got, want)
    g = torch.randn(T, H, dtype=dtype)
    grads = torch.autograd.grad(got, (y, w), g)
    torch.testing.assert_close(grads, torch.autograd.grad(want, (y, w), g))
    assert grads[1][3, 1] == 0  # the sentinel's weight gets no gradient


def test_the_grouped_path_never_scatters_with_atomic_adds():
    """index_add_ and x[token]'s backward (index_put_ with accumulate) add into rows with atomics on CUDA: slow
    (26B-A4B: 22 ms of a 408 ms step) and, in bf16, rounded after each of a token's k additions in no fixed order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    lora = _lora(_block(), r=4)
    index, weights = _routing()
    x = torch.randn(T, H, requires_grad=True)
    with experts_impl("grouped"), Ops() as ops:
        lora(x, index, weights).square().sum().backward()
    assert "_grouped_mm" in ops.names and "index_select" in ops.names  # the mode saw the forward and the backward
    assert not {n for n in ops.names if n.startswith(("index_add", "index_put", "_index_put"))}, ops.names
    assert x.grad is not None and torch.isfinite(x.grad).all()
