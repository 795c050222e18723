"""`--resume` continues a SIGKILLed run bit-exactly, and never from a checkpoint whose save did not finish."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune.errors import ConfigError
from slimtune.train.checkpoint import find_resume_point, list_checkpoints
from slimtune.train.config import TrainConfig
from slimtune.train.run import train

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


STEPS = 20  # with 1 thread a step takes ~50 ms: the run must outlast the poll below


def _cmd(model: Path, out: Path) -> list[str]:
    # lora_dropout > 0 so the run consumes the RNG: the restored RNG state is part of what is tested.
    return [sys.executable, "-m", "slimtune", "train", "--model", str(model), "--data", str(BUNDLED),
            "--output", str(out), "--max-steps", str(STEPS), "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8",
            "--lora-dropout", "0.1", "--batch-size", "2", "--grad-accum", "1", "--max-seq-length", "64",
            "--seed", "3", "--save-steps", "2", "--device", "cpu", "--no-gradient-checkpointing"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigkilled_run_resumes_bit_exact(tiny_dir, tmp_path):
    model = tiny_dir("e2b", text_only=True)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    # One thread each: two runs share the CI cores without oversubscription (which made steps 50x slower), and
    # both use the same reduction order, which is what makes bit-exact comparison meaningful.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # The uninterrupted reference and the run to be killed run side by side (same results, half the wall time).
    ref = subprocess.Popen(_cmd(model, run_a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    victim = subprocess.Popen(_cmd(model, run_b), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    k = random.Random(20261129).randint(3, 8)  # kill after step k: at least the step-2 checkpoint exists
    deadline = time.monotonic() + 240
    while _lines(run_b / "metrics.jsonl") < k:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the run to reach the kill step"
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert list_checkpoints(run_b), "no checkpoint was written before the kill"
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]

    resumed = subprocess.run(_cmd(model, run_b) + ["--resume"], capture_output=True, text=True, timeout=300,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout + resumed.stderr

    a, b = _metrics(run_a), _metrics(run_b)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # every step exactly once
    for ra, rb in zip(a, b):
        # Same process layout, same thread count, same kernels: the continuation is bit-exact, not just close.
        assert (ra["loss"], ra["grad_norm"], ra["lr"]) == (rb["loss"], rb["grad_norm"], rb["lr"]), (k, ra, rb)
    wa = load_file(run_a / "adapter" / "adapter_model.safetensors")
    wb = load_file(run_b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


def _fake_checkpoint(folder: Path, step: int, *, state: bool = True, adapter: bool = True) -> None:
    folder.mkdir(parents=True)
    if adapter:
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    if state:
        torch.save({"step": step, "config": {}}, folder / "trainer_state.pt")


def test_interrupted_or_partial_checkpoints_are_never_picked(tmp_path):
    ck = tmp_path / "checkpoints"
    _fake_checkpoint(ck / "step-000002", 2)
    _fake_checkpoint(ck / ".step-000004.tmp-xyz", 4, state=False)  # save killed midway: hidden temp folder
    _fake_checkpoint(ck / ".step-000005.tmp-abc", 5)  # even a complete-looking temp folder is not a checkpoint
    _fake_checkpoint(ck / "step-000006", 6, state=False)  # no trainer_state.pt
    _fake_checkpoint(ck / "step-000008", 8, adapter=False)  # no adapter
    _fake_checkpoint(ck / "step-000010", 10, state=False)
    (ck / "step-000010" / "trainer_state.pt").write_bytes(b"truncated")  # unreadable state: skipped with a warning
    logged = []
    point = find_resume_point(tmp_path, log=logged.append)
    assert point is not None and point.step == 2 and point.path.name == "step-000002"
    assert any("step-000010" in line for line in logged)
    assert find_resume_point(tmp_path / "nothing-here") is None


def _cfg(model, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(BUNDLED), output=str(out), max_steps=1, batch_size=2, max_seq_length=64,
                lora_r=4, lora_alpha=8, gradient_checkpointing=False, device="cpu", resume=True)
    return TrainConfig(**{**base, **kw})


def test_resume_refuses_a_changed_run_and_starts_fresh_without_checkpoint(tiny_dir, tmp_path):
    model = tiny_dir("e2b", text_only=True)
    out = tmp_path / "run"
    logged = []
    result = train(_cfg(model, out), log=logged.append)  # --resume with nothing to resume: fresh, with a note
    assert len(result.history) == 1 and any("starting fresh" in line for line in logged)

    saved = _cfg(model, out).to_dict()
    _fake_checkpoint(out / "checkpoints" / "step-000001", 1, state=False)
    torch.save({"step": 1, "config": saved}, out / "checkpoints" / "step-000001" / "trainer_state.pt")
    with pytest.raises(ConfigError) as info:
        train(_cfg(model, out, lr=1e-3, seed=5, save_steps=3), log=lambda *_: None)
    message = str(info.value)
    assert "lr (checkpoint" in message and "seed (checkpoint" in message and "save_steps" not in message
