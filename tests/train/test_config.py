"""TrainConfig validation of the eval/resume fields, the model-limit check, and YAML round-trips of new fields."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import slimtune
from slimtune.cli.main import main
from slimtune.errors import ConfigError
from slimtune.train.config import TrainConfig
from slimtune.train.config_io import resolve_config

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
NEW_FIELDS = ("resume", "eval_data", "eval_fraction", "eval_steps", "early_stopping_patience")


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"model": "m", "data": "d", "output": "o", **kw})


def test_eval_settings_are_checked_together():
    with pytest.raises(ConfigError) as info:
        _cfg(eval_data="held.jsonl", eval_fraction=0.1, eval_steps=-1, early_stopping_patience=1.5)
    msg = str(info.value)
    assert "mutually exclusive" in msg and "eval_steps must be >= 0" in msg and "early_stopping_patience" in msg
    for field in ("eval_steps", "early_stopping_patience"):
        with pytest.raises(ConfigError, match=f"{field}=3 needs an eval set"):
            _cfg(**{field: 3})
    with pytest.raises(ConfigError, match=r"eval_fraction must be in \[0, 1\)"):
        _cfg(eval_fraction=1.0)
    assert _cfg(eval_fraction=0.2, eval_steps=5, early_stopping_patience=2).has_eval_set()


@pytest.mark.parametrize("text_only", [True, False])
def test_max_seq_length_beyond_the_local_models_limit(tiny_dir, text_only):
    model = tiny_dir("e2b", text_only=text_only)
    config = json.loads((model / "config.json").read_text())
    limit = (config.get("text_config") or config)["max_position_embeddings"]
    _cfg(model=str(model), max_seq_length=limit)
    with pytest.raises(ConfigError) as info:
        _cfg(model=str(model), max_seq_length=limit + 1)
    assert f"at most {limit}" in str(info.value) and "max_position_embeddings" in str(info.value)
    _cfg(model="google/gemma-4-E2B-it", max_seq_length=10**7)  # hub ids are checked when loaded


def test_new_fields_round_trip_through_config_yaml(tiny_dir, tmp_path, request):
    request.addfinalizer(lambda n=torch.get_num_threads(): torch.set_num_threads(n))
    torch.set_num_threads(1)  # a 2-step tiny run: more threads only contend for CI cores
    model = tiny_dir("e2b", text_only=True)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(BUNDLED.read_text().splitlines(keepends=True)[:4]))
    run = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(BUNDLED), "--output", str(run), "--max-steps", "2",
            "--batch-size", "2", "--max-seq-length", "64", "--lora-r", "4", "--no-gradient-checkpointing",
            "--device", "cpu", "--eval-data", str(held), "--eval-steps", "1", "--early-stopping-patience", "3",
            "--resume"]
    assert main(argv) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: saved[k] for k in NEW_FIELDS} == {"resume": True, "eval_data": str(held), "eval_fraction": 0.0,
                                                 "eval_steps": 1, "early_stopping_patience": 3}
    again = resolve_config(run / "config.yaml")
    assert again.to_dict() == saved
    # eval_fraction is exclusive with eval_data, so its round trip is a second file
    frac = resolve_config(run / "config.yaml", eval_data=None, eval_fraction=0.25, resume=False)
    (tmp_path / "frac.yaml").write_text(yaml.safe_dump(frac.to_dict()))
    assert resolve_config(tmp_path / "frac.yaml") == frac
    # and the run that config.yaml describes used them: eval every step
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_loss" in r for r in lines) and (run / "best" / "metrics.json").is_file()


def test_yaml_rejects_wrong_types_for_new_fields(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndata: d\noutput: o\nresume: 'yes'\neval_steps: 1.5\n")
    with pytest.raises(ConfigError) as info:
        resolve_config(bad)
    assert "resume: expected bool" in str(info.value) and "eval_steps: expected int" in str(info.value)
