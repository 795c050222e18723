"""Code run inside each spawned rank of tests/train/test_distributed.py (gloo, CPU, 2 processes).

Kept out of the test module so torch.multiprocessing's spawn children import only this (not pytest's module).
"""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import slimtune
from slimtune.adapt.lora import lora_modules
from slimtune.data.tokenize import Example
from slimtune.train.data_stream import DataStream, collate_share
from slimtune.train.distributed import DistInfo, ParallelModel
from slimtune.train.step import accumulate_gradients

BATCH, ACCUM = 2, 2  # per rank; 5 samples over 2 ranks: the 2nd global micro-batch leaves rank 1 empty


def make_model(model_dir: str, dtype=torch.float64, load_in_4bit: bool = False, targets=None):
    """The tiny text model with LoRA whose B is non-zero, so every adapter gets a non-trivial gradient.

    load_in_4bit: QLoRA (NF4 base, bf16 compute); `dtype` then does not apply.
    """
    model, _ = slimtune.load_model(model_dir, dtype="bfloat16" if load_in_4bit else "float32",
                                   load_in_4bit=load_in_4bit, device="cpu")
    slimtune.add_lora(model, r=4, alpha=8, seed=1, **({"target_modules": targets} if targets else {}))
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for layer in lora_modules(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)
    if not load_in_4bit:
        model.to(dtype)
    return model.train()


def make_examples(vocab: int) -> list[Example]:
    """Five samples with uneven lengths and uneven target counts."""
    g = torch.Generator().manual_seed(3)
    out = []
    for n, n_masked in ((9, 2), (23, 10), (14, 0), (31, 25), (6, 1)):
        ids = torch.randint(5, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * n_masked + ids[n_masked:]))
    return out


def window(examples, rank: int, world: int, batch_size: int = BATCH) -> list[dict]:
    """The rank's micro-batches of the first optimizer window, as the training loop builds them."""
    stream = DataStream(examples, batch_size, seed=0, rank=rank, world_size=world)
    return [collate_share(stream.next()[1], pad_id=0)[0] for _ in range(ACCUM)]


def _grads(parallel: ParallelModel) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in parallel.model.named_parameters():
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().cpu()
    return out


def local_param_bytes(parallel: ParallelModel) -> dict:
    """This rank's share of what FSDP2 sharded (DTensor local shards): frozen bytes and LoRA values."""
    frozen = lora = 0
    for p in parallel.model.parameters():
        if hasattr(p, "device_mesh"):
            local = p.to_local()
            if p.requires_grad:
                lora += local.numel()
            else:
                frozen += local.numel() * local.element_size()
    return {"frozen_bytes": frozen, "lora_numel": lora}


PARTIAL_TARGETS = ["q_proj", "v_proj"]  # QLoRA with NF4 linears that have no adapter (kept whole under FSDP2)


def grads_worker(rank: int, world: int, model_dir: str, out_dir: str, kind: str, qlora: bool = False,
                 partial: bool = False) -> None:
    """Window loss and full LoRA gradients under `kind` (ddp | fsdp); rank 0 saves them to out_dir/<name>.pt."""
    info = DistInfo(rank=dist.get_rank(), world_size=world)
    model = make_model(model_dir, load_in_4bit=qlora, targets=PARTIAL_TARGETS if partial else None)
    parallel = ParallelModel(model, kind, info, torch.device("cpu"))
    local = local_param_bytes(parallel)
    batches = window(make_examples(model.config.get_text_config().vocab_size), rank, world)
    loss, n = accumulate_gradients(model, batches, device=torch.device("cpu"),
                                   dtype=torch.bfloat16 if qlora else torch.float64, parallel=parallel)
    grads = _grads(parallel)
    sharded = all(hasattr(p, "device_mesh") for p in parallel.parameters())
    # NF4 codes are uint8 parameters; sharded ones are DTensors (with a device mesh)
    behind_lora = [m.base_layer.weight for m in lora_modules(model).values()
                   if type(m.base_layer).__name__ == "Linear4bit"]
    others = [m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"
              and all(m.weight is not w for w in behind_lora)]
    if rank == 0:
        torch.save({"loss": loss, "n": n, "grads": grads, "sharded": sharded, "local": local,
                    "nf4_lora": [hasattr(w, "device_mesh") for w in behind_lora],
                    "nf4_other": [hasattr(w, "device_mesh") for w in others]},
                   Path(out_dir) / f"{kind}{'-qlora' if qlora else ''}{'-partial' if partial else ''}.pt")


