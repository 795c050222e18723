"""`slimtune.train` on image + audio rows on the GPU: QLoRA and 16-bit LoRA, fp16 (GradScaler) and bf16.

The tiny E2B multimodal checkpoint trains 20 steps on rows whose image and audio clip come from top-level
columns; the loss must be finite and fall, gradients must be finite (fp16: once GradScaler has found its
scale), and the saved adapter (towers and multimodal embedders included) must be finite and trained.
The GPU cases are skipped without CUDA; the same recipe runs on the CPU (fp32 and bf16) in this file too.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scipy.io import wavfile

from slimtune.train.config import TrainConfig
from slimtune.train.run import train

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _dataset(tmp_path):
    rng = np.random.RandomState(0)
    rows = []
    for i, reply in enumerate(["A red square and a low hum.", "Blue stripes and a high whistle."]):
        Image.fromarray((rng.rand(40 + 8 * i, 56, 3) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
        buf = io.BytesIO()
        wavfile.write(buf, 16_000, (np.sin(np.linspace(0, 300 * (i + 1), 9_600)) * 12_000).astype("<i2"))
        (tmp_path / f"{i}.wav").write_bytes(buf.getvalue())
        rows.append({"messages": [{"role": "user", "content": "What do you see and hear?"},
                                  {"role": "assistant", "content": reply}],
                     "image": f"{i}.png", "audio": f"{i}.wav"})
    data = tmp_path / "mm.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return data


def _train_and_check(tiny_dir, tmp_path, monkeypatch, *, device: str, dtype: str, load_in_4bit: bool):
    scalers = []
    real = torch.amp.GradScaler

    def spy(*args, **kwargs):  # records that the fp16 path really goes through GradScaler
        scalers.append(real(*args, **kwargs))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", spy)
    cfg = TrainConfig(model=str(tiny_dir("e2b", text_only=False)), data=str(_dataset(tmp_path)),
                      output=str(tmp_path / "run"), max_steps=20, lr=3e-3, batch_size=2, max_seq_length=512,
                      lora_r=4, finetune_vision_layers=True, finetune_audio_layers=True,
                      finetune_multimodal_embedders=True, dtype=dtype, device=device, load_in_4bit=load_in_4bit,
                      image_max_soft_tokens=70, warmup_steps=0, lr_scheduler="constant")
    result = train(cfg, log=lambda *_: None)
    losses = [h["loss"] for h in result.history]
    norms = [h["grad_norm"] for h in result.history]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses), losses
    if dtype == "float16":
        assert len(scalers) == 1 and 0 < scalers[0].get_scale() < math.inf
        # GradScaler starts at 2**16 and skips the steps whose scaled grads overflow; after the first good step
        # every gradient must be finite
        first = next(i for i, g in enumerate(norms) if math.isfinite(g))
        assert first <= 10 and all(math.isfinite(g) for g in norms[first:]), norms
    else:
        assert not scalers
        assert all(math.isfinite(g) for g in norms), norms
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.75, losses  # ~7.0 -> ~5.1 on the CPU in fp32
    tensors = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    for part in ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "language_model"):
        trained = [t for k, t in tensors.items() if part in k and "lora_B" in k]
        assert trained and any(float(t.abs().sum()) > 0 for t in trained), part


@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["qlora", "lora16"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("_gpu", [pytest.param(None, marks=gpu)], ids=["cuda"])
def test_multimodal_training_on_gpu(tiny_dir, tmp_path, monkeypatch, dtype, load_in_4bit, _gpu):
    _train_and_check(tiny_dir, tmp_path, monkeypatch, device="cuda", dtype=dtype, load_in_4bit=load_in_4bit)


@pytest.mark.parametrize("dtype, load_in_4bit", [("float32", True), ("bfloat16", False)],
                         ids=["fp32-qlora", "bf16-lora16"])
def test_same_recipe_on_cpu(tiny_dir, tmp_path, monkeypatch, dtype, load_in_4bit):
    _train_and_check(tiny_dir, tmp_path, monkeypatch, device="cpu", dtype=dtype, load_in_4bit=load_in_4bit)
