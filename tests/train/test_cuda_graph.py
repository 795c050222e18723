"""CUDA-graph training steps (slimtune.train.cuda_graph).

CPU: the static-buffer plumbing (batch copies, host-table rows bound as static inputs, masked loss, device loss
scale, dropped attention mask) run eagerly gives the standard step's losses and LoRA weights, over several steps
and batches with ignored targets and right padding. GPU (device only): the captured-and-replayed step equals the
eager one."""

from __future__ import annotations

import pytest
import torch

import slimtune
from slimtune.adapt.inject import trainable_parameters
from slimtune.data.collate import collate
from slimtune.data.tokenize import IGNORE_INDEX, Example
from slimtune.errors import ConfigError
from slimtune.memory.host_embedding import HostOffloadedEmbedding
from slimtune.train.cuda_graph import GraphedTrainStep
from slimtune.train.optimizer import make_optimizer
from slimtune.train.run import enable_checkpointing
from slimtune.train.step import accumulate_gradients, clip_and_step

from graph_models import run_graphed
from graph_models import sgd as _sgd
from graph_models import tiny_lora_model as _model
from graph_models import train_standard as _run_standard


def _batches(model, n, width=40):
    """Right-padded batches of one shape (padded to `width`), prompt tokens masked out of the loss."""
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(n):
        rows = []
        for length in (width, int(torch.randint(10, width, (1,), generator=g))):
            ids = torch.randint(5, model.config.vocab_size, (length,), generator=g).tolist()
            labels = [IGNORE_INDEX] * 4 + ids[4:]
            rows.append(Example(ids, labels))
        out.append(collate(rows, pad_id=0))
    return out


def _lora_state(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run_graphed(model, steps, device, dtype, *, capture, fused):
    """Train on `steps` (batches, or windows of micro-batches); returns (losses, the closed step, whether it
    captured)."""
    adamw = lambda params: make_optimizer(params, lr=1e-2, fused=True, capturable=device.type == "cuda")  # noqa: E731
    losses, step = run_graphed(model, steps, device, dtype, adamw if fused else _sgd, warmup=2, capture=capture)
    captured = bool(step.graphs)
    step.close()
    return losses, step, captured


def test_static_step_equals_standard_step_on_cpu(tiny_dir, one_thread):
    dev, dtype = torch.device("cpu"), torch.float32
    ref = _model(tiny_dir, dev, dtype)
    batches = _batches(ref, 4)
    assert any((b["targets"] == IGNORE_INDEX).sum() > 5 for b in batches)  # masked rows are exercised
    want = _run_standard(ref, batches, dev, dtype)
    ours = _model(tiny_dir, dev, dtype)
    got, step, _ = _run_graphed(ours, batches, dev, dtype, capture=False, fused=False)
    assert step.tables and isinstance(step.tables[0], HostOffloadedEmbedding)  # PLE rows went through the statics
    # fp32 rounding only (the standard path attends with the padding mask, ours without: same values, other
    # kernels); a stale input, PLE row or loss scale moves the loss by > 1e-2
    assert got == pytest.approx(want, rel=1e-5)
    a, b, start = _lora_state(ours), _lora_state(ref), _lora_state(_model(tiny_dir, dev, dtype))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3 * moved
    # close() restores the per-call paths
    assert not ours.slimtune_static_loss and step.tables[0]._static_rows is None


def test_graph_step_keeps_partial_checkpointing(tiny_dir, one_thread):
    """The graph step re-enables checkpointing without RNG saving; checkpoint_layers=k must survive that (it once
    reset every layer to recompute, so a partial setting silently cost the full recompute)."""
    dev, dtype = torch.device("cpu"), torch.float32
    model = _model(tiny_dir, dev, dtype)
    enable_checkpointing(model, 1)
    layers = list(model.get_decoder().layers)
    calls = [0] * len(layers)  # self_attn runs once per forward, again when its layer recomputes in backward
    hooks = [layer.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers)]
    _run_graphed(model, _batches(model, 1), dev, dtype, capture=False, fused=False)
    for h in hooks:
        h.remove()
    assert calls == [2] + [1] * (len(layers) - 1), calls


