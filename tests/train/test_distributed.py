"""Data-parallel training on CPU with gloo and 2 processes: DDP and FSDP2 give the one-process gradients of the
same global batch, the data is split without duplicates, and only rank 0 writes.

One torch.multiprocessing.spawn (module fixture) runs every 2-rank scenario (tests/train/_dist_worker.py); the
tests below check what it left behind. The reference is always ONE process on the same global micro-batches.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import slimtune
from slimtune.train.checkpoint import find_resume_point
from slimtune.train.config import TrainConfig
from slimtune.train.data_stream import DataStream, epoch_order
from slimtune.train.step import accumulate_gradients

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as worker  # noqa: E402

BUNDLED = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_kwargs(model_dir: Path, run: Path) -> dict:
    # FSDP2 for the full run: it needs the most care (sharded optimizer state, gathered adapter, sharded
    # eval). grad_accum 2 and an eval split exercise no_sync and the dummy eval batches.
    return dict(model=str(model_dir), data=str(BUNDLED), output=str(run), max_steps=3, save_steps=2, lr=1e-3,
                lora_r=4, lora_alpha=8, batch_size=2, grad_accum=2, max_seq_length=64, seed=3, device="cpu",
                dtype="float32", eval_fraction=0.04, distributed="fsdp")  # 13 eval samples: 7 batches, a dummy


@pytest.fixture(scope="module")
def spawned(tiny_dir, tmp_path_factory):
    """Run the 2-process scenarios once; returns (output folder, model folder, training kwargs)."""
    model_dir = tiny_dir("e2b", text_only=True)
    out = tmp_path_factory.mktemp("dist")
    kwargs = _train_kwargs(model_dir, out / "run")
    mp.spawn(worker.entry, args=(WORLD, _free_port(), str(model_dir), str(out), kwargs), nprocs=WORLD)
    return out, model_dir, kwargs


def _reference(model_dir, batches_of, qlora: bool = False, targets=None):
    """(loss, tokens, grads) of one process: a fresh model, the given micro-batches, no torch.distributed."""
    model = worker.make_model(str(model_dir), load_in_4bit=qlora, targets=targets)
    ex = worker.make_examples(model.config.get_text_config().vocab_size)
    loss, n = accumulate_gradients(model, batches_of(ex), device=torch.device("cpu"),
                                   dtype=torch.bfloat16 if qlora else torch.float64)
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss, n, grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_give_the_one_process_gradients(spawned, kind):
    """Global micro-batches of 4 samples (2 per rank) × GA 2 over 5 uneven samples: the 2nd global micro-batch
    has one sample, so rank 1 runs the dummy batch. Loss and every LoRA gradient match one process running
    batch 4 × GA 2. (fp64 model, fp32 loss sum: agreement ~2e-7; see the negative control below.)"""
    out, model_dir, _ = spawned
    got = torch.load(out / f"{kind}.pt")
    assert got["sharded"] == (kind == "fsdp")  # FSDP2 really held DTensor shards, DDP whole tensors
    loss, n, ref = _reference(model_dir, lambda ex: worker.window(ex, 0, 1, batch_size=worker.BATCH * WORLD))
    assert got["n"] == n == sum(e.n_targets for e in worker.make_examples(100))  # all samples, all ranks
    # (make_examples(100): target counts depend on lengths and masks only, not on the token ids)
    assert abs(got["loss"] - loss) <= 1e-6 * abs(loss)
    assert set(got["grads"]) == set(ref)
    for name, g in ref.items():
        assert g.abs().sum() > 0, name  # every adapter (KV-sharing layers included) is really tested
        assert _rel(got["grads"][name], g) <= 1e-5, (name, _rel(got["grads"][name], g))


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_qlora_gives_the_one_process_gradients(spawned, kind):
    """QLoRA (NF4 base, bf16 compute) under DDP, and under FSDP2 with the NF4 weights sharded too. bf16
    rounding differs between batch-4 and batch-2 kernel shapes (measured ~2.4e-3 worst relative difference),
    so the bound is 2e-2; per-rank normalisation is off by ~0.6 (test below)."""
    out, model_dir, _ = spawned
    got = torch.load(out / f"{kind}-qlora.pt")
    if kind == "fsdp":  # the LoRA weights and the NF4 codes really were sharded
        assert got["sharded"] and got["nf4_lora"] and all(got["nf4_lora"])
        assert not any(got["nf4_other"])  # NF4 linears without an adapter (PLE projections) stay whole
    loss, n, ref = _reference(model_dir, lambda ex: worker.window(ex, 0, 1, batch_size=worker.BATCH * WORLD),
                              qlora=True)
    assert got["n"] == n and abs(got["loss"] - loss) <= 1e-2 * loss
    for name, g in ref.items():
        assert _rel(got["grads"][name], g) <= 2e-2, (name, _rel(got["grads"][name], g))


def test_fsdp_qlora_keeps_nf4_linears_without_lora_whole(spawned):
    """LoRA on q/v only: the other NF4 linears run bitsandbytes' own forward, which would re-wrap a gathered weight
    behind FSDP's back, so they stay whole on every rank; the adapted ones are sharded; gradients still match."""
    out, model_dir, _ = spawned
    got = torch.load(out / "fsdp-qlora-partial.pt")
    assert got["nf4_lora"] and all(got["nf4_lora"]) and got["nf4_other"] and not any(got["nf4_other"])
    loss, n, ref = _reference(model_dir, lambda ex: worker.window(ex, 0, 1, batch_size=worker.BATCH * WORLD),
                              qlora=True, targets=worker.PARTIAL_TARGETS)
    assert got["n"] == n and abs(got["loss"] - loss) <= 1e-2 * loss
    for name, g in ref.items():
        assert _rel(got["grads"][name], g) <= 2e-2, (name, _rel(got["grads"][name], g))


