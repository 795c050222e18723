"""A (fake) CUDA out-of-memory on CPU: the message carries the planner's suggestion for the GPU's memory."""

from pathlib import Path

import pytest
import torch

import slimtune
import slimtune.train.run as run_mod
from slimtune.errors import TrainingOutOfMemoryError
from slimtune.memory.oom import explain_oom
from slimtune.train.config import TrainConfig

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
GIB = 2**30


def _cfg(**kw):
    return TrainConfig(**{"model": "e2b", "data": str(BUNDLED), "output": "o", "max_seq_length": 8192, **kw})


def test_oom_message_has_the_planners_suggestion_for_the_gpu():
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msg = explain_oom(_cfg(batch_size=2), exc, gpu_total_bytes=8 * GIB)
    assert "Predicted peak for these settings" in msg
    assert "memory planner's suggestion" in msg and "load_in_4bit=True" in msg
    assert "--max-memory" in msg
    assert "--batch-size 1 --grad-accum 2" in msg  # the simple tips stay


def test_oom_message_when_nothing_fits_gives_the_longest_context():
    exc = torch.OutOfMemoryError("CUDA out of memory.")
    msg = explain_oom(_cfg(max_seq_length=131072), exc, gpu_total_bytes=3 * GIB)
    assert "finds nothing that fits" in msg and "the longest that fits is" in msg


def test_oom_during_training_reads_the_gpu_size(tiny_dir, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_mod, "fit", oom)
    # a GPU whose 90% share is far too small even for the tiny model's weights, seen through the CUDA API
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (1024, 64 * 1024))
    cfg = TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(BUNDLED), output=str(tmp_path / "r"),
                      max_seq_length=128, device="cpu")
    with pytest.raises(TrainingOutOfMemoryError) as err:
        run_mod.train(cfg, log=lambda *_: None)
    msg = str(err.value)
    assert "0.0 GiB free of 0.0 GiB" in msg and "finds nothing that fits" in msg


def test_8bit_adamw_comes_first_where_its_saving_is_large():
    exc = torch.OutOfMemoryError("while capturing the training step as a CUDA graph: CUDA out of memory.")
    big = explain_oom(_cfg(model="26b-a4b", max_seq_length=2048, load_in_4bit=True, text_only=True,
                           finetune_experts=True, cuda_graphs=True), exc, gpu_total_bytes=24 * GIB)
    tips = big.split("Try, in this order: ")[1]
    assert tips.startswith("--optimizer adamw8bit (~") and "--no-cuda-graphs" in tips
    small = explain_oom(_cfg(max_seq_length=2048, load_in_4bit=True), exc, gpu_total_bytes=24 * GIB)
    assert "--optimizer adamw8bit" not in small.split("Try, in this order: ")[1]  # E2B's LoRA state is ~0.3 GiB
    already = explain_oom(_cfg(model="26b-a4b", max_seq_length=2048, load_in_4bit=True, text_only=True,
                               finetune_experts=True, optimizer="adamw8bit"), exc, gpu_total_bytes=24 * GIB)
    assert "--optimizer adamw8bit (" not in already