def sync_worker(rank: int, world: int, model_dir: str, out_dir: str, kind: str, always_sync: bool) -> None:
    """Whether gradients were reduced over ranks BEFORE the window's last micro-batch (they must not be).

    DDP: a comm hook counts bucket all-reduces. FSDP2: a reduce-scatter leaves sharded .grad set, so every
    trainable parameter's .grad must still be None when the last micro-batch starts. always_sync=True is the
    negative control (a sync on every micro-batch), showing the probe sees the difference.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: PLC0415

    model = make_model(model_dir)
    parallel = ParallelModel(model, kind, DistInfo(rank=rank, world_size=world), torch.device("cpu"))
    calls: list[int] = []
    if kind == "ddp":
        parallel.wrapped.register_comm_hook(None, lambda state, bucket: (calls.append(1), allreduce_hook(None, bucket))[1])
    seen: dict = {}
    real_sync = parallel.sync

    def sync(last: bool):
        if last:  # the last micro-batch is about to run: what was reduced so far?
            seen["reduced_before_last"] = (len(calls) > 0 if kind == "ddp"
                                           else any(p.grad is not None for p in parallel.parameters()))
        return real_sync(True if always_sync else last)

    parallel.sync = sync
    batches = window(make_examples(model.config.get_text_config().vocab_size), rank, world)
    accumulate_gradients(model, batches, device=torch.device("cpu"), dtype=torch.float64, parallel=parallel)
    seen["reduced_at_end"] = len(calls) > 0 if kind == "ddp" else all(p.grad is not None for p in parallel.parameters())
    if rank == 0:
        (Path(out_dir) / f"sync-{kind}-{'always' if always_sync else 'window'}.json").write_text(json.dumps(seen))


def record_writes(run_dir: Path, log_path: Path) -> None:
    """Log every file this process opens for writing (or renames into place) under run_dir."""
    run_dir, real_open, real_replace, real_rename = str(run_dir), io.open, os.replace, os.rename
    seen: list[str] = []

    def note(path) -> None:
        if str(path).startswith(run_dir):
            seen.append(str(path))
            log_path.write_text(json.dumps(seen))

    def open_(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            note(file)
        return real_open(file, mode, *a, **k)

    def replace(src, dst, *a, **k):
        note(dst)
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        note(dst)
        return real_rename(src, dst, *a, **k)

    builtins.open = io.open = open_  # io.open: pathlib's write_text goes through it
    os.replace, os.rename = replace, rename
    log_path.write_text("[]")


def graph_run(train_kwargs: dict, out_dir: Path, world: int = 2) -> dict:
    """A short DDP run through the training loop with cuda_graphs (on CPU the fixed-shape step runs eagerly,
    with the same gradient sum over ranks as on GPUs): length buckets and gradient accumulation, bfloat16 as
    cuda_graphs requires. world=1: the one-process reference (batch_size × 2)."""
    return {**train_kwargs, "distributed": "ddp", "cuda_graphs": True, "max_steps": 2, "save_steps": 0,
            "eval_fraction": 0.0, "dtype": "bfloat16", "batch_size": train_kwargs["batch_size"] * (2 // world),
            "output": str(out_dir / f"graphs-world{world}")}


def graph_steps(model_dir: str, rank: int, world: int, *, packed: bool, rank_sum=None) -> dict:
    """Two captured-structure steps (GraphSteps, eager on CPU) of the fp64 model with SGD, on this rank's shares
    of the first global micro-batches; returns the reported loss/norm/targets per step and the final LoRA values.
    packed: one micro-batch per step padded to 64 (the single-graph step); else two micro-batches per step in
    length buckets (the window structure; every rank pads to the widest rank's bucket)."""
    from slimtune.train.graph_buckets import GraphSteps  # noqa: PLC0415

    model = make_model(model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    if rank_sum is not None:  # what ParallelModel(captured=True) does: start from rank 0's values
        rank_sum.broadcast_from_first([p.data for p in params])
    steps = GraphSteps(model, params, torch.optim.SGD(params, lr=0.5), device=torch.device("cpu"),
                       dtype=torch.float32, max_grad_norm=0.05, capture=False, max_seq_length=64, pad_id=0,
                       packed=packed, batch_size=BATCH * (2 // world), rank_sum=rank_sum)
    stream = DataStream(make_examples(model.config.get_text_config().vocab_size), BATCH * (2 // world), seed=0,
                        rank=rank, world_size=world)
    reported = []
    for _ in range(2):
        window = [collate_share(stream.next()[1], pad_id=0)[0] for _ in range(1 if packed else ACCUM)]
        loss, norm, n, _ = steps(window)
        reported.append((float(loss), float(norm), n))
    return {"reported": reported, "lora": [p.detach().clone() for p in params]}


def entry(rank: int, world: int, port: int, model_dir: str, out_dir: str, train_kwargs: dict) -> None:
    """torch.multiprocessing.spawn target: set torchrun's variables, then run every distributed scenario."""
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind in ("ddp", "fsdp"):
            grads_worker(rank, world, model_dir, out_dir, kind)
            for always in (False, True):
                sync_worker(rank, world, model_dir, out_dir, kind, always)
            grads_worker(rank, world, model_dir, out_dir, kind, qlora=True)
        grads_worker(rank, world, model_dir, out_dir, "fsdp", qlora=True, partial=True)
        from slimtune.train.distributed import on_every_rank  # noqa: PLC0415

        agreed = [on_every_rank(flags[rank], torch.device("cpu")) for flags in ((True, True), (True, False),
                                                                                (False, True), (False, False))]
        if rank == 0:
            (Path(out_dir) / "agreed.json").write_text(json.dumps(agreed))
        parallel = ParallelModel(make_model(model_dir), "ddp", DistInfo(rank=rank, world_size=world),
                                 torch.device("cpu"), captured=True)
        assert not hasattr(parallel.wrapped, "no_sync")  # no DDP wrapper: the captured step sums itself
        for packed in (True, False):
            got = graph_steps(model_dir, rank, world, packed=packed, rank_sum=parallel.rank_sum)
            torch.save(got, Path(out_dir) / f"graph-steps-{'packed' if packed else 'window'}-rank{rank}.pt")
        if train_kwargs:
            from slimtune.train.config import TrainConfig  # noqa: PLC0415
            from slimtune.train.run import train  # noqa: PLC0415

            record_writes(Path(train_kwargs["output"]), Path(out_dir) / f"writes-rank{rank}.json")
            printed: list[str] = []
            result = train(TrainConfig(**train_kwargs), log=printed.append)
            (Path(out_dir) / f"history-rank{rank}.json").write_text(json.dumps(result.history))
            (Path(out_dir) / f"printed-rank{rank}.json").write_text(json.dumps(printed))
            result = train(TrainConfig(**graph_run(train_kwargs, Path(out_dir))), log=lambda _line: None)
            (Path(out_dir) / f"graphs-history-rank{rank}.json").write_text(json.dumps(result.history))
    finally:
        dist.destroy_process_group()
