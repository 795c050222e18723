"""CUDA-graph steps with an optimizer that cannot be captured (8-bit AdamW): forward and backward are replayed as the
micro-batch graph and the optimizer steps eagerly after them (slimtune.train.cuda_graph, `eager_update`).

CPU: that structure, run uncaptured, equals the standard step; which optimizers step inside the graph; 8-bit AdamW
trains through it. GPU (device only): captured with 8-bit AdamW equals the same steps run eagerly."""

from __future__ import annotations

import pytest
import torch

from slimtune.adapt.inject import trainable_parameters
from slimtune.train.cuda_graph import GraphedTrainStep, captures_update
from slimtune.train.optimizer import make_optimizer

from graph_models import run_graphed, sgd, train_standard
from graph_models import tiny_lora_model as _model
from test_cuda_graph import _batches, _lora_state


def test_which_optimizers_step_inside_the_graph():
    p = [torch.nn.Parameter(torch.zeros(4))]
    assert not captures_update(torch.optim.AdamW(p, lr=1e-3))  # its step count lives on the host
    assert not captures_update(sgd(p))
    assert not captures_update(make_optimizer(p, name="adamw8bit", lr=1e-3))
    if torch.cuda.is_available():
        q = [torch.nn.Parameter(torch.zeros(4, device="cuda"))]
        assert captures_update(make_optimizer(q, lr=1e-3, fused=True, capturable=True))


def test_eager_update_equals_the_standard_step_on_cpu(tiny_dir, one_thread):
    dev, dtype = torch.device("cpu"), torch.float32
    ref = _model(tiny_dir, dev, dtype)
    batches = _batches(ref, 4)
    want = train_standard(ref, batches, dev, dtype)
    ours = _model(tiny_dir, dev, dtype)
    got, step = run_graphed(ours, batches, dev, dtype, sgd, capture=False, eager_update=True)
    assert step.accumulating and not step.update_captured  # one batch still runs as a window of one
    assert got == pytest.approx(want, rel=1e-5)
    a, b, start = _lora_state(ours), _lora_state(ref), _lora_state(_model(tiny_dir, dev, dtype))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3 * moved
    step.close()
    # uncaptured without the switch: the one-graph structure the capturable AdamW gets on a GPU
    plain = GraphedTrainStep(ours, trainable_parameters(ours), sgd(trainable_parameters(ours)), batches[0],
                             device=dev, dtype=dtype, capture=False)
    assert plain.update_captured
    plain.close()


def test_adamw8bit_trains_through_the_eager_update_on_cpu(tiny_dir, one_thread):
    dev, dtype = torch.device("cpu"), torch.float32
    model = _model(tiny_dir, dev, dtype)
    batches = _batches(model, 1) * 6  # one batch again and again: the loss must fall
    adamw8bit = lambda params: make_optimizer(params, name="adamw8bit", lr=1e-2)  # noqa: E731
    losses, step = run_graphed(model, batches, dev, dtype, adamw8bit, capture=False, eager_update=True)
    states = [s for s in step.optimizer.state.values() if s]  # tiny tensors: bitsandbytes keeps their state 32-bit
    assert len(states) == len(step.params) and all(s["step"] == len(batches) for s in states)
    assert losses[-1] < losses[0]
    step.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_forward_backward_with_adamw8bit_equals_eager_on_gpu(tiny_dir):
    from slimtune.adapt.attention import enable_slimtune_attention

    dev, dtype = torch.device("cuda"), torch.bfloat16
    batches = _batches(_model(tiny_dir, "cpu", torch.float32), 6)
    adamw8bit = lambda params: make_optimizer(params, name="adamw8bit", lr=1e-2, capturable=True)  # noqa: E731

    def run(capture):
        model = _model(tiny_dir, dev, dtype)
        enable_slimtune_attention(model)
        losses, step = run_graphed(model, batches, dev, dtype, adamw8bit, capture=capture, warmup=2)
        graphs = set(step.graphs)
        step.close()
        return losses, _lora_state(model), graphs

    want, b, _ = run(False)
    got, a, graphs = run(True)
    assert graphs == {"micro"}  # forward and backward replayed; the 8-bit update never captured
    assert got == pytest.approx(want, rel=2e-2)
    worst = max(float((a[k] - b[k]).norm() / (b[k].norm() + 1e-12)) for k in a)
    assert worst < 2e-2, worst


def test_a_graphs_run_with_adamw8bit_trains_like_the_eager_run(tiny_dir, tmp_path, one_thread):
    """`cuda_graphs: true` with `optimizer: adamw8bit` is a valid run now (it was refused): on CPU its fixed-shape
    steps run uncaptured and must give the eager run's losses."""
    from pathlib import Path

    import slimtune
    from slimtune.train.config import TrainConfig
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    base = dict(model=str(tiny_dir("e2b", text_only=True)), data=str(data), max_steps=4, lr=1e-3, batch_size=2,
                max_seq_length=96, lora_r=4, device="cpu", seed=0, packing=True, optimizer="adamw8bit")
    plain = train(TrainConfig(output=str(tmp_path / "a"), **base), log=lambda *_: None)
    graphs = train(TrainConfig(output=str(tmp_path / "b"), cuda_graphs=True, **base), log=lambda *_: None)
    assert [r["loss"] for r in graphs.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_length_buckets_with_adamw8bit_replay_like_eager_on_gpu(tiny_dir):
    """Unpacked runs (one graph per length bucket, gradients shared) with the 8-bit update eager after each replay:
    the path `cuda_graphs: true` + `optimizer: adamw8bit` takes on data of many lengths."""
    from slimtune.adapt.attention import enable_slimtune_attention
    from slimtune.train.graph_buckets import GraphSteps

    from test_graph_buckets import WIDTHS
    from test_graph_buckets import _batches as _wide_batches

    dev, dtype = torch.device("cuda"), torch.bfloat16
    batches = _wide_batches(_model(tiny_dir, "cpu", torch.float32).config.vocab_size, WIDTHS * 2)

    def run(capture):
        model = _model(tiny_dir, dev, dtype)
        enable_slimtune_attention(model)
        params = trainable_parameters(model)
        opt = make_optimizer(params, name="adamw8bit", lr=1e-2)
        steps = GraphSteps(model, params, opt, device=dev, dtype=dtype, max_grad_norm=1.0, capture=capture,
                           max_seq_length=384, pad_id=0, packed=False, batch_size=2)
        losses = [float(steps([b])[0]) for b in batches]
        graphs = {name for step in steps.steps.values() for name in step.graphs}
        steps.close()
        return losses, _lora_state(model), graphs

    want, b, _ = run(False)
    got, a, graphs = run(True)
    assert graphs == {"micro"}
    assert got == pytest.approx(want, rel=2e-2)
    worst = max(float((a[k] - b[k]).norm() / (b[k].norm() + 1e-12)) for k in a)
    assert worst < 2e-2, worst
