"""CUDA-graph steps for unpacked data: one step per length bucket, gradients shared between them.

CPU: the buckets, and bucketed steps run eagerly (same plumbing: static buffers, PLE rows, shared gradients) equal
the standard step over batches of many widths, with and without gradient accumulation. GPU (device only): the
captured buckets, replayed in mixed order, equal the same steps run eagerly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.adapt.inject import trainable_parameters
from slimtune.data.collate import collate
from slimtune.data.tokenize import IGNORE_INDEX, Example
from slimtune.train.graph_buckets import GraphSteps, bucket_for, bucket_widths
from slimtune.train.optimizer import make_optimizer

from graph_models import sgd, train_standard
from graph_models import tiny_lora_model as _model

WIDTHS = (150, 40, 300, 130, 60, 290, 170, 35)  # buckets 192, 128, 384, 192, 128, 384, 192, 128 (max 384)


def test_buckets_grow_by_at_most_half_and_end_at_the_maximum():
    assert bucket_widths(2048) == [128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
    for max_len in (96, 128, 1000, 2048, 3000, 8192):
        widths = bucket_widths(max_len)
        assert widths[-1] == max_len and widths == sorted(set(widths))
        assert all(b <= 1.5 * a for a, b in zip(widths, widths[1:-1]))
        for w in {min(w, max_len) for w in (1, 127, 129, max_len // 2 + 1, max_len)}:
            got = bucket_for(w, max_len)
            assert got >= w and got in widths and not any(w <= x < got for x in widths)
    with pytest.raises(ValueError, match="wider than max_seq_length=512"):
        bucket_for(513, 512)


def _batches(vocab: int, widths=WIDTHS) -> list[dict]:
    """Batches of two rows each, the longer `width` tokens, prompts masked out of the loss (CPU tensors)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for width in widths:
        rows = []
        for length in (width, max(2, width // 3)):
            ids = torch.randint(5, vocab, (length,), generator=g).tolist()
            rows.append(Example(ids, [IGNORE_INDEX] * 4 + ids[4:]))
        out.append(collate(rows, pad_id=0))
    return out


def _state(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _bucketed(model, windows, device, dtype, make_opt, *, capture):
    params = trainable_parameters(model)
    opt = make_opt(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    steps = GraphSteps(model, params, opt, device=device, dtype=dtype, max_grad_norm=1.0, capture=capture,
                       max_seq_length=384, pad_id=0, packed=False, batch_size=2)
    losses, padded = [], []
    for window in windows:
        loss, _, _, tokens = steps(window)
        sched.step()
        losses.append(float(loss))
        padded.append(tokens)
        # the shared-gradient protocol: allocated and zero after every step, whichever bucket ran
        assert all(p.grad is not None and not p.grad.any() for p in params)
    return losses, steps, padded


@pytest.mark.parametrize("accum", [1, 2], ids=["one-batch", "accumulation"])
def test_bucketed_steps_equal_the_standard_step_on_cpu(tiny_dir, accum):
    dev, dtype = torch.device("cpu"), torch.float32
    ref = _model(tiny_dir, dev, dtype)
    batches = _batches(ref.config.vocab_size)
    windows = [batches[i:i + accum] for i in range(0, len(batches), accum)]
    want = train_standard(ref, windows, dev, dtype)
    ours = _model(tiny_dir, dev, dtype)
    got, steps, padded = _bucketed(ours, windows, dev, dtype, sgd, capture=False)
    # a window is padded to the bucket of its widest batch
    expect = [bucket_for(max(b["input_ids"].shape[1] for b in w), 384) for w in windows]
    assert sorted(steps.steps) == sorted(set(expect)) and len(steps.steps) >= 2
    # the first bucket warms up twice (optimizer state, library set-up), later ones once (only their new shape)
    assert [steps.steps[w].warmup for w in dict.fromkeys(expect)] == [2] + [1] * (len(steps.steps) - 1)
    assert padded == [2 * len(w) * e for w, e in zip(windows, expect)]
    assert got == pytest.approx(want, rel=1e-5)
    a, b, start = _state(ours), _state(ref), _state(_model(tiny_dir, dev, dtype))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3 * moved
    steps.close()
    assert not ours.slimtune_static_loss


def test_unpacked_graph_runs_train_like_eager_runs(tiny_dir, tmp_path):
    from slimtune.train.config import TrainConfig
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    base = dict(model=str(tiny_dir("e2b", text_only=True)), data=str(data), max_steps=8, lr=1e-3, batch_size=2,
                max_seq_length=256, lora_r=4, seed=0, device="cpu", grad_accum=2, eval_fraction=0.05, eval_steps=4)
    graphs = train(TrainConfig(output=str(tmp_path / "g"), cuda_graphs=True, **base), log=lambda *_: None)
    eager = train(TrainConfig(output=str(tmp_path / "e"), cuda_graphs=False, **base), log=lambda *_: None)
    assert [r["loss"] for r in graphs.history] == pytest.approx([r["loss"] for r in eager.history], rel=1e-4)
    # evaluation in between pauses the bucketed steps (per-call paths) and training goes on after it
    evals = [[r["eval_loss"] for r in run.history if "eval_loss" in r] for run in (graphs, eager)]
    assert len(evals[0]) == 2 and evals[0] == pytest.approx(evals[1], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("accum", [1, 2], ids=["one-batch", "accumulation"])
def test_captured_buckets_replayed_in_mixed_order_equal_eager_on_gpu(tiny_dir, accum):
    from slimtune.adapt.attention import enable_slimtune_attention

    dev, dtype = torch.device("cuda"), torch.bfloat16
    # every bucket comes back after others have captured: a graph reading freed or stale memory shows here
    widths = WIDTHS * 3
    batches = _batches(_model(tiny_dir, "cpu", torch.float32).config.vocab_size, widths)
    windows = [batches[i:i + accum] for i in range(0, len(batches), accum)]
    adamw = lambda params: make_optimizer(params, lr=1e-2, fused=True, capturable=True)  # noqa: E731

    def run(capture):
        model = _model(tiny_dir, dev, dtype)
        enable_slimtune_attention(model)
        losses, steps, _ = _bucketed(model, windows, dev, dtype, adamw, capture=capture)
        captured = steps.captured
        steps.close()
        return losses, _state(model), captured

    want, b, _ = run(False)
    got, a, captured = run(True)
    assert captured >= 3  # every bucket captured (one graph each, two under accumulation)
    assert got == pytest.approx(want, rel=2e-2)
    worst = max(float((a[k] - b[k]).norm() / (b[k].norm() + 1e-12)) for k in a)
    assert worst < 2e-2, worst


def test_pad_rows_keep_the_captured_shape_and_add_no_targets():
    from slimtune.data.collate import count_real_tokens, count_targets, pad_batch_to

    batch = _batches(50, widths=(30,))[0]
    one = {k: v[:1] for k, v in batch.items()}  # an epoch's last batch: one sample where the step has two rows
    fixed = pad_batch_to(one, 64, pad_id=0, rows=2)
    assert {k: tuple(v.shape) for k, v in fixed.items()} == {k: (2, 64) for k in batch}
    assert count_targets(fixed) == count_targets(one) and count_real_tokens(fixed) == count_real_tokens(one)
    assert not fixed["attention_mask"][1].any() and (fixed["input_ids"][1] == 0).all()
    with pytest.raises(ValueError, match="more than the fixed 1"):
        pad_batch_to(batch, 64, pad_id=0, rows=1)


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_a_graphs_run_goes_past_an_epochs_smaller_last_batch(tiny_dir, tmp_path, packing):
    """5 samples in batches of 2: every epoch ends on a batch of one. A captured step has a fixed number of rows,
    so that batch used to stop the run ("batch input_ids has shape (1, W), the captured step (2, W)")."""
    import json

    from slimtune.train.config import TrainConfig
    from slimtune.train.run import train

    data = tmp_path / "five.jsonl"
    data.write_text("".join(json.dumps({"text": "alpha beta gamma " * (3 + i)}) + "\n" for i in range(5)))
    base = dict(model=str(tiny_dir("e2b", text_only=True)), data=str(data), max_steps=7, batch_size=2, lr=1e-3,
                max_seq_length=64, lora_r=4, device="cpu", seed=0, packing=packing, eval_fraction=0)
    graphs = train(TrainConfig(output=str(tmp_path / "g"), cuda_graphs=True, **base), log=lambda *_: None)
    eager = train(TrainConfig(output=str(tmp_path / "e"), cuda_graphs=False, **base), log=lambda *_: None)
    assert len(graphs.history) == 7 and max(r["epoch"] for r in graphs.history) > 2
    assert [r["loss"] for r in graphs.history] == pytest.approx([r["loss"] for r in eager.history], rel=1e-4)
    assert [r["tokens"] for r in graphs.history] == [r["tokens"] for r in eager.history]  # pad rows not counted


class _WidestElsewhere:
    """Stands in for RankSum: another rank's batch is `width` tokens wide; sums are one rank's."""

    def __init__(self, width: int) -> None:
        self.width, self.checked = width, True

    def host_max(self, value: float) -> float:
        return max(value, self.width)

    def host(self, values):
        return list(values)

    def sum_(self, tensors) -> None:
        pass


def test_ranks_pad_to_the_bucket_of_the_widest_batch_on_any_rank(tiny_dir):
    """NCCL needs every rank to capture and replay the same graph at the same step, so under data parallelism
    a 40-token batch next to another rank's 300-token one runs in the 384 bucket (not its own 128)."""
    dev, dtype = torch.device("cpu"), torch.float32
    model = _model(tiny_dir, dev, dtype)
    params = trainable_parameters(model)
    steps = GraphSteps(model, params, sgd(params), device=dev, dtype=dtype, max_grad_norm=1.0, capture=False,
                       max_seq_length=384, pad_id=0, packed=False, batch_size=2, rank_sum=_WidestElsewhere(300))
    _, _, _, padded = steps(_batches(model.config.vocab_size, (40,)))
    assert sorted(steps.steps) == [384] and padded == 2 * 384
    steps.close()
