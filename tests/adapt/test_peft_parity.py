"""Our loading, LoRA and adapter files agree with plain transformers and PEFT."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.adapt.quantize import dequantize_bnb_4bit, dequantize_nf4_weight, is_nf4_linear


def _auto_class(model):
    import transformers

    return getattr(transformers, type(model).__name__)


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def _ids(model, n=2, t=40):
    return torch.randint(5, model.config.get_text_config().vocab_size, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("text_only", [True, False])
def test_loaded_model_matches_transformers(tiny_dir, text_only):
    path = tiny_dir("e2b", text_only=text_only)
    ours, _ = slimtune.load_model(path, dtype="float32", device="cpu")
    ref = _auto_class(ours).from_pretrained(path, dtype=torch.float32).eval()
    ids = _ids(ours)
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert all(not p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("text_only", [True, False])
def test_our_adapter_loads_in_peft(tiny_dir, tmp_path, text_only):
    path = tiny_dir("e2b", text_only=text_only)
    ours, _ = slimtune.load_model(path, dtype="float32", device="cpu")
    slimtune.add_lora(ours, r=4, alpha=8, use_rslora=True, finetune_vision_layers=not text_only,
                      finetune_audio_layers=not text_only)
    _randomize_lora(ours)
    ids = _ids(ours)
    with torch.no_grad():
        ours_logits = ours(input_ids=ids).logits
    slimtune.save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is True
    base = _auto_class(ours).from_pretrained(path, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    assert (ours_logits - peft_logits).abs().max() <= 1e-5
    n_ours = len(lora_modules(ours))
    n_peft = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default"))
    assert n_ours == n_peft > 0
    if not text_only:  # tower LoRA sits on the inner .linear of Gemma4ClippableLinear
        assert any("vision_tower" in n and n.endswith(".linear") for n in lora_modules(ours))
        assert any("audio_tower" in n for n in lora_modules(ours))


def test_peft_adapter_loads_in_ours(tiny_dir, tmp_path):
    path = tiny_dir("e2b", text_only=True)
    base, _ = slimtune.load_model(path, dtype="float32", device="cpu")
    ref = _auto_class(base).from_pretrained(path, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"down_proj": 4}, alpha_pattern={"down_proj": 2})
    peft_model = get_peft_model(ref, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    peft_model.eval()
    ids = _ids(base)
    with torch.no_grad():
        expect = peft_model(input_ids=ids).logits
        slimtune.load_adapter(base, tmp_path / "peft")
        got = base(input_ids=ids).logits
    assert (expect - got).abs().max() <= 1e-5
    ranks = {layer.r for layer in lora_modules(base).values()}
    assert ranks == {8, 4}


def test_nf4_loading_matches_bitsandbytes_dequantization(tiny_dir):
    import bitsandbytes as bnb

    path = tiny_dir("e2b", text_only=True)
    q, _ = slimtune.load_model(path, dtype="float32", load_in_4bit=True, device="cpu")
    ref, _ = slimtune.load_model(path, dtype="float32", device="cpu")
    quantized = {n: m for n, m in q.named_modules() if is_nf4_linear(m)}
    assert quantized and all(not p.requires_grad for p in q.parameters())
    for name, module in quantized.items():
        w = ref.get_submodule(name).weight
        deq = dequantize_nf4_weight(module)
        # our module must hold exactly what bitsandbytes produces for this weight
        p4 = bnb.nn.Params4bit(w.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
        assert torch.equal(deq, dequantize_bnb_4bit(p4.data, p4.quant_state))
        # 4-bit rounding keeps the relative error near 0.1 (max 0.095 here); a transposed or misaligned block
        # layout gives ~1.4. (bitsandbytes' own CPU dequantize_4bit reads rows whose length is not a multiple of
        # 64 wrongly, ~0.3 here: we use the pure-torch dequantizer.)
        assert (deq - w).norm() / w.norm() <= 0.15
    x = torch.randn(3, 7, q.config.hidden_size)
    name, module = next(iter(quantized.items()))
    if module.in_features == q.config.hidden_size:
        q.eval()
        with torch.no_grad():
            y = module(x)  # an eval forward may repack the weights for bitsandbytes' CPU kernel
        assert y.dtype == torch.float32, y.dtype
        ref_y = x @ dequantize_nf4_weight(module).float().T
        # bitsandbytes' CPU inference kernel computes in bf16: bf16-level agreement, not fp32
        assert (y - ref_y).norm() / ref_y.norm() <= 1e-2
        q.train()
        y_train = module(x)  # the training path dequantizes in the compute dtype
        assert torch.allclose(y_train, ref_y, atol=1e-5)
    # no frozen weight is upcast to fp32 when loading in 16-bit
    q16, _ = slimtune.load_model(path, dtype="bfloat16", load_in_4bit=True, device="cpu")
    assert not [n for n, p in q16.named_parameters() if p.dtype == torch.float32]
