"""Merging an expert LoRA (finetune_experts / PEFT target_parameters) into the tiny 26B-A4B checkpoint."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import slimtune
from slimtune.errors import ExportError
from slimtune.export import export
from slimtune.export.lora_plan import load_adapter_plan


def _trained_run(base, run_dir):
    model, _ = slimtune.load_model(base, dtype="float32", device="cpu")
    slimtune.add_lora(model, r=4, alpha=8, finetune_experts=True)
    g = torch.Generator().manual_seed(0)  # B ~ 0.03·N(0,1): the update moves logits by ~1, like a trained adapter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.03)
    slimtune.save_adapter(model, run_dir / "adapter")
    (run_dir / "config.yaml").write_text(f"model: {base}\nload_in_4bit: false\n", encoding="utf-8")
    return model


def test_expert_lora_merges_into_the_fused_tensors(tiny_dir, tmp_path):
    base = tiny_dir("26b-a4b", text_only=True)
    ours = _trained_run(base, tmp_path / "run")
    ids = torch.tensor([[2, 5, 364, 324, 547, 100, 200, 300, 17, 42]])
    with torch.no_grad():
        expect = ours(input_ids=ids).logits
    plan = load_adapter_plan(tmp_path / "run" / "adapter",
                             json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text()))
    experts = [d for d in plan.deltas if d.kind == "experts"]
    assert {d.module.rsplit(".", 1)[1] for d in experts} == {"gate_up_proj", "down_proj"}
    assert len(experts) == 2 * ours.config.num_hidden_layers and all(d.num_experts == 4 for d in experts)
    out = export(tmp_path / "run", "merged-16bit", tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        before = plain(input_ids=ids).logits
    assert (got - before).abs().max() > 0.1  # the merge changed the model, experts included
    # merge rounds W + ΔW once (fp64); the live model adds in fp32: measured 8e-6 on one CPU and 1.5e-5 on one with
    # AVX512-FP16/AMX (other fp32 kernels); a wrong expert slice or B layout (rank-major columns) is O(0.1)
    assert (got - expect).abs().max() <= 1e-4
    layer = merged.model.layers[0].experts
    ref_delta = ours.model.layers[0].experts.adapters["down_proj"].delta_weight()
    assert torch.allclose(layer.down_proj, plain.model.layers[0].experts.down_proj + ref_delta, atol=1e-6)


def test_other_raw_parameters_are_refused(tiny_dir, tmp_path):
    _trained_run(tiny_dir("26b-a4b", text_only=True), tmp_path / "run")
    cfg_path = tmp_path / "run" / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_parameters"] = ["experts.gate_up_proj"]  # the file also holds down_proj's pair
    with pytest.raises(ExportError, match="only the fused MoE expert tensors"):
        load_adapter_plan(tmp_path / "run" / "adapter", cfg)
