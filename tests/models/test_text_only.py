"""`load_model(..., text_only=True)` on a multimodal checkpoint: the decoder only, tower tensors never read, and
adapters that PEFT applies to the original multimodal model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.errors import ConfigError, DataError
from slimtune.train.config import TrainConfig

pytestmark = pytest.mark.filterwarnings("ignore:returning the tokenizer instead of the processor")

_TOWER_PREFIXES = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def _ids(n=2, t=33):
    return torch.randint(20, 250, (n, t), generator=torch.Generator().manual_seed(1))


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def test_text_only_reads_no_tower_tensor_and_matches_the_full_model(tiny_dir, checkpoint_reads):
    path = tiny_dir("e2b", text_only=False)
    full, _ = slimtune.load_model(path, dtype="float32", device="cpu")
    with checkpoint_reads() as log:
        lm, tok = slimtune.load_model(path, dtype="float32", device="cpu", text_only=True)
    reads = log["reads"]
    assert type(lm).__name__ == "Gemma4ForCausalLM" and not hasattr(tok, "image_processor")
    assert reads and all(k.startswith("model.language_model.") for k in reads), reads[:5]
    assert not [k for k in reads if k.startswith(_TOWER_PREFIXES)]
    assert not [n for n, _ in lm.named_modules() if "tower" in n or "embed_vision" in n or "embed_audio" in n]
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert all(not p.requires_grad for p in lm.parameters())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, full(input_ids=ids).logits)


def test_sharded_checkpoint_and_generation_settings(tiny_dir, tmp_path):
    import shutil

    from transformers import Gemma4ForConditionalGeneration

    path = tiny_dir("e2b", text_only=False)
    sharded = tmp_path / "sharded"
    Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).save_pretrained(
        sharded, max_shard_size="200KB")
    for f in path.iterdir():
        if not f.name.startswith("model") and not (sharded / f.name).exists():
            shutil.copy(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").is_file()
    full, _ = slimtune.load_model(path, dtype="float32", device="cpu")
    lm, _ = slimtune.load_model(sharded, dtype="float32", device="cpu", text_only=True)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, full(input_ids=ids).logits)
    assert lm.generation_config.eos_token_id == full.generation_config.eos_token_id  # incl. end of turn


def test_text_only_4bit_matches_the_full_4bit_model(tiny_dir):
    path = tiny_dir("e2b", text_only=False)
    full, _ = slimtune.load_model(path, dtype="float32", device="cpu", load_in_4bit=True)
    lm, _ = slimtune.load_model(path, dtype="float32", device="cpu", load_in_4bit=True, text_only=True)
    assert any(type(m).__name__ == "Linear4bit" for m in lm.modules())
    # train mode: bitsandbytes' CPU eval kernel cannot run the tiny model's odd widths; training dequantizes
    full.train()
    lm.train()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, full(input_ids=ids).logits)


def test_text_only_adapter_applies_to_the_multimodal_model_in_peft(tiny_dir, tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    path = tiny_dir("e2b", text_only=False)
    lm, _ = slimtune.load_model(path, dtype="float32", device="cpu", text_only=True)
    slimtune.add_lora(lm, r=4, alpha=8)
    _randomize_lora(lm)
    ids = _ids()
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
    slimtune.save_adapter(lm, tmp_path / "adapter")
    keys = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert "language_model" in keys
    base = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    n_peft = sum(1 for n, _ in peft_model.named_modules() if n.endswith(".lora_A.default"))
    assert n_peft == len(lora_modules(lm)) > 0
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - ours).abs().max() <= 1e-5
    # ours too: onto the full model, and back onto a text_only load
    for text_only in (False, True):
        model, _ = slimtune.load_model(path, dtype="float32", device="cpu", text_only=text_only)
        slimtune.load_adapter(model, tmp_path / "adapter")
        with torch.no_grad():
            assert (model(input_ids=ids).logits - ours).abs().max() <= 1e-5


def test_tower_adapter_does_not_load_onto_text_only(tiny_dir, tmp_path):
    path = tiny_dir("e2b", text_only=False)
    full, _ = slimtune.load_model(path, dtype="float32", device="cpu")
    slimtune.add_lora(full, r=4, finetune_vision_layers=True)
    slimtune.save_adapter(full, tmp_path / "adapter")
    lm, _ = slimtune.load_model(path, dtype="float32", device="cpu", text_only=True)
    with pytest.raises(ConfigError, match="without text_only"):
        slimtune.load_adapter(lm, tmp_path / "adapter")
    with pytest.raises(ConfigError, match="no vision tower"):
        slimtune.add_lora(lm, finetune_vision_layers=True)


def test_train_text_only_refuses_media_rows_and_tower_flags(tiny_dir, tmp_path):
    from slimtune.train.run import train

    path = str(tiny_dir("e2b", text_only=False))
    with pytest.raises(ConfigError, match="finetune_audio_layers=true needs the towers"):
        TrainConfig(model=path, data="d.jsonl", output="o", text_only=True, finetune_audio_layers=True)
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "path": "x.png"}]},
                          {"role": "assistant", "content": "A cat."}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TrainConfig(model=path, data=str(data), output=str(tmp_path / "run"), text_only=True, max_steps=2,
                      device="cpu", dtype="float32", max_seq_length=128)
    with pytest.raises(DataError, match="row 2 has image/audio parts.*text_only"):
        train(cfg, log=lambda *_: None)


def test_train_text_only_end_to_end(tiny_dir, tmp_path):
    from slimtune.cli.main import main

    path = str(tiny_dir("e2b", text_only=False))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello there."}]}))
    rc = main(["train", "--model", path, "--data", str(data), "--output", str(tmp_path / "run"), "--text-only",
               "--max-steps", "2", "--device", "cpu", "--dtype", "float32", "--lora-r", "4"])
    assert rc == 0
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert "text_only: true" in cfg
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert "language_model" in saved
    # the run exports as a merged MULTIMODAL model (towers untouched) equal to the text_only model + adapter
    from transformers import Gemma4ForConditionalGeneration

    from slimtune.export.api import export

    merged = export(tmp_path / "run", "merged-16bit", tmp_path / "merged", progress=False)
    lm, _ = slimtune.load_model(path, dtype="float32", device="cpu", text_only=True)
    slimtune.load_adapter(lm, tmp_path / "run" / "adapter")
    out = Gemma4ForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        assert (out(input_ids=ids).logits - lm(input_ids=ids).logits).abs().max() <= 1e-4


def test_resume_restores_a_text_only_adapter(tiny_dir, tmp_path):
    from slimtune.train.checkpoint import restore_adapter

    path = tiny_dir("e2b", text_only=False)
    models = [slimtune.load_model(path, dtype="float32", device="cpu", text_only=True)[0] for _ in range(2)]
    for seed, model in enumerate(models):
        slimtune.add_lora(model, r=4, seed=seed)
        _randomize_lora(model, seed=seed)
    slimtune.save_adapter(models[0], tmp_path / "ckpt")  # checkpoints hold checkpoint-named keys
    restore_adapter(models[1], tmp_path / "ckpt")
    a, b = lora_modules(models[0]), lora_modules(models[1])
    assert all(torch.equal(a[n].lora_B.weight, b[n].lora_B.weight) and torch.equal(a[n].lora_A.weight,
                                                                                   b[n].lora_A.weight) for n in a)
