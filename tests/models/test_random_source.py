"""`random:<geometry>` model source: random weights of a real geometry, no checkpoint (benchmarks, scale-out)."""

from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.errors import ConfigError


@pytest.fixture
def tiny_geometry(monkeypatch):
    """The real geometries are GPU-sized: build each variant's tiny look-alike instead, through the same path."""
    import slimtune.bench.random_model as rm

    real = rm.build_random_model
    calls = []

    def tiny(variant, **kw):
        calls.append((variant, kw))
        return real(variant, tiny=True, **kw)

    monkeypatch.setattr(rm, "build_random_model", tiny)
    return calls


def test_random_source_trains_and_saves_an_adapter(tiny_geometry, tmp_path):
    from slimtune.train.config import TrainConfig
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    result = train(TrainConfig(model="random:31b", data=str(data), output=str(tmp_path), max_steps=3, lr=1e-3,
                               max_seq_length=64, lora_r=4, device="cpu", load_in_4bit=True, seed=0),
                   log=lambda *_: None)
    assert [v for v, _ in tiny_geometry] == ["31b"] and tiny_geometry[0][1]["mode"] == "qlora"
    assert len(result.history) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "random:31b" in (tmp_path / "adapter" / "adapter_config.json").read_text()


def test_random_source_same_seed_same_weights(tiny_geometry):
    from slimtune.models.loader import load_model

    a, _ = load_model("random:e2b", device="cpu", dtype="float32")
    b, _ = load_model("random:e2b", device="cpu", dtype="float32")
    assert tiny_geometry[0][1]["mode"] == "lora16"
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # every process of a multi-GPU run must build the same model


def test_random_source_names_the_geometries():
    from slimtune.models.loader import load_model

    with pytest.raises(ConfigError, match="random:e2b, random:e4b, random:26b-a4b, random:31b"):
        load_model("random:e3b", device="cpu")
