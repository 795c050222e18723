"""Fixtures for export tests: tiny Gemma 4 bases, PEFT adapters trained on nothing, and their reference logits.

Adapters are made with ``peft.get_peft_model(..., init_lora_weights=False)`` so that lora_B is non-zero (PEFT's
default zero-init would make every merge trivially correct), then scaled down to a realistic update size.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Gemma4ForConditionalGeneration

# LoRA targets for the multimodal model: text projections, the inner `.linear` of every Gemma4ClippableLinear in
# the vision and audio towers, the audio relative-position projection and both embedding projections.
MM_TARGETS = (
    r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    r"|model\.(vision_tower|audio_tower)\..*\.linear|.*relative_k_proj|.*embedding_projection"
)
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# 8 tokens: long enough to exercise attention, short enough that fp32 rounding noise stays far below 1e-5.
TEXT_IDS = torch.tensor([[2, 5, 364, 324, 547, 100, 200, 300]])


@dataclass
class Run:
    """A training-run folder (adapter/ + config.yaml) and what the PEFT model computed."""

    run_dir: Path
    base_dir: Path
    inputs: dict | None
    logits: torch.Tensor | None
    scalings: dict[str, float]


def _copy_aux(src: Path, dst: Path) -> None:
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith((".safetensors", ".index.json")) and p.name != "config.json":
            shutil.copy2(p, dst / p.name)


def make_run(
    model, base_dir: Path, run_dir: Path, lora: LoraConfig, inputs: dict | None, *, rel_update: float = 0.2
) -> Run:
    """Wrap `model` with LoRA, save RUN_DIR/adapter + RUN_DIR/config.yaml, and record PEFT's logits.

    Each lora_B is rescaled so that ``||scale · B @ A|| = rel_update · ||W||``: a trained adapter's size, large
    enough that a wrong scale or transpose shows up as an O(0.1) logit error.
    """
    torch.manual_seed(0)  # the adapter does not depend on which test built the fixture first
    peft_model = get_peft_model(model, lora).eval()
    with torch.no_grad():
        for m in peft_model.modules():
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling and hasattr(m, "lora_A"):
                delta = m.get_delta_weight("default")
                m.lora_B["default"].weight.mul_(rel_update * m.weight.norm() / delta.norm())
        logits = peft_model(**inputs).logits if inputs is not None else None  # None: caller needs no reference
    scalings = {
        name.removeprefix("base_model.model."): m.scaling["default"]
        for name, m in peft_model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    }
    peft_model.save_pretrained(run_dir / "adapter")
    (run_dir / "config.yaml").write_text(f"model: {base_dir}\nload_in_4bit: false\n", encoding="utf-8")
    return Run(run_dir, base_dir, inputs, logits, scalings)


@pytest.fixture(scope="session")
def text_base(tiny_dir, tmp_path_factory) -> Path:
    """The tiny E2B text model re-saved as ~11 safetensors shards (so merges really stream)."""
    src = tiny_dir("e2b", text_only=True)
    out = tmp_path_factory.mktemp("text-base") / "gemma4-tiny-text"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, max_shard_size="1MB")
    _copy_aux(src, out)
    return out


@pytest.fixture(scope="session")
def text_run(text_base, tmp_path_factory) -> Run:
    """Non-default LoRA on every text projection: rsLoRA, alpha != r, per-module rank and alpha patterns."""
    lora = LoraConfig(
        r=8,
        lora_alpha=32,
        use_rslora=True,
        target_modules=TEXT_TARGETS,
        rank_pattern={"down_proj": 4, "layers.1.self_attn.q_proj": 2},
        alpha_pattern={"o_proj": 3},
        init_lora_weights=False,
    )
    model = AutoModelForCausalLM.from_pretrained(text_base)
    return make_run(model, text_base, tmp_path_factory.mktemp("text-run"), lora, {"input_ids": TEXT_IDS})


def mm_inputs(config) -> dict:
    """A 6x6-patch image (4 soft tokens) and 16 audio frames (4 soft tokens) with their placeholders."""
    g = torch.Generator().manual_seed(0)
    patch = config.vision_config.patch_size
    pos = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="xy"), -1).reshape(1, 36, 2)
    mel = config.audio_config.subsampling_conv_channels[0]
    ids = (
        [2, config.boi_token_id] + [config.image_token_id] * 4 + [config.eoi_token_id, config.boa_token_id]
        + [config.audio_token_id] * 4 + [config.eoa_token_index, 100, 200]
    )
    return {
        "input_ids": torch.tensor([ids]),
        "pixel_values": torch.rand(1, 36, 3 * patch * patch, generator=g),
        "image_position_ids": pos,
        "input_features": torch.randn(1, 16, mel, generator=g),
        "input_features_mask": torch.ones(1, 16, dtype=torch.bool),
    }


@pytest.fixture(scope="session")
def mm_run(tiny_dir, tmp_path_factory) -> Run:
    """LoRA on text, vision and audio (inner `.linear` of the clipped linears) of the tiny multimodal E2B."""
    base = tiny_dir("e2b", text_only=False)
    model = Gemma4ForConditionalGeneration.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=MM_TARGETS, init_lora_weights=False)
    return make_run(model, base, tmp_path_factory.mktemp("mm-run"), lora, mm_inputs(model.config))


@pytest.fixture(scope="session")
def merged_text(text_run, tmp_path_factory) -> Path:
    """`text_run` exported as merged-16bit (shared by the merge, NF4 and GGUF tests)."""
    from slimtune.export import export

    return export(text_run.run_dir, "merged-16bit", tmp_path_factory.mktemp("merged-text") / "out", progress=False)


@pytest.fixture(scope="session")
def merged_mm(mm_run, tmp_path_factory) -> Path:
    """`mm_run` exported as merged-16bit."""
    from slimtune.export import export

    return export(mm_run.run_dir, "merged-16bit", tmp_path_factory.mktemp("merged-mm") / "out", progress=False)
