"""Every bad input named in the core issue gets a clear, actionable message (never a bare traceback)."""

import json
import shutil

import pytest

import slimtune
from slimtune.errors import ConfigError, ModelLoadError, UnsupportedModelError
from slimtune.train.config import TrainConfig
from slimtune.train.config_io import resolve_config


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_dir("e2b", text_only=True), dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        slimtune.load_model(tmp_path / "nope")


def test_offline_hub_id_names_the_id_and_suggests_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"google/gemma-4-nonexistent.*local folder"):
        slimtune.load_model("google/gemma-4-nonexistent")


def test_unknown_model_type(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"'llama' is not supported.*gemma4"):
        slimtune.load_model(d)


def test_missing_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        slimtune.load_model(d)


def test_corrupt_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        slimtune.load_model(d)


def test_missing_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="has no weights"):
        slimtune.load_model(d)


def test_truncated_weights(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    f = next(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        slimtune.load_model(d)


def test_bad_dtype_and_seq_length(tiny_dir):
    with pytest.raises(ConfigError, match="dtype 'float8'"):
        slimtune.load_model(tiny_dir("e2b", text_only=True), dtype="float8")
    with pytest.raises(ConfigError, match="max_seq_length=10000000"):
        slimtune.load_model(tiny_dir("e2b", text_only=True), max_seq_length=10_000_000)


def test_lora_settings(tiny_dir):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), device="cpu")
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        slimtune.add_lora(model, r=0)
    with pytest.raises(ConfigError, match="matched no linear layer.*q_proj"):
        slimtune.add_lora(model, target_modules=["nonexistent_proj"])
    with pytest.raises(ConfigError, match="no vision tower"):
        slimtune.add_lora(model, finetune_vision_layers=True)
    slimtune.add_lora(model)
    with pytest.raises(ConfigError, match="already has LoRA"):
        slimtune.add_lora(model)


def test_save_without_lora_and_bad_adapter(tiny_dir, tmp_path):
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), device="cpu")
    with pytest.raises(ConfigError, match="no LoRA adapters to save"):
        slimtune.save_adapter(model, tmp_path / "a")
    with pytest.raises(ModelLoadError, match="adapter_config.json is missing"):
        slimtune.load_adapter(model, tmp_path)


def test_adapter_from_another_model(tiny_dir, tmp_path):
    other, _ = slimtune.load_model(tiny_dir("e2b", text_only=False), device="cpu")
    slimtune.add_lora(other, finetune_language_layers=False, finetune_vision_layers=True)
    slimtune.save_adapter(other, tmp_path / "a")
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), device="cpu")
    with pytest.raises(ConfigError, match="does not fit this model"):
        slimtune.load_adapter(model, tmp_path / "a")


def test_train_config_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        TrainConfig(model="m", data="d", output="o", lora_r=0, grad_accum=0, lr=-1)
    msg = str(err.value)
    assert "lora_r" in msg and "grad_accum" in msg and "lr must be > 0" in msg


def test_yaml_unknown_keys_and_types(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: m\ndata: d\noutput: o\nlearning_rate: 1\nlora_r: sixteen\n")
    with pytest.raises(ConfigError) as err:
        resolve_config(f)
    assert "unknown key 'learning_rate'" in str(err.value) and "lora_r: expected int" in str(err.value)
