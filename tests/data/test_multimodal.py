"""Image and audio rows without torchvision: placeholders match the towers, labels skip media, LoRA trains.

Fixtures are generated: PIL images and numpy clips written as PCM WAV with the stdlib ``wave`` module.
"""

from __future__ import annotations

import wave

import numpy as np
import pytest
import torch

import slimtune
from slimtune.data.collate import collate
from slimtune.data.multimodal import load_media_front_end, tokenize_multimodal_chat
from slimtune.data.tokenize import IGNORE_INDEX, tokenize_rows
from slimtune.errors import ConfigError, DataError
from slimtune.models.tokenizer_build import SPECIAL_TOKENS
from slimtune.train.step import accumulate_gradients, clip_and_step

pytestmark = pytest.mark.filterwarnings("ignore:returning the tokenizer instead of the processor")

MEDIA_IDS = [SPECIAL_TOKENS[t] for t in ("<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>")]


def _write_wav(path, samples: np.ndarray, rate: int) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def _write_png(path, seed: int = 0, size=(30, 50)) -> None:
    from PIL import Image

    Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype("uint8")).save(path)


def _row(kind: str, name: str, reply: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": kind, "path": name}]},
        {"role": "assistant", "content": reply},
    ]}


def _load(path):
    model, tok = slimtune.load_model(path, dtype="float32", device="cpu")
    return model, getattr(tok, "tokenizer", tok)


def _check_batch(model, batch) -> None:
    """Placeholders equal the towers' soft tokens; no media token is ever a target."""
    ids, cfg = batch["input_ids"], model.config
    with torch.no_grad():
        if "pixel_values" in batch:
            out = model.model.get_image_features(batch["pixel_values"], batch["image_position_ids"])
            assert int((ids == cfg.image_token_id).sum()) == sum(len(x) for x in out.pooler_output) > 0
        if "input_features" in batch:
            out = model.model.get_audio_features(batch["input_features"], batch["input_features_mask"])
            assert int((ids == cfg.audio_token_id).sum()) == int(out.attention_mask.sum()) > 0
    # targets[:, t] is the label of token t+1
    assert not torch.isin(batch["targets"], torch.tensor(MEDIA_IDS)).any()
    assert bool((batch["targets"] != IGNORE_INDEX).any())
    assert torch.equal(batch["mm_token_type_ids"] == 1, ids == cfg.image_token_id)
    assert torch.equal(batch["mm_token_type_ids"] == 3, ids == cfg.audio_token_id)


def _train(model, batch, steps: int = 20) -> list[float]:
    slimtune.add_lora(model, r=8, alpha=16, finetune_vision_layers=True, finetune_audio_layers=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss, _n = accumulate_gradients(model, [batch], device=torch.device("cpu"), dtype=torch.float32)
        clip_and_step(params, opt, sched, max_grad_norm=1.0)
        losses.append(loss)
    assert all(np.isfinite(losses))
    return losses


def test_image_row_trains_and_matches_the_vision_tower(tiny_dir, tmp_path):
    path = tiny_dir("e2b", text_only=False)
    model, tok = _load(path)
    _write_png(tmp_path / "square.png")
    examples, stats = tokenize_rows([_row("image", "square.png", "A red square on noise.")], tok,
                                    max_seq_length=512, media_root=tmp_path)
    assert stats.n_rows == 1 and len(examples) == 1
    ex = examples[0]
    assert ex.extras["pixel_values"].shape[0] == 1 and ex.extras["mm_token_type_ids"].shape == (1, len(ex.input_ids))
    batch = collate(examples, tok.pad_token_id)
    _check_batch(model, batch)
    losses = _train(model, batch)
    assert losses[-1] < 0.8 * losses[0], losses


def test_audio_rows_of_different_lengths_collate_and_train(tiny_dir, tmp_path):
    path = tiny_dir("e2b", text_only=False)
    model, tok = _load(path)
    _write_wav(tmp_path / "a.wav", np.sin(np.linspace(0, 400, 8000)), 16_000)  # 0.5 s
    _write_wav(tmp_path / "b.wav", np.sin(np.linspace(0, 900, 44_100)), 22_050)  # 2 s, resampled to 16 kHz
    rows = [_row("audio", "a.wav", "A short hum."), _row("audio", "b.wav", "A long bell.")]
    examples, _ = tokenize_rows(rows, tok, max_seq_length=512, media_root=tmp_path)
    frames = [e.extras["input_features"].shape[1] for e in examples]
    assert frames[0] < frames[1]
    single = collate(examples[:1], tok.pad_token_id)
    _check_batch(model, single)
    batch = collate(examples, tok.pad_token_id)
    assert batch["input_features"].shape[:2] == (2, frames[1])
    assert int(batch["input_features_mask"][0].sum()) == int(examples[0].extras["input_features_mask"].sum())
    _check_batch(model, batch)
    losses = _train(model, batch)
    assert losses[-1] < 0.8 * losses[0], losses


def test_image_budget_and_in_memory_media(tiny_dir):
    from PIL import Image

    path = tiny_dir("e2b", text_only=False)
    model, tok = _load(path)
    image = Image.fromarray((np.random.RandomState(3).rand(64, 64, 3) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "audio", "audio": np.zeros(4410, np.float32) + 0.1,
                                              "sampling_rate": 44_100}]},
                {"role": "assistant", "content": "Grey noise and a click."}]
    counts = {}
    for budget in (70, 140):
        front = load_media_front_end(path, max_soft_tokens=budget)
        ex = tokenize_multimodal_chat(front, tok, messages, media_root=None)
        counts[budget] = ex.input_ids.count(model.config.image_token_id)
        _check_batch(model, collate([ex], tok.pad_token_id))
    assert counts[70] <= 70 < counts[140] <= 140
    with pytest.raises(ConfigError, match="70, 140, 280, 560, 1120"):
        load_media_front_end(path, max_soft_tokens=100)


