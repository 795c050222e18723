"""Captured steps under DDP on two GPUs (NCCL all-reduce inside the CUDA graph): `slimtune train --nproc 2` with
cuda_graphs auto captures, and trains like one GPU on the same global batches. Skipped without two GPUs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimtune

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


def _varied_data(path: Path) -> Path:
    """Chat samples of very different lengths (a few to ~400 tokens), so unpacked batches fall into several length
    buckets and the ranks' widest batches differ from step to step."""
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with path.open("w") as f:
        for _ in range(96):
            answer = " ".join(rng.choice(words) for _ in range(rng.choice((3, 40, 120, 300))))
            f.write(json.dumps({"messages": [{"role": "user", "content": "Say some words."},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def _train(model: Path, out: Path, *extra: str, data: Path = BUNDLED) -> str:
    cmd = [sys.executable, "-m", "slimtune", "train", "--model", str(model), "--data", str(data),
           "--output", str(out), "--max-steps", "16", "--max-seq-length", "512", "--lora-dropout", "0",
           "--lr", "1e-3", "--seed", "3", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
# packed: one graph; unpacked: several length buckets, one per step for all ranks (the widest rank's)
@pytest.mark.parametrize("packing", [True, False])
def test_two_gpus_capture_and_train_like_one(tiny_dir, tmp_path, packing):
    model = tiny_dir("e2b", text_only=True)
    flags = ["--packing"] if packing else []
    data = _varied_data(tmp_path / "varied.jsonl")
    printed = _train(model, tmp_path / "two", "--nproc", "2", "--batch-size", "2", *flags, data=data)
    assert "cuda_graphs auto: on" in printed, printed[-2000:]
    _train(model, tmp_path / "one", "--batch-size", "4", *flags, data=data)
    two, one = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert len(two) == len(one) == 16
    # bf16: the two halves' sums differ from one batch's by rounding; a rank-local step would be far off
    assert two == pytest.approx(one, rel=2e-2)
