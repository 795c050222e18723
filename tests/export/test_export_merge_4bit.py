"""merged-4bit: an NF4 checkpoint in bitsandbytes' layout that from_pretrained reloads, within NF4 error.

Bounds used, and why:

* Per weight (exact): bitsandbytes scales each block of 64 weights by its absmax and rounds to the nearest of 16
  NF4 levels in [-1, 1]. The widest gap between levels is 1.0 - 0.6962 = 0.3038 (between -1 and -0.6962), so with
  the exact absmax the error is at most half of it, 0.1519 · absmax. Double quantization stores absmax itself in
  8 bits (absmax_q), adding at most |absmax - absmax_q| (a level is at most 1 in size). Hence
  |W_nf4 - W| <= 0.1519 · absmax + |absmax - absmax_q| (+ float rounding).
* Logits (relative): NF4's error is scale-free (per-block absmax), so its effect on the logits depends on the
  model, not on whether a 20%-sized LoRA update was merged. A correct export must therefore disturb the merged
  model's logits no more than NF4 disturbs the base model's: rel_err(merged) <= 1.25 · rel_err(base) + 0.05.
  (On this tiny random model both are large, ~0.8: random 10-layer Gemma 4s amplify any weight noise ~30x, so an
  absolute logit bound would say nothing. Correctness of *what* is quantized is pinned by the exact checks.)

Logits of the 4-bit model are computed from its stored codes with slimtune's plain-torch dequantizer (equal to
bitsandbytes' on supported shapes, see test_dequantizer_matches_bitsandbytes) rather than bitsandbytes' CPU
forward, whose kernel (0.50.2) is wrong for rows whose length is not a multiple of 64 (the tiny model's
per_layer_projection rows are 16 wide).
"""

from __future__ import annotations

import json

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM

from slimtune.export import export
from slimtune.adapt.quantize import bnb_block_absmax, dequantize_bnb_4bit

NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2  # 0.1519: half the widest NF4 level gap


@pytest.fixture(scope="module")
def exported(text_run, merged_text, tmp_path_factory):
    merged4 = export(text_run.run_dir, "merged-4bit", tmp_path_factory.mktemp("nf4-export") / "out", progress=False)
    return merged_text, merged4


@pytest.fixture(scope="module")
def reloaded(exported):
    """The merged-4bit folder reloaded by plain transformers, and (name, quant_state, W_nf4, W_16) per linear."""
    merged16, merged4 = exported
    q4 = AutoModelForCausalLM.from_pretrained(merged4)
    ref = AutoModelForCausalLM.from_pretrained(merged16)
    layers = [
        (name, m.weight.quant_state, dequantize_bnb_4bit(m.weight.data, m.weight.quant_state).float(),
         ref.get_submodule(name).weight.detach().float())
        for name, m in q4.named_modules()
        if isinstance(m, Linear4bit)
    ]
    return q4, layers


def test_layout_and_reload(exported, reloaded):
    _, merged4 = exported
    q4, layers = reloaded
    config = json.loads((merged4 / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (merged4 / "tokenizer.json").is_file() and not (merged4 / ".merged-16bit").exists()
    assert isinstance(q4.model.layers[0].self_attn.q_proj, Linear4bit)
    assert len(layers) > 50  # every text linear (lm_head is tied to the unquantized embedding)
    # The stored codes are exactly bitsandbytes' quantization of the merged weights (spot-check three layers).
    import bitsandbytes.functional as bnbf

    for name, state, _, w16 in layers[:3]:
        packed, expected = bnbf.quantize_4bit(
            w16, quant_type="nf4", blocksize=state.blocksize, compress_statistics=state.nested
        )
        assert torch.equal(q4.get_submodule(name).weight.data.view(torch.uint8).flatten(), packed.flatten()), name
        assert torch.equal(bnb_block_absmax(state), bnb_block_absmax(expected)), name


def test_weights_within_nf4_bound(reloaded):
    _, layers = reloaded
    worst = 0.0
    for name, state, w4, w in layers:
        blocks = w.flatten().reshape(-1, state.blocksize)
        absmax = blocks.abs().max(dim=1).values
        err = (w4.flatten().reshape(-1, state.blocksize) - blocks).abs().max(dim=1).values
        bound = NF4_HALF_GAP * absmax + (absmax - bnb_block_absmax(state)).abs() + 1e-6 * absmax
        assert bool((err <= bound).all()), (name, float((err / bound).max()))
        worst = max(worst, float((err / absmax).max()))
    print(f"worst NF4 error / block absmax: {worst:.4f} (bound {NF4_HALF_GAP:.4f} + double-quant absmax error)")


def _nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """Reference NF4 (blocks of 64, exact absmax, nearest level) in plain torch."""
    import bitsandbytes.functional as bnbf

    levels = bnbf.get_4bit_type("nf4", device="cpu").float()
    blocks = w.float().flatten().reshape(-1, 64)
    absmax = blocks.abs().max(dim=1, keepdim=True).values.clamp_min(1e-12)
    idx = (blocks / absmax).unsqueeze(-1).sub(levels).abs().argmin(dim=-1)
    return (levels[idx] * absmax).reshape(w.shape)


def test_logits_within_nf4_error(exported, reloaded, text_run):
    merged16, _ = exported
    _, layers = reloaded
    names = [name for name, *_ in layers]

    def rel_error(model_dir, weights):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            a = model(**text_run.inputs).logits
            for name in names:
                target = model.get_submodule(name).weight
                target.copy_(weights(name, target))
            b = model(**text_run.inputs).logits
        return ((b - a).norm() / a.norm()).item()

    stored = {name: w4 for name, _, w4, _ in layers}
    rel_merged = rel_error(merged16, lambda name, w: stored[name])
    rel_base = rel_error(text_run.base_dir, lambda name, w: _nf4_roundtrip(w))
    print(f"relative logit error from NF4: merged-4bit {rel_merged:.3f}, NF4(base) {rel_base:.3f}")
    assert 0 < rel_merged <= 1.25 * rel_base + 0.05


def test_dequantizer_matches_bitsandbytes():
    """slimtune's plain-torch NF4/FP4 dequantizer equals bitsandbytes' where its CPU kernel is right."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    for shape in [(128, 64), (64, 256)]:
        for double in (False, True):
            for kind in ("nf4", "fp4"):
                w = torch.randn(*shape, dtype=torch.bfloat16)
                packed, state = bnbf.quantize_4bit(w, quant_type=kind, blocksize=64, compress_statistics=double)
                assert torch.equal(dequantize_bnb_4bit(packed, state), bnbf.dequantize_4bit(packed, state))
