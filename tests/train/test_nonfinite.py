"""A NaN/inf step is never applied to the LoRA weights, and a run that keeps producing them stops with advice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune.adapt.inject import trainable_parameters
from slimtune.errors import TrainingDivergedError
from slimtune.train import cuda_graph, distributed as dist_mod
from slimtune.train.config import TrainConfig
from slimtune.train.cuda_graph import GraphedTrainStep
from slimtune.train.run import train

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


def _poison(monkeypatch, module, bad_calls):
    """loss_sum returns NaN on the given (1-based) calls: the whole backward becomes NaN, like a real blow-up."""
    real, calls = module.loss_sum, []

    def loss_sum(model, batch):
        calls.append(1)
        loss = real(model, batch)
        return loss * float("nan") if len(calls) in bad_calls else loss

    monkeypatch.setattr(module, "loss_sum", loss_sum)


def _cfg(tiny_dir, out, **kw):
    return TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(BUNDLED), output=str(out), lr=1e-2,
                       batch_size=2, max_seq_length=64, lora_r=4, device="cpu", seed=0, **kw)


def test_one_nan_step_is_skipped_and_the_run_goes_on(tiny_dir, tmp_path, monkeypatch, one_thread):
    _poison(monkeypatch, dist_mod, {3})
    result = train(_cfg(tiny_dir, tmp_path / "run", max_steps=5), log=lambda *_: None)
    hist = result.history
    assert [bool(r.get("skipped")) for r in hist] == [False, False, True, False, False]
    assert all(torch.isfinite(t).all() for t in load_file(result.adapter_dir / "adapter_model.safetensors").values())
    assert all(r["loss"] == r["loss"] for i, r in enumerate(hist) if i != 2)  # later losses are finite again


def test_a_run_that_stays_nan_stops_with_advice(tiny_dir, tmp_path, monkeypatch, one_thread):
    _poison(monkeypatch, dist_mod, set(range(2, 100)))
    with pytest.raises(TrainingDivergedError, match=r"steps 2-4 .*lower lr \(now 0.01\)"):
        train(_cfg(tiny_dir, tmp_path / "run", max_steps=10), log=lambda *_: None)
    assert not (tmp_path / "run" / "adapter").exists()  # no adapter is written as if the run had finished


def test_the_captured_step_body_skips_nan_updates_in_the_fused_adamw(tiny_dir, monkeypatch, one_thread):
    """What a CUDA graph replays: found_inf goes to the fused AdamW, which leaves weights and step count alone."""
    model, _ = slimtune.load_model(tiny_dir("e2b", text_only=True), dtype="float32", device="cpu")
    slimtune.add_lora(model, r=4, alpha=8, seed=3)
    model.train()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    ids = torch.randint(5, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "targets": torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)}
    step = GraphedTrainStep(model, params, opt, batch, device=torch.device("cpu"), dtype=torch.float32,
                            capture=False)
    _poison(monkeypatch, cuda_graph, {2})
    step(batch)
    before = [p.detach().clone() for p in params]
    loss, norm, _ = step(batch)  # the poisoned one
    assert not torch.isfinite(loss) and not torch.isfinite(norm)
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert all(float(opt.state[p]["step"]) == 1 for p in params)
    step(batch)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))  # and the next finite step trains
    step.close()
    assert not hasattr(opt, "found_inf")
