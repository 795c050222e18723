"""Export error paths: each raises ExportError with an actionable message and leaves nothing behind."""

from __future__ import annotations

import errno
import json
import shutil

import pytest

from slimtune.errors import ExportError
from slimtune.export import EXPORT_FORMATS, export
from slimtune.export import checkpoint as ckpt_io


def _leftovers(parent, name):
    """Anything at `name` or a temp/backup folder of it in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def _copy_run(text_run, dst, *, model=None):
    shutil.copytree(text_run.run_dir / "adapter", dst / "adapter")
    (dst / "config.yaml").write_text(f"model: {model or text_run.base_dir}\n", encoding="utf-8")
    return dst


def test_source_without_adapter(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(ExportError, match=r"no adapter found in .*adapter_config\.json.*saved a checkpoint"):
        export(tmp_path / "run", "lora", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_exists_without_overwrite(text_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"already exists; pass overwrite=True"):
        export(text_run.run_dir, "lora", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_overwrite_replaces(text_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    out = export(text_run.run_dir, "lora", tmp_path / "out", overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert _leftovers(tmp_path, "out") == ["out"]


def test_unknown_format_lists_valid_ones(text_run, tmp_path):
    with pytest.raises(ExportError) as exc:
        export(text_run.run_dir, "gguf-q4_k_m", tmp_path / "out")
    assert "unknown export format 'gguf-q4_k_m'" in str(exc.value)
    for name in EXPORT_FORMATS:
        assert name in str(exc.value)


def test_base_model_not_found(text_run, tmp_path):
    run = _copy_run(text_run, tmp_path / "run", model=tmp_path / "nowhere" / "gemma-4-E2B-it")
    with pytest.raises(ExportError, match=r"base model .*nowhere.* not found.*Download it first"):
        export(run, "merged-16bit", tmp_path / "out")
    assert _leftovers(tmp_path, "out") == []

    (run / "config.yaml").write_text("model: google/not-a-cached-model\n", encoding="utf-8")
    with pytest.raises(ExportError, match=r"not in the local Hugging Face cache.*hf download google/not-a-cached-model"):
        export(run, "gguf-bf16", tmp_path / "out")


def test_adapter_keys_matching_no_base_weight(text_run, mm_run, tmp_path):
    # The multimodal adapter (vision/audio modules) against the text-only base.
    run = tmp_path / "run"
    shutil.copytree(mm_run.run_dir / "adapter", run / "adapter")
    (run / "config.yaml").write_text(f"model: {text_run.base_dir}\n", encoding="utf-8")
    with pytest.raises(ExportError, match=r"adapter module\(s\) match no weight in the base model.*(audio|vision)_tower.*"
                                          r"trained on a different model"):
        export(run, "merged-16bit", tmp_path / "out")
    with pytest.raises(ExportError, match=r"match no weight"):
        export(run, "lora", tmp_path / "out")  # the lora format validates against the base too
    assert _leftovers(tmp_path, "out") == []


def test_adapter_that_is_not_lora(text_run, tmp_path):
    run = _copy_run(text_run, tmp_path / "run")
    cfg_path = run / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_dora"] = True
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"DoRA .*format='lora'"):
        export(run, "merged-16bit", tmp_path / "out")
    cfg["peft_type"] = "IA3"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"peft_type='IA3'; only LoRA"):
        export(run, "merged-16bit", tmp_path / "out")


@pytest.mark.parametrize("fmt", ["merged-16bit", "gguf-q8_0"])
def test_disk_full_leaves_nothing(text_run, tmp_path, monkeypatch, fmt):
    """A simulated ENOSPC after some bytes were written: ExportError, no `out`, no temp folder."""
    calls = {"n": 0}
    real_write = ckpt_io.write_shard

    def filling_disk(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:
            path.write_bytes(b"\0" * 1024)  # a partial shard, as a real full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(tensors, path)

    monkeypatch.setattr(ckpt_io, "write_shard", filling_disk)
    with pytest.raises(ExportError, match=r"disk filled up while writing.*Nothing was left behind.*free space"):
        export(text_run.run_dir, fmt, tmp_path / "out", progress=False)
    assert calls["n"] == 3
    assert _leftovers(tmp_path, "out") == []


def test_disk_full_while_writing_gguf(text_run, tmp_path, monkeypatch):
    import gguf

    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def filling_disk(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", filling_disk)
    with pytest.raises(ExportError, match=r"disk filled up"):
        export(text_run.run_dir, "gguf-bf16", tmp_path / "out", progress=False)
    assert _leftovers(tmp_path, "out") == []