def test_a_failed_capture_says_how_to_train_anyway(tiny_dir, one_thread, monkeypatch):
    dev = torch.device("cpu")
    model = _model(tiny_dir, dev, torch.float32)
    step = GraphedTrainStep(model, trainable_parameters(model), _sgd(trainable_parameters(model)),
                            _batches(model, 1)[0], device=dev, dtype=torch.float32, capture=False)

    class Refusing:
        def __init__(self, *_a, **_kw): ...
        def __enter__(self): raise RuntimeError("operation not permitted when stream is capturing")
        def __exit__(self, *_a): return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", Refusing)
    with pytest.raises(RuntimeError, match="--no-cuda-graphs") as err:
        step._run("step", lambda: None, eager=False)
    assert "not permitted" in str(err.value) and not step.graphs
    step.close()


def test_gradient_accumulation_window_equals_the_standard_step_on_cpu(tiny_dir, one_thread):
    """A window of micro-batches (micro-batch body k times, then the update body): the standard step's losses and
    weights, with the loss normalised over the whole window's targets."""
    dev, dtype = torch.device("cpu"), torch.float32
    ref = _model(tiny_dir, dev, dtype)
    micro = _batches(ref, 6)
    windows = [micro[0:3], micro[3:6]]
    params = trainable_parameters(ref)
    opt = _sgd(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    want = []
    for w in windows:
        loss, _ = accumulate_gradients(ref, w, device=dev, dtype=dtype)
        clip_and_step(params, opt, sched, max_grad_norm=1.0)
        want.append(loss)
    ours = _model(tiny_dir, dev, dtype)
    params = trainable_parameters(ours)
    opt = _sgd(params)
    step = GraphedTrainStep(ours, params, opt, micro[0], device=dev, dtype=dtype, max_grad_norm=1.0, capture=False)
    got = [float(step(w)[0]) for w in windows]
    assert got == pytest.approx(want, rel=1e-5)
    a, b, start = _lora_state(ours), _lora_state(ref), _lora_state(_model(tiny_dir, dev, dtype))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3 * moved
    step.close()
    single = GraphedTrainStep(ours, params, opt, micro[0], device=dev, dtype=dtype, capture=False)
    single(micro[0])
    with pytest.raises(ConfigError, match="one micro-batch per step"):
        single(micro[:2])
    single.close()


def test_bad_batches_are_refused_with_the_fix(tiny_dir, one_thread):
    dev = torch.device("cpu")
    model = _model(tiny_dir, dev, torch.float32)
    batches = _batches(model, 1)
    params = trainable_parameters(model)
    step = GraphedTrainStep(model, params, make_optimizer(params, lr=1e-3), batches[0], device=dev,
                            dtype=torch.float32, capture=False)
    shorter = _batches(model, 1, width=30)[0]
    with pytest.raises(ConfigError, match="pad every batch to one length"):
        step(shorter)
    left = {k: v.flip(-1) for k, v in batches[0].items()}
    with pytest.raises(ConfigError, match="right-padded"):
        step(left)
    bad = dict(batches[0], targets=batches[0]["targets"].clone())
    bad["targets"][0, 3] = model.config.vocab_size + 5
    with pytest.raises(ConfigError, match="labels outside"):
        step(bad)
    step.close()


def test_unsupported_settings_are_named(tiny_dir, one_thread):
    dev = torch.device("cpu")
    model = _model(tiny_dir, dev, torch.float32)
    params = trainable_parameters(model)
    example = _batches(model, 1)[0]
    with pytest.raises(ConfigError) as err:
        GraphedTrainStep(model, params, make_optimizer(params, lr=1e-3), example, device=dev, dtype=torch.float16)
    text = str(err.value)
    assert "bfloat16" in text and "CUDA device" in text
    from slimtune.models.tiny import build_tiny_model
    from slimtune.train.cuda_graph import graph_step_problems

    moe = build_tiny_model(variant="26b-a4b", text_only=True)
    # transformers' own experts block routes on the host (slimtune's grouped blocks: tests/adapt/test_experts_capture)
    assert any("MoE" in p for p in graph_step_problems(moe, dtype=torch.bfloat16, capture=True))
    assert not graph_step_problems(model, dtype=torch.bfloat16, capture=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("accum", [1, 2], ids=["one-graph", "accumulation-graphs"])
def test_captured_step_equals_eager_on_gpu(tiny_dir, accum):
    dev, dtype = torch.device("cuda"), torch.bfloat16
    from slimtune.adapt.attention import enable_slimtune_attention

    micro = _batches(_model(tiny_dir, "cpu", torch.float32), 6 * accum)
    steps = [micro[i:i + accum] if accum > 1 else micro[i] for i in range(0, len(micro), accum)]

    def run(capture):
        model = _model(tiny_dir, dev, dtype)
        enable_slimtune_attention(model)
        losses, _, captured = _run_graphed(model, steps, dev, dtype, capture=capture, fused=True)
        return losses, _lora_state(model), captured

    want, b, _ = run(False)
    got, a, captured = run(True)
    assert captured  # capture happened at step 3 and steps 3-6 replayed
    assert got == pytest.approx(want, rel=2e-2)
    worst = max(float((a[k] - b[k]).norm() / (b[k].norm() + 1e-12)) for k in a)
    assert worst < 2e-2, worst


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_step_skips_a_non_finite_update_on_gpu(tiny_dir):
    """Inside the graph the optimizer cannot be skipped from Python: found_inf must stop the fused AdamW, so a NaN
    step leaves every weight and the optimizer's step count as they were, and the next finite step trains again."""
    dev, dtype = torch.device("cuda"), torch.bfloat16
    batches = _batches(_model(tiny_dir, "cpu", torch.float32), 6)
    model = _model(tiny_dir, dev, dtype)
    params = trainable_parameters(model)
    opt = make_optimizer(params, lr=1e-2, fused=True, capturable=True)
    step = GraphedTrainStep(model, params, opt, batches[0], device=dev, dtype=dtype, max_grad_norm=1.0, warmup=2)
    for b in batches[:4]:
        step(b)
    assert step.graphs  # the remaining steps replay
    poisoned = params[0]
    keep = poisoned.detach().clone()
    with torch.no_grad():
        poisoned.view(-1)[0] = float("nan")
    before = _lora_state(model)
    counts = [opt.state[p]["step"].clone() for p in params]
    loss, norm, _ = step(batches[4])
    torch.cuda.synchronize()
    assert not torch.isfinite(norm)
    after = _lora_state(model)
    changed = [k for k in before if not torch.equal(before[k].nan_to_num(), after[k].nan_to_num())]
    assert changed == [], changed
    assert all(torch.equal(c, opt.state[p]["step"]) for c, p in zip(counts, params))
    with torch.no_grad():
        poisoned.copy_(keep)
    step(batches[5])
    torch.cuda.synchronize()
    assert any(not torch.equal(before[k].nan_to_num(), v) for k, v in _lora_state(model).items())
    step.close()


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_training_run_with_cuda_graphs_equals_the_standard_run(tiny_dir, tmp_path, one_thread, packing):
    """`cuda_graphs: true` end to end (on CPU the fixed-shape step runs uncaptured): same losses, same adapter, and
    the model leaves the run with its per-call paths back (chat after training must gather PLE rows per call)."""
    from pathlib import Path

    from slimtune.train.config import TrainConfig
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    base = dict(model=str(tiny_dir("e2b", text_only=True)), data=str(data), max_steps=4, lr=1e-3, batch_size=2,
                max_seq_length=96, lora_r=4, device="cpu", seed=0, packing=packing, eval_fraction=0.1, eval_steps=2,
                grad_accum=2 if packing else 1)
    plain = train(TrainConfig(output=str(tmp_path / "a"), **base), log=lambda *_: None)
    graphs = train(TrainConfig(output=str(tmp_path / "b"), cuda_graphs=True, **base), log=lambda *_: None)
    assert [r["loss"] for r in graphs.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)
    assert [r["eval_loss"] for r in graphs.history if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in plain.history if "eval_loss" in r], rel=1e-5)
    assert [r["tokens"] for r in graphs.history] == [r["tokens"] for r in plain.history]  # pads are not counted


def test_cuda_graphs_config_names_what_to_change(tmp_path):
    from slimtune.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        TrainConfig(model="m", data="d", output=str(tmp_path), cuda_graphs=True, grad_accum=4, optimizer="adamw8bit",
                    lora_dropout=0.1, dtype="float16")
    text = str(err.value)
    for fix in ("lora_dropout=0", "dtype bfloat16"):
        assert fix in text
    assert "optimizer" not in text  # 8-bit AdamW steps eagerly after the replayed forward and backward


def test_mostly_padded_graph_batches_get_a_hint(tiny_dir, tmp_path, one_thread):
    from pathlib import Path

    from slimtune.train.config import TrainConfig
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    lines = []
    train(TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(data), output=str(tmp_path / "r"),
                      max_steps=20, batch_size=1, max_seq_length=512, lora_r=4, device="cpu", cuda_graphs=True),
          log=lines.append)
    out = "\n".join(map(str, lines))  # the loop's lines reach train()'s log
    assert "% of each padded batch is padding" in out and "--packing" in out, out[-2000:]


