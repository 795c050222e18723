"""benchmarks/gpu/anchors_geometry.py: the anchor probes' E2B config replaced by another geometry's, in place.

For E2B the replacement must be the anchors' own config (then E4B is the same recipe with other numbers); runs
where the anchor probes are available (.anchors/ or ../shared/bench/anchors), skipped elsewhere."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks/gpu/anchors_geometry.py"


def _module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def probe(monkeypatch, tmp_path):
    import torch

    script = _module(SCRIPT, "anchors_geometry")
    try:
        folder = script.anchors_folder(None)
    except SystemExit:
        pytest.skip("anchor probes not in .anchors/ or ../shared/bench/anchors")
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("ANCHOR_OUT", str(tmp_path))  # the probe records its versions line at import
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "cpu (test)")
    return script, _module(folder / "probe_hf_baseline.py", "probe_hf_baseline_under_test")


def _config(kwargs):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**kwargs).to_dict()


def test_e2b_replacement_is_the_anchors_own_config(probe):
    script, hf = probe
    anchors = _config(dict(hf.E2B_TEXT))
    config = hf.E2B_TEXT
    script.use_geometry(hf, "e2b")
    assert hf.E2B_TEXT is config  # mutated in place: the Unsloth probe imports this very dict
    ours = _config(hf.E2B_TEXT)
    differ = {k for k in anchors if k != "transformers_version" and anchors[k] != ours.get(k)}
    assert not differ, {k: (anchors[k], ours.get(k)) for k in differ}


def test_e4b_replacement_changes_the_geometry_and_the_folder(probe):
    script, hf = probe
    save = script.use_geometry(hf, "e4b")
    assert save == "/tmp/e4b_text_random" and hf.SAVE == save
    assert hf.E2B_TEXT["hidden_size"] == 2560 and hf.E2B_TEXT["num_hidden_layers"] == 42


def test_bad_runs_and_checkpoint_misuse_are_refused():
    for args, message in [(["--probe", "hf", "--geometry", "e4b", "--runs", "qlora"], "mode:seq"),
                          (["--probe", "hf", "--checkpoint", "/tmp/x"], "--probe unsloth")]:
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-500:]
