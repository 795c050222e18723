"""`slimtune bench --multimodal`'s batch, on CPU with the tiny random multimodal model: its placeholders match
what the towers emit, and a LoRA step runs forward and backward through both towers."""

import pytest
import torch

from slimtune.adapt.inject import add_lora
from slimtune.adapt.lora import lora_modules
from slimtune.bench.mm_batch import multimodal_batch
from slimtune.bench.random_model import build_random_model
from slimtune.bench.run import bench_batch
from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.errors import ConfigError
from slimtune.train.step import accumulate_gradients

_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model():
    return build_random_model("e2b", tiny=True, multimodal=True, device="cpu", offload_ple=False)


def _soft_tokens(model, batch):
    with torch.no_grad():
        img = model.model.get_image_features(batch["pixel_values"].bfloat16(), batch["image_position_ids"])
        aud = model.model.get_audio_features(batch["input_features"].bfloat16(), batch["input_features_mask"])
    return sum(len(x) for x in img.pooler_output), int(aud.attention_mask.sum())


@pytest.mark.parametrize("seq", [48, 200])
def test_placeholders_match_the_towers(model, seq):
    batch = bench_batch(model, seq, multimodal=True, gen=torch.Generator().manual_seed(0))
    ids, cfg = batch["input_ids"], model.config
    assert ids.shape == batch["targets"].shape == batch["mm_token_type_ids"].shape == (1, seq)
    n_image, n_audio = int((ids == cfg.image_token_id).sum()), int((ids == cfg.audio_token_id).sum())
    assert (n_image, n_audio) == _soft_tokens(model, batch)
    assert n_image > 1 and n_audio > 1
    assert torch.equal(batch["mm_token_type_ids"] == 1, ids == cfg.image_token_id)
    assert torch.equal(batch["mm_token_type_ids"] == 3, ids == cfg.audio_token_id)
    media = [cfg.image_token_id, cfg.audio_token_id, cfg.boi_token_id, cfg.eoi_token_id, cfg.boa_token_id]
    assert not torch.isin(batch["targets"], torch.tensor(media)).any()  # never a media token as a target
    assert int((batch["targets"] != IGNORE_INDEX).sum()) > 0


@pytest.mark.parametrize("towers", [False, True])
def test_lora_step_through_both_towers(towers):
    model = build_random_model("e2b", tiny=True, multimodal=True, device="cpu", offload_ple=False)
    add_lora(model, r=4, target_modules=_TARGETS, finetune_vision_layers=towers, finetune_audio_layers=towers)
    batch = multimodal_batch(model, 96)
    model.train()
    seen = {}
    hooks = [getattr(model.model, name).register_forward_hook(
        lambda _m, _i, _out, name=name: seen.__setitem__(name, True)) for name in ("vision_tower", "audio_tower")]
    loss, n = accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.bfloat16)
    for h in hooks:
        h.remove()
    assert set(seen) == {"vision_tower", "audio_tower"}  # both towers ran
    assert torch.isfinite(torch.tensor(loss)) and n > 0
    layers = lora_modules(model)
    for comp in ("vision_tower", "audio_tower"):
        grads = [layer.lora_B.weight.grad for name, layer in layers.items() if comp in name]
        assert bool(grads) == towers
        assert all(g is not None and float(g.abs().sum()) > 0 for g in grads)  # backward reached the tower
    assert all(g is not None for g in (layer.lora_B.weight.grad for layer in layers.values()))
    assert not [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]


def test_too_short_or_text_only(model):
    with pytest.raises(ConfigError, match="seq >= 16"):
        multimodal_batch(model, 8)
    with pytest.raises(ConfigError, match="no room for text"):
        multimodal_batch(model, 40, image_grid=6)
    text = build_random_model("e2b", tiny=True, multimodal=False, device="cpu", offload_ple=False)
    with pytest.raises(ConfigError, match="vision and audio towers"):
        multimodal_batch(text, 64)
