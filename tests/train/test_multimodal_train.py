"""`train()` on a dataset of image and audio rows (paths relative to the file), in fp32 and fp16."""

import json
import wave

import numpy as np
import pytest
from PIL import Image

from slimtune.train.config import TrainConfig
from slimtune.train.run import train


def _dataset(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "clips").mkdir()
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(40, 56, 3) * 255).astype("uint8")).save(tmp_path / "img" / "1.png")
    with wave.open(str(tmp_path / "clips" / "1.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.sin(np.linspace(0, 500, 12_000)) * 12_000).astype("<i2").tobytes())
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "img/1.png"},
                                                   {"type": "text", "text": "What is this?"}]},
                      {"role": "assistant", "content": "A colorful square."}]},
        {"messages": [{"role": "user", "content": [{"type": "audio", "path": "clips/1.wav"},
                                                   {"type": "text", "text": "What do you hear?"}]},
                      {"role": "assistant", "content": "A bell."}]},
    ]
    data = tmp_path / "mm.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return data


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_train_on_image_and_audio_rows(tiny_dir, tmp_path, dtype):
    cfg = TrainConfig(model=str(tiny_dir("e2b", text_only=False)), data=str(_dataset(tmp_path)),
                      output=str(tmp_path / "run"), max_steps=25 if dtype == "float16" else 6, lr=3e-3, batch_size=2, max_seq_length=256,
                      lora_r=4, finetune_vision_layers=True, finetune_audio_layers=True, dtype=dtype,
                      device="cpu", gradient_checkpointing=False, image_max_soft_tokens=70)
    result = train(cfg, log=lambda *_: None)
    assert len(result.history) == cfg.max_steps
    losses = [h["loss"] for h in result.history]
    norms = [h["grad_norm"] for h in result.history]
    assert all(np.isfinite(losses))  # the forward never overflows (audio mask fill, towers, CE)
    # fp16: GradScaler starts at 2**16 and skips the first steps until the scale fits (their norm is inf/nan,
    # the weights do not move); after that every step must be finite and training must make progress
    assert sum(np.isfinite(norms)) >= cfg.max_steps // 2
    assert losses[-1] < losses[0] - 0.5
    keys = json.loads((result.adapter_dir / "adapter_config.json").read_text())["target_modules"]
    assert "vision_tower" in keys and "audio_tower" in keys
