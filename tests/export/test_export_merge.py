"""merged-16bit: plain transformers on the merged folder reproduces the PEFT model, and the merge streams."""

from __future__ import annotations

import json
import shutil
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
)

from slimtune.export import checkpoint as ckpt_io
from slimtune.export import export
from slimtune.export.lora_plan import load_adapter_plan
from slimtune.export.source import read_json

LOGIT_TOL = 1e-5  # fp32; measured 2-8e-6 (merge is exact, the rest is fp32 matmul-order noise)


def test_text_merge_matches_peft_logits(text_run, merged_text):
    out = merged_text

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) > 5  # the base's shards, one output each
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = model(**text_run.inputs).logits
    diff = (logits - text_run.logits).abs().max().item()
    print(f"text merged vs PEFT max abs diff: {diff:.3g}")
    assert diff <= LOGIT_TOL
    # Sanity: the adapter really changes the model, so the check above is not vacuous.
    base = AutoModelForCausalLM.from_pretrained(text_run.base_dir).eval()
    with torch.no_grad():
        assert (base(**text_run.inputs).logits - text_run.logits).abs().max().item() > 1e-2


def test_multimodal_merge_matches_peft_logits(mm_run, merged_mm):
    adapter_keys = safe_open(str(mm_run.run_dir / "adapter" / "adapter_model.safetensors"), "pt").keys()
    assert any(".vision_tower." in k and ".linear.lora_A" in k for k in adapter_keys)
    assert any(".audio_tower." in k and ".linear.lora_A" in k for k in adapter_keys)

    model = AutoModelForImageTextToText.from_pretrained(merged_mm).eval()
    with torch.no_grad():
        logits = model(**mm_run.inputs).logits
    diff = (logits - mm_run.logits).abs().max().item()
    print(f"multimodal merged vs PEFT max abs diff: {diff:.3g}")
    # fp32 matmul-order noise through the towers reaches ~1.5e-5 on this random model (fp64 evaluation is not
    # possible: transformers' audio attention hard-codes fp32); a wrong scale or transpose is O(0.1).
    assert diff <= 3 * LOGIT_TOL


def test_scales_follow_rslora_and_patterns(text_run):
    """Every module's scale equals the one PEFT used (rsLoRA alpha/sqrt(r), rank_pattern, alpha_pattern)."""
    config = read_json(text_run.run_dir / "adapter" / "adapter_config.json")
    plan = load_adapter_plan(text_run.run_dir / "adapter", config)
    ours = {d.module: d.scale for d in plan.deltas}
    assert ours.keys() == text_run.scalings.keys()
    for module, scale in ours.items():
        assert scale == pytest.approx(text_run.scalings[module], rel=1e-12), module
    assert len(set(ours.values())) == 4  # default, down_proj rank 4, o_proj alpha 3, one q_proj rank 2


def test_embedding_lora_and_modules_to_save(text_base, tmp_path):
    """Embedding LoRA merges as E + s·(B @ A)^T on top of the `base_layer.weight` copy PEFT saves with it, and
    modules_to_save tensors replace the base's."""
    model = AutoModelForCausalLM.from_pretrained(text_base)
    lora = LoraConfig(r=3, lora_alpha=5, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False,
                      modules_to_save=["per_layer_projection_norm"])
    peft_model = get_peft_model(model, lora)
    inner = peft_model.base_model.model.model
    with torch.no_grad():
        inner.per_layer_projection_norm.modules_to_save["default"].weight.fill_(0.5)
    expected = (inner.embed_tokens.base_layer.weight + inner.embed_tokens.get_delta_weight("default")).detach()
    peft_model.save_pretrained(tmp_path / "adapter")

    out = export(tmp_path / "adapter", "merged-16bit", tmp_path / "merged", progress=False)

    merged = ckpt_io.Checkpoint.open(out)
    torch.testing.assert_close(merged.get_tensor("model.embed_tokens.weight"), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(merged.get_tensor("model.per_layer_projection_norm.weight"), torch.full((16,), 0.5))


def test_merge_never_holds_two_shards(text_run, tmp_path, monkeypatch):
    """Instrument the shard reader: when a shard is read, every tensor of the previous one has been freed."""
    reads: list[list[weakref.ref]] = []
    real_read = ckpt_io.read_shard

    def tracking_read(path):
        for refs in reads:
            alive = sum(r() is not None for r in refs)
            assert alive == 0, f"{alive} tensors of an earlier shard are still alive while reading {path.name}"
        tensors = real_read(path)
        reads.append([weakref.ref(t) for t in tensors.values()])
        return tensors

    monkeypatch.setattr(ckpt_io, "read_shard", tracking_read)
    export(text_run.run_dir, "merged-16bit", tmp_path / "merged", progress=False)
    shards = set(read_json(text_run.base_dir / "model.safetensors.index.json")["weight_map"].values())
    assert len(reads) == len(shards) > 5


@pytest.fixture(scope="module")
def nf4_base(text_run, tmp_path_factory):
    """A pre-quantized bitsandbytes NF4 checkpoint (double quantization, bf16) of the tiny text base."""
    out = tmp_path_factory.mktemp("nf4-base") / "gemma4-tiny-bnb-4bit"
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(text_run.base_dir, quantization_config=quant, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="1MB")
    return out


def test_merge_onto_bnb_4bit_base(text_run, nf4_base, tmp_path):
    import bitsandbytes.functional as bnbf

    run = tmp_path / "run"
    shutil.copytree(text_run.run_dir / "adapter", run / "adapter")
    (run / "config.yaml").write_text(f"model: {nf4_base}\nload_in_4bit: true\n", encoding="utf-8")
    out = export(run, "merged-16bit", tmp_path / "merged", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = ckpt_io.Checkpoint.open(out)
    base = ckpt_io.Checkpoint.open(nf4_base)
    assert not any(".absmax" in k or ".quant_state." in k for k in merged.tensor_names())
    plan = load_adapter_plan(text_run.run_dir / "adapter", read_json(text_run.run_dir / "adapter" / "adapter_config.json"))
    deltas = {d.module + ".weight": d for d in plan.deltas}
    key = "model.layers.0.self_attn.q_proj.weight"
    qs = {k[len(key) + 1:]: base.get_tensor(k) for k in base.tensor_names() if k.startswith(key + ".")}
    dequant = bnbf.dequantize_4bit(base.get_tensor(key), bnbf.QuantState.from_dict(qs, torch.device("cpu")))
    expected = (dequant.float() + deltas[key].delta()).to(torch.bfloat16)
    got = merged.get_tensor(key)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The merged folder loads with plain transformers, unquantized.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
