"""`slimtune train` with and without --max-memory: the prediction is printed, unset settings are planned."""

from pathlib import Path

import pytest
import yaml

import slimtune
from slimtune.cli.main import main
from slimtune.errors import ConfigError
from slimtune.memory.train_plan import apply_memory_plan, explicit_fields
from slimtune.train.config import TrainConfig
from slimtune.train.config_io import resolve_config

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
BASE = {"model": "e2b", "data": str(BUNDLED), "output": "o", "max_seq_length": 8192}


def test_budget_fills_in_only_the_unset_settings():
    lines = []
    cfg = resolve_config(**BASE, max_memory="4GiB", lora_r=16)
    planned = apply_memory_plan(cfg, log=lines.append)
    assert planned.load_in_4bit is True and planned.max_seq_length == 8192 and planned.lora_r == 16
    assert any(line.startswith("memory plan:") and "load_in_4bit=True" in line for line in lines)
    assert any("of a 4.00 GiB budget" in line for line in lines)
    assert explicit_fields(planned) == explicit_fields(cfg)  # planned values stay plannable on a re-plan


def test_a_setting_the_user_gave_survives_and_an_impossible_budget_names_the_longest_context():
    cfg = resolve_config(**BASE, max_memory="5GiB", load_in_4bit=False, optimizer="adamw",
                         activation_offload=False, mlp_chunk_size=0)
    with pytest.raises(ConfigError) as info:
        apply_memory_plan(cfg, log=lambda *_: None)
    assert "longest max_seq_length that fits is" in str(info.value) and "load_in_4bit" in str(info.value)
    kept = apply_memory_plan(resolve_config(**BASE, max_memory="8GiB", load_in_4bit=False), log=lambda *_: None)
    assert kept.load_in_4bit is False


def test_python_api_configs_treat_non_default_values_as_the_users():
    cfg = TrainConfig(**BASE, gradient_checkpointing=True, mlp_chunk_size=2048, max_memory="80GiB")
    assert "mlp_chunk_size" in explicit_fields(cfg) and "load_in_4bit" not in explicit_fields(cfg)
    planned = apply_memory_plan(cfg, log=lambda *_: None)
    assert planned.mlp_chunk_size == 2048


def test_without_a_budget_the_prediction_and_its_main_terms_are_printed():
    lines = []
    cfg = TrainConfig(**BASE, load_in_4bit=True)
    assert apply_memory_plan(cfg, log=lines.append) is cfg
    assert lines and lines[0].startswith("memory: predicted peak") and "weights" in lines[0]


def test_a_model_the_planner_cannot_read(tmp_path):
    cfg = TrainConfig(**{**BASE, "model": str(tmp_path / "missing")})
    lines = []
    assert apply_memory_plan(cfg, log=lines.append) is cfg  # no budget: a note, and training goes on
    assert lines[0].startswith("memory: no prediction")
    with pytest.raises(ConfigError, match="max_memory='8GiB' needs the model's config"):
        apply_memory_plan(TrainConfig(**{**BASE, "model": str(tmp_path / "missing"), "max_memory": "8GiB"}),
                          log=lambda *_: None)


def test_bad_budget_strings_are_config_errors():
    with pytest.raises(ConfigError, match="cannot read the memory size '8 bananas'"):
        TrainConfig(**BASE, max_memory="8 bananas")
    with pytest.raises(ConfigError, match="optimizer must be adamw or adamw8bit"):
        TrainConfig(**BASE, optimizer="sgd")
    with pytest.raises(ConfigError, match="mlp_chunk_size must be"):
        TrainConfig(**BASE, mlp_chunk_size=-1)


def test_cli_train_prints_the_plan_and_records_it(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("e2b", text_only=True))
    code = main(["train", "--model", model, "--data", str(BUNDLED), "--output", str(tmp_path / "bad"),
                 "--max-memory", "8XB", "--device", "cpu"])
    assert code == 2 and "cannot read the memory size '8XB'" in capsys.readouterr().err
    code = main(["train", "--model", model, "--data", str(BUNDLED), "--output", str(tmp_path / "run"),
                 "--max-steps", "1", "--max-seq-length", "128", "--max-memory", "1GiB", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "memory: predicted peak" in out and "memory plan:" in out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["max_memory"] == "1GiB"


def test_without_a_budget_a_prediction_over_the_gpu_names_the_longest_context(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (8 * 2**30, 8 * 2**30))
    lines = []
    cfg = TrainConfig(**{**BASE, "max_seq_length": 65536, "load_in_4bit": True})
    assert apply_memory_plan(cfg, log=lines.append) is cfg  # a warning, not a change
    warning = next(line for line in lines if line.startswith("memory warning"))
    longest = int(warning.split("longest max_seq_length that fits is ")[1].split(".")[0])
    assert 0 < longest < 65536 and longest % 128 == 0 and "--max-memory 8GiB" in warning