@pytest.mark.parametrize("qlora", [False, True])
def test_fsdp_shards_per_rank_what_the_memory_planner_counts(spawned, qlora):
    """The planner's per-GPU FSDP2 shard sizes (padded rows, NF4 codes behind LoRA only, the PLE table, which the
    CPU loader keeps on the device) are the bytes rank 0 really held after _fully_shard."""
    from slimtune.memory.distributed_plan import fsdp_bytes

    out, model_dir, _ = spawned
    got = torch.load(out / f"fsdp{'-qlora' if qlora else ''}.pt")["local"]
    # fp64 model (the 16-bit path with 8-byte weights), or QLoRA with bf16 weights; LoRA r=4; PLE on the device
    want = fsdp_bytes(str(model_dir), False, False, False, WORLD, qlora, False, 4, 2 if qlora else 8)
    assert got["frozen_bytes"] > 0 and got["frozen_bytes"] == want["weights_sharded"]
    assert got["lora_numel"] == want["lora_shard_numel"]


def test_the_two_process_run_prints_the_per_gpu_prediction_once(spawned):
    """train() under the real 2-rank group: rank 0 prints the FSDP2 per-GPU prediction (world size taken from the
    process group), rank 1 prints nothing."""
    from slimtune.memory.planner import predict

    out, model_dir, kwargs = spawned
    rank0, rank1 = (json.loads((out / f"printed-rank{r}.json").read_text()) for r in range(WORLD))
    want = predict(str(model_dir), kwargs["max_seq_length"], world_size=WORLD, distributed="fsdp", lora_r=4,
                   batch_size=kwargs["batch_size"], grad_accum=kwargs["grad_accum"], load_in_4bit=False,
                   attention="sdpa", activation_bytes=4)
    assert rank0[0].startswith(f"memory: predicted peak per GPU (FSDP2, 2 GPUs): {want.predicted_gib:.2f} GiB")
    assert rank1 == []


def test_per_rank_normalisation_would_differ(spawned):
    """Negative control: each rank dividing by its OWN target tokens (then averaging over ranks) gives
    gradients far from the global normalisation the 2-rank runs matched above (measured: worst relative difference 0.61, vs <= 1e-5 for the real runs)."""
    _, model_dir, _ = spawned
    _, _, ref = _reference(model_dir, lambda ex: worker.window(ex, 0, 1, batch_size=worker.BATCH * WORLD))
    per_rank = [_reference(model_dir, lambda ex, r=r: worker.window(ex, r, WORLD))[2] for r in range(WORLD)]
    worst = max(_rel(sum(g[name] for g in per_rank) / WORLD, ref[name]) for name in ref)
    print(f"per-rank normalisation: worst relative gradient difference {worst:.3g}")
    assert worst > 1e-2, worst


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_gradients_are_reduced_once_per_window(spawned, kind):
    """With grad_accum 2, nothing is all-reduced (DDP) / reduce-scattered (FSDP2) on the first micro-batch,
    only on the last. The control run that syncs every micro-batch is seen reducing early, so the probe works."""
    out, _, _ = spawned
    window = json.loads((out / f"sync-{kind}-window.json").read_text())
    control = json.loads((out / f"sync-{kind}-always.json").read_text())
    assert window == {"reduced_before_last": False, "reduced_at_end": True}
    assert control["reduced_before_last"] is True


