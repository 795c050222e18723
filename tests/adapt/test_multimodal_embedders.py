"""LoRA on the multimodal embedders (embed_vision / embed_audio projections): opt-in, trains, loads in PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.data.collate import collate
from slimtune.data.multimodal import load_media_front_end, tokenize_multimodal_chat
from slimtune.errors import ConfigError
from slimtune.train.loss import loss_sum

pytestmark = pytest.mark.filterwarnings("ignore:returning the tokenizer instead of the processor")

_EMBEDDERS = ("model.embed_vision.embedding_projection", "model.embed_audio.embedding_projection")


def _media_batch(path, tok):
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(48, 64, 3) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "audio", "audio": np.sin(np.linspace(0, 300, 8000)),
                                              "sampling_rate": 16_000},
                                             {"type": "text", "text": "Describe both."}]},
                {"role": "assistant", "content": "Noise and a hum."}]
    ex = tokenize_multimodal_chat(load_media_front_end(path, max_soft_tokens=70), tok, messages)
    return collate([ex], tok.pad_token_id)


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "targets"}


def test_embedders_are_off_by_default_and_opt_in(tiny_dir):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=False), dtype="float32", device="cpu")
    slimtune.add_lora(model, r=4)
    assert not [n for n in lora_modules(model) if n.startswith(_EMBEDDERS)]
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=False), dtype="float32", device="cpu")
    slimtune.add_lora(model, r=4, target_modules=["q_proj"], finetune_multimodal_embedders=True)
    assert set(_EMBEDDERS) <= set(lora_modules(model))
    text, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="no multimodal embedders"):
        slimtune.add_lora(text, finetune_multimodal_embedders=True)


def test_embedder_lora_trains_and_loads_in_peft(tiny_dir, tmp_path):
    from transformers import Gemma4ForConditionalGeneration

    path = tiny_dir("e2b", text_only=False)
    model, tok = slimtune.load_model(path, dtype="float32", device="cpu")
    tok = getattr(tok, "tokenizer", tok)
    slimtune.add_lora(model, r=4, alpha=8, finetune_multimodal_embedders=True)
    batch = _media_batch(path, tok)
    model.train()
    loss_sum(model, batch).backward()
    layers = lora_modules(model)
    for name in _EMBEDDERS:  # the image and audio soft tokens reach the loss through the embedder LoRA
        assert float(layers[name].lora_B.weight.grad.abs().sum()) > 0
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, frozen[:3]
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    model.eval()
    with torch.no_grad():
        ours = model(**_inputs(batch)).logits
    slimtune.save_adapter(model, tmp_path / "adapter")
    assert "embed_audio" in json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    base = Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(**_inputs(batch)).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert {n for n, _ in peft_model.named_modules() if n.endswith(_EMBEDDERS)}  # wrapped by PEFT too
    with torch.no_grad():
        theirs = peft_model(**_inputs(batch)).logits
    assert (theirs - ours).abs().max() <= 1e-5
    assert (plain - ours).abs().max() > 1e-3  # the adapter does change the output


def test_cli_flags_reach_the_config():
    from slimtune.cli.main import build_parser
    from slimtune.train.config_io import resolve_config

    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output", "o",
                                      "--finetune-multimodal-embedders"])
    cfg = resolve_config(None, **{k: v for k, v in vars(args).items() if k not in ("func", "command", "config")})
    assert cfg.finetune_multimodal_embedders is True and cfg.text_only is False
    bench = build_parser().parse_args(["bench", "--multimodal", "--finetune-audio-layers"])
    assert bench.multimodal and bench.finetune_audio_layers and not bench.finetune_vision_layers
