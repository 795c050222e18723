"""Evaluation: the eval loss is the token-weighted CE, best/ tracks the best eval, early stopping stops."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import slimtune
from slimtune.data import load_records
from slimtune.data.tokenize import IGNORE_INDEX, text_tokenizer, tokenize_rows
from slimtune.train import loop
from slimtune.train.config import TrainConfig
from slimtune.train.evaluate import EvalTracker, evaluate, split_eval
from slimtune.train.run import prepare_model, train

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"




def _cfg(model, out, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(BUNDLED), output=str(out), batch_size=2, max_seq_length=64, lora_r=4,
                lora_alpha=8, lr=1e-2, gradient_checkpointing=False, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def _hand_eval_loss(model, examples) -> float:
    """Sum of next-token CE over every target token, one unpadded sample at a time, through the HF forward."""
    total, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0].double()  # softcapped by HF
            targets = torch.tensor(e.labels[1:])
            keep = targets != IGNORE_INDEX
            total += float(F.cross_entropy(logits[:-1][keep], targets[keep], reduction="sum"))
            n += int(keep.sum())
    return total / n


def test_eval_loss_matches_hand_computation(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir("e2b", text_only=True), tmp_path / "r")
    model, tok = prepare_model(cfg)
    with torch.no_grad():  # non-zero LoRA B so the adapter takes part in the result
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    rows = load_records(str(BUNDLED)).rows[:7]
    examples, _ = tokenize_rows(rows, tok, max_seq_length=64, train_on="assistant")
    model.train()
    got, n = evaluate(model, examples, pad_id=text_tokenizer(tok).pad_token_id or 0, device=torch.device("cpu"),
                      dtype=torch.float32, batch_size=3)  # 3 does not divide 7: a ragged, padded last batch
    assert model.training, "evaluate must restore train mode"
    model.eval()
    want = _hand_eval_loss(model, examples)
    assert n == sum(e.n_targets for e in examples)
    assert abs(got - want) <= 1e-5 * want, (got, want)


def test_split_eval_is_seeded_and_disjoint():
    items = list(range(50))
    train_a, eval_a = split_eval(items, 0.1, seed=3)
    train_b, eval_b = split_eval(items, 0.1, seed=3)
    assert (train_a, eval_a) == (train_b, eval_b) and len(eval_a) == 5
    assert sorted(train_a + eval_a) == items and split_eval(items, 0.1, seed=4)[1] != eval_a


def test_training_logs_eval_loss_best_and_tensorboard(tiny_dir, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir("e2b", text_only=True), out, max_steps=4, eval_fraction=0.05, eval_steps=2, save_steps=2)
    result = train(cfg, log=lambda *_: None)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    best_step = min(evals, key=evals.get)
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best == {"step": best_step, "eval_loss": evals[best_step]} and result.best_step == best_step
    assert (out / "best" / "adapter_config.json").is_file()
    # the loop's eval loss at the last step is the hand-computed loss of the final adapter on the same split
    model, tok = slimtune.load_model(cfg.model, device="cpu", max_seq_length=64)
    slimtune.load_adapter(model, out / "adapter")
    examples, _ = tokenize_rows(load_records(str(BUNDLED)).rows, tok, max_seq_length=64, train_on="assistant")
    _, held = split_eval(examples, 0.05, seed=0)
    assert abs(_hand_eval_loss(model, held) - evals[4]) <= 1e-5 * evals[4]
    try:  # events only when tensorboard is installed; without it training must simply not write them
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert not (out / "tb").exists()
    else:
        assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())


def test_qlora_run_evaluates_on_cpu_with_tiny_widths(tiny_dir, tmp_path):
    """QLoRA evaluation on CPU: bitsandbytes repacks NF4 weights for its CPU inference kernel at the first no-grad
    eval forward (on AVX512-BF16 CPUs) and failed on the demo model's 16-wide per-layer projection."""
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir("e2b", text_only=True, size="demo"), out, max_steps=2, eval_fraction=0.1, eval_steps=1,
               load_in_4bit=True)
    train(cfg, log=lambda *_: None)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in records if "eval_loss" in r)
    assert sum("eval_loss" in r for r in records) == 2


def test_early_stopping_stops_and_best_holds_the_best_steps_adapter(tiny_dir, tmp_path, monkeypatch):
    # Scripted eval losses make the stopping point exact: best at step 2, then two evaluations without improvement.
    losses = iter([5.0, 4.0, 4.5, 4.0, 3.0, 2.0, 1.0, 0.5])
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (next(losses), 1))
    out = tmp_path / "run"
    cfg = _cfg(tiny_dir("e2b", text_only=True), out, max_steps=8, eval_fraction=0.1, eval_steps=1,
               early_stopping_patience=2, save_steps=1)
    result = train(cfg, log=lambda *_: None)
    assert result.stopped_early and [h["step"] for h in result.history] == [1, 2, 3, 4]
    assert json.loads((out / "best" / "metrics.json").read_text()) == {"step": 2, "eval_loss": 4.0}
    best = load_file(out / "best" / "adapter_model.safetensors")
    at_2 = load_file(out / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors")
    at_3 = load_file(out / "checkpoints" / "step-000003" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(best[k], at_2[k]) for k in at_2)
    assert not all(torch.equal(best[k], at_3[k]) for k in at_3)


def test_eval_tracker_counts_evaluations_without_improvement():
    t = EvalTracker(patience=2)
    assert t.update(1, 3.0) and not t.update(2, 3.0) and not t.should_stop  # equal is not an improvement
    assert not t.update(3, 3.5) and t.should_stop
    restored = EvalTracker(2)
    restored.load_state_dict(t.state_dict())
    assert (restored.best_loss, restored.best_step, restored.should_stop) == (3.0, 1, True)
