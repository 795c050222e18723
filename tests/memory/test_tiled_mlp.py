"""Sequence-tiled MLP: same loss and LoRA gradients as the plain MLP, with only the MLP input kept for backward."""

import pytest
import torch

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.data.collate import collate
from slimtune.data.tokenize import Example
from slimtune.errors import ConfigError
from slimtune.memory.tiled_mlp import SequenceTiledMLP, tile_decoder_mlps
from slimtune.train.run import enable_checkpointing
from slimtune.train.step import accumulate_gradients


def _model(tiny_dir, variant, *, dropout=0.0, load_in_4bit=False):
    dtype = "float32"
    model, _ = slimtune.load_model(tiny_dir(variant, text_only=True), dtype=dtype, device="cpu",
                                   load_in_4bit=load_in_4bit)
    if variant != "26b-a4b" and not load_in_4bit:
        model = model.double()  # fp64: chunked sums differ from whole ones only at 1e-16
    slimtune.add_lora(model, r=4, alpha=8, seed=2, dropout=dropout)
    torch.manual_seed(11)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    if variant != "26b-a4b" and not load_in_4bit:
        model = model.double()  # the fp32 LoRA weights too
    return model


def _batch(model, n=2, t=37):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, model.config.vocab_size, (n, t), generator=g).tolist()
    return collate([Example(x, x) for x in ids], pad_id=0)


def _grads(model, batch, dtype=torch.float32):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=dtype)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(g1, g0, rtol):
    assert g1.keys() == g0.keys()
    for name, g in g0.items():
        err = float((g1[name] - g).norm() / (g.norm() + 1e-30))
        assert err <= rtol, (name, err)


@pytest.mark.parametrize("variant", ["e2b", "31b", "26b-a4b"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_tiled_mlp_matches_plain(tiny_dir, variant, checkpointing):
    ref = _model(tiny_dir, variant)
    batch = _batch(ref)
    loss0, g0 = _grads(ref, batch)
    model = _model(tiny_dir, variant)
    assert tile_decoder_mlps(model, 16) == model.config.num_hidden_layers  # 74 tokens → 5 chunks, last partial
    if checkpointing:
        enable_checkpointing(model)
    loss1, g1 = _grads(model, batch)
    fp64 = variant != "26b-a4b"
    assert loss1 == pytest.approx(loss0, rel=1e-6 if fp64 else 1e-5)  # loss_sum reduces in fp32
    _assert_close(g1, g0, 1e-9 if fp64 else 1e-5)
    mlp_lora = [n for n, g in g1.items() if ".mlp." in n]
    assert mlp_lora and all(g1[n].abs().sum() > 0 for n in mlp_lora)


def test_names_and_state_dict_unchanged(tiny_dir):
    ref = _model(tiny_dir, "e2b")
    model = _model(tiny_dir, "e2b")
    tile_decoder_mlps(model, 8)
    assert isinstance(model.model.layers[0].mlp, SequenceTiledMLP)
    assert list(model.state_dict()) == list(ref.state_dict())
    assert model.model.layers[0].mlp.intermediate_size == ref.model.layers[0].mlp.intermediate_size  # read through
    assert tile_decoder_mlps(model, 4) == model.config.num_hidden_layers  # again: resized, not wrapped twice
    assert model.model.layers[0].mlp.chunk_size == 4 and not isinstance(model.model.layers[0].mlp.gate_proj,
                                                                         SequenceTiledMLP)


class _MLP(torch.nn.Module):
    """Gemma 4's MLP shape, standalone."""

    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.gelu(self.gate_proj(x)) * self.up_proj(x))


def test_only_the_mlp_input_is_saved():
    """The point of tiling: backward keeps x alone, not the (tokens × intermediate) gate/up activations."""
    torch.manual_seed(0)
    hidden, inter, tokens = 8, 64, 40

    x0 = torch.randn(1, tokens, hidden)

    def saved_elements(mlp):
        n = []
        x = x0.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: n.append(t.numel()) or t, lambda t: t):
            y = mlp(x)  # what the forward leaves for backward
        y.sum().backward()
        return sum(n), x.grad

    plain = _MLP(hidden, inter)
    tiled = SequenceTiledMLP(_MLP(hidden, inter), chunk_size=8)
    tiled.load_state_dict(plain.state_dict())
    n_plain, gx0 = saved_elements(plain)
    n_tiled, gx1 = saved_elements(tiled)
    assert n_plain >= 3 * tokens * inter
    assert n_tiled == tokens * hidden  # x alone: no intermediate, not even the weights
    torch.testing.assert_close(gx1, gx0)
    for p_t, p in zip(tiled.parameters(), plain.parameters()):
        torch.testing.assert_close(p_t.grad, p.grad)


def test_nf4_base_lora_gradients(tiny_dir):
    ref = _model(tiny_dir, "e2b", load_in_4bit=True)
    batch = _batch(ref)
    loss0, g0 = _grads(ref, batch)
    model = _model(tiny_dir, "e2b", load_in_4bit=True)
    tile_decoder_mlps(model, 16)
    enable_checkpointing(model)
    loss1, g1 = _grads(model, batch)
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    _assert_close(g1, g0, 1e-4)


def test_lora_dropout_masks_are_replayed_in_backward(tiny_dir):
    """With dropout the tiled MLP equals running the same chunks through plain autograd from the same RNG state:
    backward's recompute drew the masks forward drew (a wrong replay gives gradients of other masks)."""
    model = _model(tiny_dir, "31b", dropout=0.3)
    model.train()
    tiled = SequenceTiledMLP(model.model.layers[0].mlp, chunk_size=16)
    x = torch.randn(2, 37, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    params = tiled.trainable_parameters()

    torch.manual_seed(123)
    flat = x.reshape(-1, x.shape[-1])
    ref = torch.cat([tiled.run_mlp(flat[s:e]) for s, e in tiled.chunks(flat.shape[0])]).reshape(x.shape)
    w = torch.randn(ref.shape, dtype=ref.dtype)
    ref_grads = torch.autograd.grad((ref * w).sum(), [x, *params])

    torch.manual_seed(123)
    out = tiled(x)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad((out * w).sum(), [x, *params])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_chunk_size_must_be_positive(tiny_dir):
    model = _model(tiny_dir, "31b")
    with pytest.raises(ConfigError, match="mlp_chunk_size"):
        tile_decoder_mlps(model, 0)


def test_backward_recompute_runs_under_the_forwards_autocast():
    """Backward runs outside autocast; the recompute must still see bf16 like the forward did (and vice versa)."""
    torch.manual_seed(0)
    tiled = SequenceTiledMLP(_MLP(8, 32), chunk_size=4)
    seen = []
    tiled.gate_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(2, 6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tiled(x)
    y.float().sum().backward()
    assert len(seen) == 6 and set(seen) == {torch.bfloat16}  # 3 chunks in forward, 3 recomputed in backward
    seen.clear()
    tiled(x).sum().backward()
    assert len(seen) == 6 and set(seen) == {torch.float32}