def test_cuda_graph_run_resumes_exactly(tiny_dir, tmp_path, one_thread):
    """A cuda_graphs run checkpointed at step 2 and resumed gives the uninterrupted run's losses."""
    import shutil
    from pathlib import Path

    from slimtune.train.config import TrainConfig
    from slimtune.train.run import train

    data = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
    base = dict(model=str(tiny_dir("e2b", text_only=True)), data=str(data), max_steps=4, save_steps=2, lr=1e-3,
                batch_size=2, grad_accum=2, max_seq_length=96, lora_r=4, device="cpu", seed=0, cuda_graphs=True,
                packing=True)
    full = train(TrainConfig(output=str(tmp_path / "full"), **base), log=lambda *_: None)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    resumed = train(TrainConfig(output=str(tmp_path / "resumed"), resume=True, **base), log=lambda *_: None)
    assert [r["step"] for r in resumed.history] == [3, 4]
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history[2:]], rel=1e-6)
    # the same checkpoint resumed eagerly (cuda_graphs may differ on resume: same math; "auto" may decide
    # otherwise on another card)
    (tmp_path / "eager").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "eager" / "checkpoints")
    eager = train(TrainConfig(output=str(tmp_path / "eager"), resume=True, **{**base, "cuda_graphs": False}),
                  log=lambda *_: None)
    assert [r["loss"] for r in eager.history] == pytest.approx([r["loss"] for r in full.history[2:]], rel=1e-5)


