"""26B-A4B and 31B have num_kv_shared_layers = 0: nothing may slice [:-0] (failure mode 3)."""

import pytest
import torch

import slimtune
from slimtune.train.config import TrainConfig
from slimtune.train.run import train

BUNDLED = __import__("pathlib").Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


@pytest.mark.parametrize("variant", ["31b", "26b-a4b"])
def test_zero_shared_variant_trains_generates_saves_reloads(tiny_dir, tmp_path, variant):
    path = tiny_dir(variant, text_only=True)
    cfg = TrainConfig(model=str(path), data=str(BUNDLED), output=str(tmp_path / "run"), max_steps=3, lr=1e-3,
                      batch_size=2, max_seq_length=64, lora_r=4, device="cpu", seed=0)
    result = train(cfg, log=lambda *_: None)
    assert len(result.history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    model, tok = slimtune.load_model(path, dtype="float32", device="cpu")
    assert model.config.num_kv_shared_layers == 0
    slimtune.load_adapter(model, result.adapter_dir)
    ids = torch.tensor([[2, 10, 11, 12]])
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    # a static cache is where the old [:-0] slice produced zero cache layers
    out_static = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(out, out_static)