@pytest.mark.parametrize("n,batch,world", [(11, 2, 2), (7, 3, 3), (5, 4, 2), (1, 1, 3)])
def test_ranks_share_an_epoch_without_duplicates(n, batch, world):
    """The union of every rank's samples over one epoch is each sample exactly once; ragged last batches
    leave some ranks empty, and every rank still takes the same number of micro-batches."""
    steps = -(-n // (batch * world))
    seen = []
    for rank in range(world):
        stream = DataStream(list(range(n)), batch, seed=7, rank=rank, world_size=world)
        shares = [stream.next() for _ in range(steps)]
        assert all(epoch == 0 for epoch, _ in shares)
        assert stream.epoch == 1 and stream.index == 0  # every rank reached the epoch's end together
        seen += [x for _, share in shares for x in share]
    assert sorted(seen) == list(range(n))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _order_targets(kwargs: dict, start: int, stop: int) -> int:
    """Target tokens of global samples [start, stop) of epoch 0, from the same data the run trained on."""
    from slimtune.train.run import prepare_data, prepare_eval_data  # noqa: PLC0415

    cfg = TrainConfig(**kwargs)
    _, tokenizer = slimtune.load_model(cfg.model, dtype="float32", device="cpu")
    examples, _ = prepare_eval_data(cfg, tokenizer, prepare_data(cfg, tokenizer, log=lambda m: None),
                                    log=lambda m: None)
    order = epoch_order(len(examples), cfg.seed, 0)
    return sum(examples[j].n_targets for j in order[start:stop])


def test_only_rank0_writes_and_the_step_counts_global_samples(spawned):
    out, _, kwargs = spawned
    run = Path(kwargs["output"])
    rank0, rank1 = (json.loads((out / f"writes-rank{r}.json").read_text()) for r in range(WORLD))
    assert rank1 == [], rank1
    assert any(p.endswith("metrics.jsonl") for p in rank0) and any("/adapter" in p for p in rank0)
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]  # each step once, not once per rank
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    # Global window = 2 ranks × 2 samples × GA 2 = samples [0, 8) of the shuffled order, each counted once.
    assert _metrics(run)[0]["target_tokens"] == _order_targets(kwargs, 0, 8)
    history1 = json.loads((out / "history-rank1.json").read_text())
    assert [r["loss"] for r in history1] == [r["loss"] for r in _metrics(run)]  # the loss is the global one


def test_sharded_eval_equals_one_process_eval(spawned):
    """The FSDP2 run's final eval (each rank every 2nd batch, rank 1 a dummy in the last round, sums
    all-reduced) equals one process evaluating the saved adapter on the same eval split."""
    from slimtune.train.checkpoint import restore_adapter  # noqa: PLC0415
    from slimtune.train.evaluate import evaluate  # noqa: PLC0415
    from slimtune.train.run import prepare_data, prepare_eval_data  # noqa: PLC0415

    _, _, kwargs = spawned
    run = Path(kwargs["output"])
    cfg = TrainConfig(**kwargs)
    model, tokenizer = slimtune.load_model(cfg.model, dtype="float32", device="cpu")
    slimtune.add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, seed=cfg.seed)
    restore_adapter(model, run / "adapter")
    _, held = prepare_eval_data(cfg, tokenizer, prepare_data(cfg, tokenizer, log=lambda m: None), log=lambda m: None)
    assert len(held) == 13
    loss, _ = evaluate(model, held, pad_id=0, device=torch.device("cpu"), dtype=torch.float32, batch_size=2)
    logged = _metrics(run)[-1]["eval_loss"]
    assert abs(logged - loss) <= 1e-5 * loss, (logged, loss)


def test_two_process_checkpoint_resumes_in_one_process(spawned, tmp_path):
    """The step-2 checkpoint of the 2-process FSDP2 run holds full tensors and a position in GLOBAL samples
    (16 = 2 steps × 8); one process resumes there: step 3 trains on samples [16, 20) (its window is 2 × 2)."""
    from slimtune.train.run import train  # noqa: PLC0415

    _, _, kwargs = spawned
    run = tmp_path / "run"  # a copy: the other tests keep reading the 2-process run's own files
    shutil.copytree(kwargs["output"], run)
    kwargs = {**kwargs, "output": str(run)}
    point = find_resume_point(run)
    assert point.step == 2 and point.state["data"]["index"] == 16 and point.state["data"]["epoch"] == 0
    assert len(point.state["rank_rng"]) == 2  # each rank's dropout stream, for a resume with 2 processes
    assert all(not hasattr(v, "device_mesh") for s in point.state["optimizer"]["state"].values() for v in s.values())
    result = train(TrainConfig(**{**kwargs, "resume": True, "distributed": "auto"}), log=lambda m: None)
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3]
    assert result.history[-1]["target_tokens"] == _order_targets(kwargs, 16, 20)