def test_capture_failures_say_what_to_do(monkeypatch):
    """Out of memory at capture stays an out-of-memory error (the trainer turns it into its memory advice); any
    other capture failure names --no-cuda-graphs. Capture itself is faked: only the error handling is under test."""
    import contextlib
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: SimpleNamespace(replay=lambda: None))
    modes = []
    monkeypatch.setattr(torch.cuda, "graph", lambda *_a, **k: modes.append(k["capture_error_mode"])
                        or contextlib.nullcontext())
    step = GraphedTrainStep.__new__(GraphedTrainStep)
    step.graphs, step.graph_outputs, step.kept, step.pool, step.optimizer = {}, {}, {}, None, object()
    step.rank_sum = None

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    with pytest.raises(torch.OutOfMemoryError, match="while capturing the training step as a CUDA graph: CUDA out"):
        step._run("step", oom, eager=False)

    def unsupported():
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match="--no-cuda-graphs") as err:
        step._run("step", unsupported, eager=False)
    assert not isinstance(err.value, torch.OutOfMemoryError)
    assert step._run("step", lambda: 7, eager=False) == 7 and "step" in step.graphs
    # under data parallelism NCCL's watchdog thread queries events during the capture: only this thread is checked
    step.rank_sum = object()
    assert step._run("update", lambda: 8, eager=False) == 8
    assert modes == ["global"] * 3 + ["thread_local"]