def test_text_and_image_rows_share_a_batch(tiny_dir, tmp_path):
    path = tiny_dir("e2b", text_only=False)
    model, tok = _load(path)
    _write_png(tmp_path / "x.png", seed=1, size=(40, 20))
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
            _row("image", "x.png", "Stripes.")]
    examples, _ = tokenize_rows(rows, tok, max_seq_length=512, media_root=tmp_path)
    batch = collate(examples, tok.pad_token_id)
    assert not batch["mm_token_type_ids"][0].any()
    _check_batch(model, batch)
    assert torch.isfinite(slimtune.train.loss.loss_sum(model, batch))


def test_truncation_never_cuts_media(tiny_dir, tmp_path):
    path = tiny_dir("e2b", text_only=False)
    _, tok = _load(path)
    _write_png(tmp_path / "x.png")
    with pytest.raises(DataError, match=r"row 1.*max_seq_length=20"):
        tokenize_rows([_row("image", "x.png", "Noise.")], tok, max_seq_length=20, media_root=tmp_path)


def _bad_media(tmp_path, case):
    """Write one malformed file; returns (content part, text the DataError must contain)."""
    if case == "missing image":
        return {"type": "image", "path": "nope.png"}, r"nope\.png: image file not found"
    if case == "corrupt image":
        (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
        return {"type": "image", "path": "bad.png"}, r"bad\.png: corrupt or unsupported image"
    if case == "missing audio":
        return {"type": "audio", "path": "gone.wav"}, r"gone\.wav: audio file not found"
    if case == "unreadable audio":
        (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunkjunkjunk")
        return {"type": "audio", "path": "junk.wav"}, r"junk\.wav: unreadable audio"
    if case == "zero sample rate":
        _write_wav(tmp_path / "zero.wav", np.zeros(1600), 16_000)
        data = bytearray((tmp_path / "zero.wav").read_bytes())
        data[24:28] = (0).to_bytes(4, "little")  # fmt chunk: sample rate
        (tmp_path / "zero.wav").write_bytes(bytes(data))
        return {"type": "audio", "path": "zero.wav"}, r"zero\.wav: unsupported sample rate 0"
    if case == "array without rate":
        return {"type": "audio", "audio": np.zeros(100, np.float32), "sampling_rate": 0}, \
            r"audio \(array\): unsupported sample rate 0"
    if case == "too long":
        _write_wav(tmp_path / "long.wav", np.zeros(31 * 1000), 1000)  # 31 s at 1 kHz keeps the file small
        return {"type": "audio", "path": "long.wav"}, r"long\.wav: audio is 31\.0 s long.*at most 30 s"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "missing audio", "unreadable audio",
                                  "zero sample rate", "array without rate", "too long"])
def test_malformed_media_names_the_row_and_the_file(tiny_dir, tmp_path, case):
    path = tiny_dir("e2b", text_only=False)
    tok = _load(path)[1]
    part, expected = _bad_media(tmp_path, case)
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hm"}, part]},
                        {"role": "assistant", "content": "Ok."}]}
    with pytest.raises(DataError, match="row 2, .*" + expected):
        tokenize_rows([good, bad], tok, max_seq_length=512, media_root=tmp_path)


def test_text_literal_media_tokens_are_rejected(tiny_dir, tmp_path):
    path = tiny_dir("e2b", text_only=False)
    tok = _load(path)[1]
    _write_png(tmp_path / "x.png")
    row = _row("image", "x.png", "ok")
    row["messages"][0]["content"][0]["text"] = "sneaky <|image|>"
    with pytest.raises(DataError, match="media tokens"):
        tokenize_rows([row], tok, max_seq_length=512, media_root=tmp_path)
