"""A captured run's host works one step ahead: step N's numbers are read after step N+1 is launched, except where
the step's weights are needed as they are (evaluation, a checkpoint, the last step). Records stay complete and in
order. (On CUDA the read is a copy queued behind the step; the GPU tests of the graphed runs compare those numbers
with eager runs step by step.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.train import loop
from slimtune.train.config import TrainConfig
from slimtune.train.schedule import host_lr, make_scheduler
from slimtune.train.step_readback import read_back

DATA = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


def test_the_host_reads_each_step_after_launching_the_next(tiny_dir, tmp_path, monkeypatch, one_thread):
    events: list[str] = []

    class Launches(loop.GraphSteps):
        def __call__(self, batches):
            events.append(f"L{len([e for e in events if e[0] == 'L']) + 1}")
            return super().__call__(batches)

    monkeypatch.setattr(loop, "GraphSteps", Launches)
    from slimtune.train.run import train

    out = tmp_path / "r"

    def log(message, *_):  # "step     3/7  loss …": one line per record (log_every 1)
        if str(message).startswith("step "):
            events.append(f"R{int(str(message).split('/')[0].split()[1])}")

    train(TrainConfig(model=str(tiny_dir("e2b", text_only=True)), data=str(DATA), output=str(out), max_steps=7,
                      batch_size=2, max_seq_length=96, lora_r=4, device="cpu", packing=True, cuda_graphs=True,
                      eval_fraction=0.2, eval_steps=3, save_steps=4, log_every=1), log=log)
    # steps 3 and 6 evaluate, 4 saves a checkpoint, 7 is the last: each is read before anything runs after it
    assert events == ["L1", "L2", "R1", "L3", "R2", "R3", "L4", "R4", "L5", "L6", "R5", "R6", "L7", "R7"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 8))
    assert [r["step"] for r in train_records if "eval_loss" in r] == [3, 6, 7]
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in train_records)
    assert (out / "checkpoints").is_dir()


def test_host_lr_is_the_schedulers_lr_without_reading_the_device():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=torch.tensor(3e-4))  # a tensor lr, as the captured step's optimizer has
    sched = make_scheduler(opt, warmup=3, total=10, kind="cosine")
    base = float(sched.base_lrs[0])
    seen = []
    for _ in range(10):
        seen.append(host_lr(sched, base))
        torch.testing.assert_close(seen[-1], float(sched.get_last_lr()[0]), rtol=1e-6, atol=0)
        opt.step()
        sched.step()
    assert len(set(seen)) > 5  # warm-up and decay: the comparison covered a moving lr


def test_off_cuda_the_numbers_are_read_at_once():
    values = read_back(torch.tensor(2.5), torch.tensor(0.75), torch.device("cpu"))
    assert values.ready is None and values.wait() == (2.5, 0.75)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])  # one graph; micro-batch graph + eager update
def test_a_captured_steps_numbers_survive_the_next_replay_on_gpu(tiny_dir, optimizer):
    """The graph's loss and norm tensors are overwritten by the next replay: what read_back returns for a step, read
    only after later steps ran, must be that step's (as a copy taken right after the step says)."""
    from slimtune.adapt.attention import enable_slimtune_attention
    from slimtune.adapt.inject import trainable_parameters
    from slimtune.train.cuda_graph import GraphedTrainStep
    from slimtune.train.optimizer import make_optimizer

    from graph_models import tiny_lora_model
    from test_cuda_graph import _batches

    dev, dtype = torch.device("cuda"), torch.bfloat16
    batches = _batches(tiny_lora_model(tiny_dir, "cpu", torch.float32), 6)
    model = tiny_lora_model(tiny_dir, dev, dtype)
    enable_slimtune_attention(model)
    params = trainable_parameters(model)
    opt = make_optimizer(params, name=optimizer, lr=1e-2, fused=True, capturable=True)
    step = GraphedTrainStep(model, params, opt, batches[0], device=dev, dtype=dtype, max_grad_norm=1.0, warmup=2)
    late, now = [], []
    for b in batches:
        loss, norm, _ = step(b)
        late.append(read_back(loss, norm, dev))
        now.append((loss.detach().float().clone(), norm.detach().float().clone()))  # queued right behind the step
    assert step.graphs  # the last steps were replays
    got = [v.wait() for v in late]
    want = [(float(a), float(b)) for a, b in now]
    step.close()
    assert got == want
    assert len({loss for loss, _ in got}) == len(got)  # the steps' numbers differ, so a mix-up would show
