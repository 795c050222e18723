"""fp16 (GPUs without bf16): text, vision and audio towers train with finite loss and gradients (failure mode 4).

The audio tower masks attention logits with -1e9, which overflows fp16 if it ever meets fp16 logits; the batch
pads one audio clip so masked frames really occur. Inputs are built with the saved image processor and feature
extractor (Gemma4Processor itself needs torchvision), placeholders expanded by hand.
"""

import json

import numpy as np
import pytest
import torch
from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.data.tokenize import text_tokenizer
from slimtune.train.loss import loss_sum


def _multimodal_batch(path, tok, config):
    from PIL import Image

    spec = json.loads((path / "processor_config.json").read_text())
    images = Gemma4ImageProcessorPil.from_dict(spec["image_processor"])
    audio = Gemma4AudioFeatureExtractor.from_dict(spec["feature_extractor"])
    rng = np.random.RandomState(0)
    pics = [Image.fromarray((rng.rand(30 + 6 * i, 48, 3) * 255).astype("uint8")) for i in range(2)]
    clips = [np.sin(np.linspace(0, 300, n)).astype(np.float32) for n in (8000, 4000)]  # second one padded
    pix = images(images=pics, return_tensors="pt")
    feats = audio(clips, sampling_rate=16_000, return_tensors="pt")
    assert not bool(feats["input_features_mask"][1].all())  # the batch really contains padded audio frames
    rows = []
    for i in range(2):
        n_img = int(pix["num_soft_tokens_per_image"][i])
        m = feats["input_features_mask"][i].numpy()
        for _ in range(2):  # two stride-2 convolutions in the audio tower
            m = m[::2][: (len(m) - 1) // 2 + 1]
        text = ("<|turn>user\nSee <|image>" + "<|image|>" * n_img + "<image|> hear <|audio>" + "<|audio|>" * int(m.sum())
                + "<audio|><turn|>\n<|turn>model\nA red square and a bell.<turn|>\n")
        rows.append(tok(text).input_ids)
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    targets[(ids == config.image_token_id) | (ids == config.audio_token_id)] = -100
    return {"input_ids": ids, "attention_mask": mask, "targets": targets, "pixel_values": pix["pixel_values"],
            "image_position_ids": pix["image_position_ids"], "input_features": feats["input_features"],
            "input_features_mask": feats["input_features_mask"],
            "mm_token_type_ids": (ids == config.image_token_id).long()}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_multimodal_step_is_finite(tiny_dir, dtype):
    path = tiny_dir("e2b", text_only=False)
    model, tok = slimtune.load_model(path, dtype=dtype, device="cpu")
    slimtune.add_lora(model, r=4, alpha=8, finetune_vision_layers=True, finetune_audio_layers=True)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.02)
    batch = _multimodal_batch(path, text_tokenizer(tok), model.config)
    batch["pixel_values"] = batch["pixel_values"].to(getattr(torch, dtype))
    batch["input_features"] = batch["input_features"].to(getattr(torch, dtype))
    model.train()
    loss = loss_sum(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    for tower in ("language_model", "vision_tower", "audio_tower"):
        assert any(tower in n and g.abs().sum() > 0 for n, g in grads.items()), tower


def test_fp16_audio_tower_padded_frames_stay_finite(tiny_dir):
    path = tiny_dir("e2b", text_only=False)
    model, tok = slimtune.load_model(path, dtype="float16", device="cpu")
    batch = _multimodal_batch(path, text_tokenizer(tok), model.config)
    with torch.no_grad():
        out = model.model.get_audio_features(batch["input_features"].half(), batch["input_features_mask"])
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    assert torch.isfinite(hidden).all()
