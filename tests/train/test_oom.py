"""A step that does not fit in memory stops with advice naming the settings to change, not a CUDA traceback."""

from pathlib import Path

import pytest
import torch

import slimtune
import slimtune.train.run as run_mod
from slimtune.cli.main import main
from slimtune.errors import TrainingOutOfMemoryError
from slimtune.train.config import TrainConfig

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_oom_becomes_advice(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_mod, "fit", _oom)
    cfg = TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(BUNDLED), output=str(tmp_path / "r"),
                      batch_size=4, max_seq_length=128, device="cpu")
    with pytest.raises(TrainingOutOfMemoryError) as err:
        run_mod.train(cfg, log=lambda *_: None)
    msg = str(err.value)
    assert "--load-in-4bit" in msg and "--batch-size 1 --grad-accum 4" in msg and "--max-seq-length 256" in msg
    assert "Predicted peak for these settings" in msg
    assert "--no-cuda-graphs" not in msg  # no GPU: auto never captured
    from slimtune.memory.oom import explain_oom

    forced = explain_oom(TrainConfig(**{**cfg.__dict__, "cuda_graphs": True}), torch.OutOfMemoryError("x"))
    assert "Try, in this order: --no-cuda-graphs (a captured step keeps its own memory pool" in forced
    code = main(["train", "--model", cfg.model, "--data", cfg.data, "--output", str(tmp_path / "r2"),
                 "--max-steps", "1", "--device", "cpu"])
    err_text = capsys.readouterr().err
    assert code == 2 and "did not fit in GPU memory" in err_text and "Traceback" not in err_text