@pytest.mark.parametrize("packed", [True, False])
def test_captured_ddp_steps_equal_one_process(spawned, packed):
    """cuda_graphs under DDP (no DistributedDataParallel): each rank scales its loss by the GLOBAL target count and
    the step sums gradients and loss over ranks itself, before clipping. Two ranks (2 samples each) must take the
    steps of one process on the same global batches of 4: same loss, clipped norm and LoRA values after two SGD
    steps (the cross-entropy sums in fp32: ~1e-6). Without the sum each rank would step on its half of the
    gradient: loss, norm and weights differ (the three captured-DDP tests fail with the sum removed)."""
    out, model_dir, _ = spawned
    name = "packed" if packed else "window"
    ranks = [torch.load(out / f"graph-steps-{name}-rank{r}.pt") for r in range(WORLD)]
    one = worker.graph_steps(str(model_dir), 0, 1, packed=packed)
    assert ranks[0]["reported"] == ranks[1]["reported"]  # every rank reports the global numbers
    for (loss, norm, n), (loss1, norm1, n1) in zip(ranks[0]["reported"], one["reported"]):
        assert n == n1 and loss == pytest.approx(loss1, rel=1e-6) and norm == pytest.approx(norm1, rel=1e-5)
    for got, other, want in zip(ranks[0]["lora"], ranks[1]["lora"], one["lora"]):
        assert torch.equal(got, other)  # the ranks stay identical
        assert _rel(got, want) < 1e-5


def test_captured_ddp_training_loop_reports_global_numbers(spawned, tmp_path):
    """The training loop wires it up (captured=True, the host token sums, rank_sum into the graph steps): two
    ranks' bf16 run reports what one process on the same global batches reports."""
    from slimtune.train.run import train  # noqa: PLC0415

    out, _, kwargs = spawned
    two = [json.loads((out / f"graphs-history-rank{r}.json").read_text()) for r in range(WORLD)]
    ref = train(TrainConfig(**worker.graph_run(kwargs, tmp_path, world=1)), log=lambda m: None).history
    assert len(two[0]) == len(two[1]) == len(ref) == 2
    for r0, r1, one in zip(two[0], two[1], ref):
        assert r0["loss"] == r1["loss"] and r0["grad_norm"] == r1["grad_norm"]
        assert (r0["tokens"], r0["target_tokens"]) == (one["tokens"], one["target_tokens"])
        assert r0["loss"] == pytest.approx(one["loss"], rel=1e-2)  # bf16 compute; a rank-local loss is ~2x off
        assert r0["grad_norm"] == pytest.approx(one["grad_norm"], rel=5e-2)


def test_cuda_graphs_auto_is_one_decision_for_all_ranks(spawned):
    """Each rank's auto decision reads its own GPU; DDP captures only if every rank would (rank 0's view, per
    (rank 0, rank 1) vote): a captured rank and an eager one would wait on different collectives."""
    out, _, _ = spawned
    assert json.loads((out / "agreed.json").read_text()) == [True, False, False, False]


def test_host_sums_fall_back_to_the_default_group_without_gloo(monkeypatch):
    """On an NCCL job whose host cannot form a gloo group (e.g. a container whose hostname does not resolve), the
    per-step sums go through the default group on the GPU instead of failing the run (one process, gloo standing
    in for NCCL; the device would be the rank's GPU)."""
    import torch.distributed as dist

    from slimtune.train.rank_sum import RankSum

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        monkeypatch.setattr(dist, "get_backend", lambda *_a: "nccl")
        monkeypatch.setattr(dist, "new_group", lambda **_k: (_ for _ in ()).throw(RuntimeError("no gloo here")))
        with pytest.warns(UserWarning, match=r"no gloo group for host-side sums \(no gloo here\)"):
            ranks = RankSum(torch.device("cpu"))
        assert ranks.host_group is None and ranks.host([3, 4.5]) == [3.0, 4.5] and ranks.host_max(7) == 7.0
    finally:
        dist.destroy_process_group()
