"""The multimodal benchmark batch: one image and one audio clip of the model's own geometry, inside `seq` tokens.

Random pixels and log-mel features stand in for a real image and clip: the towers' cost depends only on shapes.
The placeholder counts must equal what the towers emit, or Gemma 4's merge (a masked scatter of soft tokens
into the placeholder positions) fails, so they are derived from the same arithmetic the towers use:

* image: a g×g grid of soft tokens is (g·k)² patches (k = ``pooling_kernel_size``), each a row of
  ``patch_size² · 3`` pixel values with its (x, y) patch position; the pooler averages each k×k block.
* audio: T mel frames leave ceil(ceil(T/2)/2) frames after the two stride-2 convolutions, one soft token each;
  T = 4·n gives exactly n. The mel width is read off the tower's input projection.

Layout: ``bos, boi, image×n_i, eoi, boa, audio×n_a, eoa, text…`` with next-token targets on the text only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtune.data.multimodal import AUDIO_TYPE_ID, IMAGE_TYPE_ID, audio_soft_tokens
from slimtune.data.tokenize import IGNORE_INDEX
from slimtune.errors import ConfigError

MAX_IMAGE_GRID = 16
"""16×16 = 256 soft tokens: the largest square inside Gemma 4's default image budget of 280."""
MAX_AUDIO_TOKENS = 250
"""250 soft tokens = 10 s of audio (40 ms per token)."""
MIN_SEQ = 16


def _token_ids(config) -> dict[str, int]:
    # eoa is spelled eoa_token_index in Gemma4Config (5.17 and 5.24); the others are *_token_id.
    names = {"image": "image_token_id", "audio": "audio_token_id", "boi": "boi_token_id", "eoi": "eoi_token_id",
             "boa": "boa_token_id", "eoa": "eoa_token_index"}
    ids = {k: getattr(config, v, None) for k, v in names.items()}
    if ids["eoa"] is None:
        ids["eoa"] = getattr(config, "eoa_token_id", None)
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ConfigError(f"the model config has no {missing} token ids; a multimodal batch needs a "
                          "Gemma4ForConditionalGeneration config.")
    return ids


def mel_bins(model: nn.Module) -> int:
    """Mel features per frame the audio tower takes (its input projection sees bins/4 × last conv channels)."""
    audio_cfg = model.config.audio_config
    proj = model.model.audio_tower.subsample_conv_projection.input_proj_linear
    return 4 * proj.in_features // audio_cfg.subsampling_conv_channels[-1]


def multimodal_batch(model: nn.Module, seq: int, *, generator: torch.Generator | None = None,
                     image_grid: int | None = None, audio_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """A (1, seq) CPU batch holding one image and one audio clip, for `model` (Gemma4ForConditionalGeneration).

    Args:
        seq: total tokens, media placeholders and markers included.
        image_grid: soft tokens per image side (default: up to 16, a quarter of seq at most).
        audio_tokens: audio soft tokens (default: up to 250, a quarter of seq at most).

    Raises:
        ConfigError: seq too short for the media, or the model has no vision/audio tower.
    """
    config = model.config
    if getattr(config, "vision_config", None) is None or getattr(config, "audio_config", None) is None:
        raise ConfigError("a multimodal bench batch needs a model with vision and audio towers (E2B/E4B built "
                          "with multimodal=True).")
    if seq < MIN_SEQ:
        raise ConfigError(f"seq={seq} is too short for an image and an audio clip; use seq >= {MIN_SEQ}.")
    ids_of = _token_ids(config)
    g = image_grid if image_grid is not None else min(MAX_IMAGE_GRID, math.isqrt(seq // 4))
    n_audio = audio_tokens if audio_tokens is not None else min(MAX_AUDIO_TOKENS, seq // 4)
    n_image = g * g
    used = 1 + (n_image + 2) + (n_audio + 2)
    if g < 1 or n_audio < 1 or used >= seq:
        raise ConfigError(f"seq={seq} leaves no room for text after {n_image} image and {n_audio} audio tokens "
                          "(+ markers); raise seq or lower image_grid / audio_tokens.")
    gen = generator or torch.Generator().manual_seed(0)

    vision = config.vision_config
    k, p = vision.pooling_kernel_size, vision.patch_size
    side = g * k  # patches per side
    pixel_values = torch.rand((1, side * side, p * p * 3), generator=gen)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    image_position_ids = torch.stack([cols.flatten(), rows.flatten()], dim=-1)[None]  # (x, y), row-major

    frames = 4 * n_audio
    input_features = torch.randn((1, frames, mel_bins(model)), generator=gen)
    input_features_mask = torch.ones((1, frames), dtype=torch.bool)
    assert audio_soft_tokens(input_features_mask[0]) == n_audio  # the arithmetic the placeholders rely on

    vocab = config.get_text_config().vocab_size
    special = torch.tensor(sorted(set(ids_of.values())))
    text = torch.randint(3, vocab, (seq - used,), generator=gen)
    text[torch.isin(text, special)] = next(i for i in range(3, vocab) if i not in set(special.tolist()))
    bos = getattr(config.get_text_config(), "bos_token_id", None) or 2
    ids = torch.cat([torch.tensor([bos, ids_of["boi"]]), torch.full((n_image,), ids_of["image"]),
                     torch.tensor([ids_of["eoi"], ids_of["boa"]]), torch.full((n_audio,), ids_of["audio"]),
                     torch.tensor([ids_of["eoa"]]), text])[None]
    types = (ids == ids_of["image"]).long() * IMAGE_TYPE_ID + (ids == ids_of["audio"]).long() * AUDIO_TYPE_ID
    targets = torch.full_like(ids, IGNORE_INDEX)
    next_is_text = ~torch.isin(ids[:, 1:], special)
    targets[:, :-1] = torch.where(next_is_text, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    return {"input_ids": ids, "targets": targets, "mm_token_type_ids": types, "pixel_values": pixel_values,
            "image_position_ids": image_position_ids, "input_features": input_features,
            "input_features_mask": input_features_mask}
