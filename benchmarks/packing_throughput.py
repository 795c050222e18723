"""Training throughput with and without packing (real, non-pad tokens per second).

Trains the tiny demo-size Gemma 4 E2B text model with LoRA on slimtune's bundled chat data, once with padded
batches (batch 8, right padding to the longest row) and once with packed sequences (pack_examples, batch 1 or 2),
through the same step functions the training loop uses (accumulate_gradients / clip_and_step). Short chat rows
are where padding wastes most, so this is the case packing is for.

    PYTHONPATH=. python benchmarks/packing_throughput.py [--steps 20] [--max-seq-length 256] [--packed-batch 1]

CPU numbers are noisy on a loaded machine: run it more than once.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

import slimtune
from slimtune.data.collate import collate, count_real_tokens, count_targets
from slimtune.data.packing import pack_examples, packing_stats
from slimtune.data.readers import load_records
from slimtune.data.tokenize import text_tokenizer, tokenize_rows
from slimtune.models.tiny import write_tiny_model
from slimtune.train.step import accumulate_gradients, clip_and_step

DATA = Path(slimtune.__file__).parent / "data" / "default_data.jsonl"


def batches_of(examples, batch_size: int, seed: int):
    """Endless shuffled batches (epochs re-shuffle), like the training loop's stream."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i: i + batch_size]]


def train(model_dir: Path, examples, batch_size: int, steps: int, warmup: int, pad_id: int) -> dict:
    """Fresh model + LoRA, `steps` timed optimizer steps after `warmup` untimed ones."""
    model, _ = slimtune.load_model(model_dir, dtype="float32", device="cpu")
    slimtune.add_lora(model, r=16, alpha=16, seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    device = torch.device("cpu")
    stream = batches_of(examples, batch_size, seed=0)
    tokens = targets = slots = 0
    seconds = 0.0
    for step in range(warmup + steps):
        batch = collate(next(stream), pad_id)
        t0 = time.perf_counter()
        accumulate_gradients(model, [batch], device=device, dtype=torch.float32)
        clip_and_step(params, opt, sched, max_grad_norm=1.0)
        dt = time.perf_counter() - t0
        if step >= warmup:  # the first steps pay one-off allocation and dispatch costs
            seconds += dt
            tokens += count_real_tokens(batch)
            targets += count_targets(batch)
            slots += batch["input_ids"].numel()
    return {"tokens_per_s": tokens / seconds, "targets_per_s": targets / seconds, "seconds": seconds,
            "tokens": tokens, "fill": tokens / slots}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="unpacked batch size")
    ap.add_argument("--packed-batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(Path(tmp) / "model", variant="e2b", text_only=True, size="demo")
        _, tok = slimtune.load_model(model_dir, dtype="float32", device="cpu")
        pad_id = text_tokenizer(tok).pad_token_id or 0
        examples, tstats = tokenize_rows(load_records(DATA).rows, tok, max_seq_length=args.max_seq_length)
        packed = pack_examples(examples, args.max_seq_length, seed=0)
        pstats = packing_stats(packed, args.max_seq_length)
        lengths = sorted(len(e.input_ids) for e in examples)
        print(f"data: {len(examples)} samples, {tstats.n_tokens} tokens (length min {lengths[0]}, median "
              f"{lengths[len(lengths) // 2]}, max {lengths[-1]}); {pstats.summary()}")
        print(f"torch threads: {torch.get_num_threads()}")

        unpacked = train(model_dir, examples, args.batch, args.steps, args.warmup, pad_id)
        print(f"unpacked  batch {args.batch}: {unpacked['tokens_per_s']:8.0f} real tok/s  "
              f"{unpacked['targets_per_s']:7.0f} target tok/s  fill {unpacked['fill']:.1%}  "
              f"({unpacked['tokens']} tokens in {unpacked['seconds']:.1f} s)")
        pk = train(model_dir, packed, args.packed_batch, args.steps, args.warmup, pad_id)
        print(f"packed    batch {args.packed_batch} × {args.max_seq_length}: {pk['tokens_per_s']:8.0f} real tok/s  "
              f"{pk['targets_per_s']:7.0f} target tok/s  fill {pk['fill']:.1%}  "
              f"({pk['tokens']} tokens in {pk['seconds']:.1f} s)")
        print(f"gain: {pk['tokens_per_s'] / unpacked['tokens_per_s']:.2f}× real tokens/s")


if __name__ == "__main__":
    main()
