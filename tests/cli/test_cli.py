"""The CLI contract: tiny-model, train (flags and YAML), chat one-shot, and readable errors."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

import slimtune
from slimtune.cli.main import main

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


def test_tiny_model_variants(tmp_path):
    for variant, text_only in (("e2b", False), ("31b", True)):
        out = tmp_path / f"{variant}-{text_only}"
        args = ["tiny-model", str(out), "--variant", variant] + (["--text-only"] if text_only else [])
        assert main(args) == 0
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == ("gemma4_text" if text_only else "gemma4")
        assert (out / "tokenizer_config.json").is_file()


def test_train_then_chat_subprocess(tiny_dir, tmp_path):
    model = tiny_dir("e2b", text_only=True)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "slimtune", "train", "--model", str(model), "--data", str(BUNDLED), "--output",
           str(run), "--max-steps", "4", "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8", "--batch-size", "2",
           "--grad-accum", "2", "--max-seq-length", "64", "--seed", "1", "--save-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in rows)
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["lora_r"] == 4 and resolved["grad_accum"] == 2 and resolved["seed"] == 1
    # the saved config is a valid --config file; flags override it
    run2 = tmp_path / "run2"
    assert main(["train", "--config", str(run / "config.yaml"), "--output", str(run2), "--max-steps", "1"]) == 0
    assert yaml.safe_load((run2 / "config.yaml").read_text())["max_steps"] == 1
    chat = subprocess.run([sys.executable, "-m", "slimtune", "chat", "--model", str(model), "--adapter",
                           str(run / "adapter"), "--prompt", "What is the capital of France?",
                           "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip()


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    code = main(["train", "--model", str(tmp_path / "missing"), "--data", str(BUNDLED), "--output",
                 str(tmp_path / "r"), "--lora-r", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "lora_r" in err and "Traceback" not in err
    code = main(["train", "--model", str(tmp_path / "missing"), "--data", str(BUNDLED), "--output",
                 str(tmp_path / "r")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
