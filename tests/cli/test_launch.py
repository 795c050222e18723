"""`slimtune train --nproc N` re-runs itself under torchrun; `distributed` is a validated setting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import slimtune
from slimtune.cli.launch import relaunch, strip_nproc, torchrun_argv
from slimtune.cli.main import main
from slimtune.errors import ConfigError
from slimtune.train.config import TrainConfig

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


@pytest.mark.parametrize("argv", [
    ["train", "--nproc", "2", "--model", "m", "--data", "d"],
    ["train", "--model", "m", "--nproc=2", "--data", "d"],
    ["train", "--model", "m", "--data", "d", "--npr", "2"],  # argparse's prefix matching
])
def test_torchrun_command_drops_nproc_and_keeps_the_rest(argv):
    cmd = torchrun_argv(2, argv)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    i = cmd.index("--nproc-per-node")
    assert cmd[i + 1] == "2"
    tail = cmd[cmd.index("-m", 3):]
    assert tail == ["-m", "slimtune", "train", "--model", "m", "--data", "d"]


def test_no_gradient_checkpointing_is_not_taken_for_nproc():
    assert strip_nproc(["train", "--no-gradient-checkpointing", "--n", "x"]) == [
        "train", "--no-gradient-checkpointing", "--n", "x"]


def test_relaunch_refuses_nested_or_bad_counts(monkeypatch):
    with pytest.raises(ConfigError, match="positive"):
        relaunch(0, ["train"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="drop --nproc"):
        relaunch(2, ["train"])


def test_distributed_setting_is_validated(tmp_path):
    base = dict(model=str(tmp_path), data="d.jsonl", output=str(tmp_path / "o"))
    assert TrainConfig(**base).distributed == "auto"
    with pytest.raises(ConfigError, match="distributed must be auto, ddp or fsdp"):
        TrainConfig(**base, distributed="zero3")
    for kind in ("ddp", "fsdp"):  # QLoRA under both (FSDP2 keeps the NF4 weights out of the sharding)
        assert TrainConfig(**base, distributed=kind, load_in_4bit=True).distributed == kind


def test_distributed_is_a_yaml_key(tmp_path):
    from slimtune.train.config_io import resolve_config  # noqa: PLC0415

    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"model: {tmp_path}\ndata: d.jsonl\noutput: {tmp_path / 'o'}\ndistributed: fsdp\n")
    assert resolve_config(run_file).distributed == "fsdp"
    assert resolve_config(run_file, distributed="ddp").distributed == "ddp"  # the flag wins
    run_file.write_text(f"model: {tmp_path}\ndata: d.jsonl\noutput: {tmp_path / 'o'}\ndistributed: 2\n")
    with pytest.raises(ConfigError, match="distributed: expected str"):
        resolve_config(run_file)


def test_cli_rejects_a_bad_distributed_value(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path), "--data", str(BUNDLED), "--output", str(tmp_path / "r"),
                 "--distributed", "zero3", "--nproc", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "distributed must be auto, ddp or fsdp" in err  # before any process is started


def test_nproc_2_trains_through_torchrun(tiny_dir, tmp_path):
    """The real thing: torchrun starts 2 CPU processes (gloo, DDP); rank 0 alone prints and writes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "slimtune", "train", "--nproc", "2", "--model", str(tiny_dir("e2b", text_only=True)),
           "--data", str(BUNDLED), "--output", str(run), "--max-steps", "2", "--lora-r", "4", "--batch-size", "2",
           "--max-seq-length", "48", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("distributed: 2 processes, auto (ddp) on cpu") == 1, proc.stdout
    assert proc.stdout.count("done: 2 steps") == 1, proc.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
