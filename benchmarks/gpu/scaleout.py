"""Scale-out measurement (issue 9): the same QLoRA training run on 1 and on N GPUs, tokens/s and peak memory per GPU.

Each record also carries the memory planner's per-GPU prediction as the trainer printed it (`predicted_gib`, from
its "memory: predicted peak per GPU (FSDP2, 2 GPUs): … GiB" line) next to rank 0's measured peak
(`mem_gib_rank0`, torch.cuda.max_memory_allocated), and their ratio: the check of
slimtune.memory.distributed_plan on real GPUs (single-GPU predictions are within ~1.5% on the H200).

`slimtune bench` measures one process; multi-GPU runs go through the real trainer (`slimtune train --nproc N`,
torchrun underneath), so this script first writes a checkpoint of a real geometry with random weights, a tokenizer
and a dataset of long plain-text rows, then trains on it with 1 and N processes and reads metrics.jsonl.

Usage (GPU box, repository root; E4B's 16-bit checkpoint takes ~16 GB of disk):
    python benchmarks/gpu/scaleout.py --geometry e4b --work /tmp/scaleout --nproc 1,2 --seq 8192 --json out.jsonl
    python benchmarks/gpu/scaleout.py --geometry 31b --work /tmp/scaleout --nproc 1,2 --seq 8192 --distributed fsdp
CPU smoke run (what tests/bench/test_scaleout_script.py does): --tiny --device cpu --nproc 1 --seq 64 --steps 2
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def prepare(geometry: str, folder: Path, *, tiny: bool, device: str, rows: int, words_per_row: int,
            checkpoint: bool = True) -> Path:
    """Random-weight checkpoint (unless `checkpoint` is False) + tokenizer + data.jsonl in `folder` (reused)."""
    from slimtune.bench.random_model import build_random_model
    from slimtune.models.tokenizer_build import build_tokenizer
    from slimtune.utils.atomic import atomic_dir, atomic_write_text

    ckpt = folder / f"{geometry}{'-tiny' if tiny else ''}"
    if checkpoint and not (ckpt / "config.json").is_file():
        model = build_random_model(geometry, mode="lora16", device=device, offload_ple=False, tiny=tiny)
        with atomic_dir(ckpt, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            build_tokenizer().save_pretrained(tmp)
        del model
    data = folder / f"data-{rows}x{words_per_row}.jsonl"
    if not data.is_file():
        rng = random.Random(0)
        words = ("alpha beta gamma delta river mountain city light paper stone music garden window winter "
                 "signal number market bridge forest engine").split()
        atomic_write_text(data, "".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(words_per_row))})
                                        + "\n" for _ in range(rows)))
    return ckpt


# "memory: predicted peak GPU memory 7.71 GiB (…" or "memory: predicted peak per GPU (FSDP2, 2 GPUs): 7.28 GiB (…"
_PREDICTED = re.compile(r"^memory: predicted peak (?:GPU memory|per GPU \(([^)]*)\):) ([\d.]+) GiB", re.MULTILINE)


def printed_prediction(stdout: str) -> dict:
    """The planner's prediction the trainer printed (rank 0): GiB per GPU and for which layout, or {}."""
    match = _PREDICTED.search(stdout)
    if not match:
        return {}
    return {"predicted_gib": float(match.group(2)), "predicted_for": match.group(1) or "1 GPU"}


def train(ckpt: Path | str, data: Path, out: Path, *, nproc: int, seq: int, steps: int, device: str,
          mode: str = "qlora", distributed: str = "auto", extra: tuple[str, ...] = ()) -> dict:
    """One `slimtune train` run; returns the median tokens/s (after 2 warm-up steps), rank 0's peak memory and the
    planner's per-GPU prediction beside it."""
    cmd = [sys.executable, "-m", "slimtune", "train", "--model", str(ckpt), "--data", str(data), "--output", str(out),
           "--packing", "--max-seq-length", str(seq), "--max-steps", str(steps),
           "--batch-size", "1", "--grad-accum", "1", "--device", device, "--distributed", distributed, *extra]
    if mode == "qlora":
        cmd.append("--load-in-4bit")
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"nproc": nproc, "seq": seq, "error": proc.stderr[-1500:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = rows[2:] or rows
    measured = round(max(r.get("mem_gib", 0.0) for r in rows), 3)
    predicted = printed_prediction(proc.stdout)
    if predicted and measured:  # > 1: the planner over-predicts (safe side); < 1: a run could go out of memory
        predicted["predicted_over_measured"] = round(predicted["predicted_gib"] / measured, 3)
    return {"nproc": nproc, "seq": seq, "distributed": distributed, "steps": len(rows),
            "tok_s": round(statistics.median(r["tokens_per_s"] for r in timed), 1),
            "mem_gib_rank0": measured, **predicted,
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def main() -> None:
    from slimtune.bench.run import emit_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="e4b")
    ap.add_argument("--work", default="/tmp/scaleout")
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--distributed", default="auto", choices=("auto", "ddp", "fsdp"),
                    help="how the N processes share the model (the planner predicts per GPU for this layout)")
    ap.add_argument("--tiny", action="store_true", help="the geometry's tiny look-alike (CPU smoke runs)")
    ap.add_argument("--mode", choices=("qlora", "lora16"), default="qlora")
    ap.add_argument("--random-weights", action="store_true",
                    help="every process builds the geometry's random weights on its GPU (model random:<geometry>) "
                         "instead of writing and streaming a checkpoint: minutes saved for 26B/31B")
    ap.add_argument("--extra", default="", help="more `slimtune train` flags, space-separated")
    ap.add_argument("--json", help="append one JSON line per run")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in a.nproc.split(",")]
    # every process gets `steps` packed sequences of `seq` tokens: enough rows for the largest run
    rows, words = max(counts) * a.steps * 2, max(16, a.seq // 2)
    if a.random_weights and a.tiny:
        ap.error("--random-weights builds the real geometry; leave out --tiny")
    ckpt = prepare(a.geometry, work, tiny=a.tiny, device=a.device, rows=rows, words_per_row=words,
                   checkpoint=not a.random_weights)
    model = f"random:{a.geometry}" if a.random_weights else ckpt
    data = work / f"data-{rows}x{words}.jsonl"
    base = None
    for n in counts:
        flags = "".join(f"-{f.lstrip('-')}" for f in a.extra.split())  # e.g. an eager A/B gets its own folder
        out = work / f"run-{a.geometry}-{a.mode}-{n}-{a.distributed}{flags}"
        result = {"probe": "scaleout", "geometry": a.geometry, "tiny": a.tiny, "mode": a.mode, "extra": a.extra,
                  **train(model, data, out, nproc=n, seq=a.seq, steps=a.steps, device=a.device, mode=a.mode,
                          distributed=a.distributed, extra=tuple(a.extra.split()))}
        if "tok_s" in result:  # only against a measured one-process run (session 12 printed 2.0 without one)
            base = result["tok_s"] if n == 1 else base
            result["speedup_vs_1"] = round(result["tok_s"] / base, 2) if base else None
        result["torch"] = torch.__version__
        emit_record(result, a.json)


if __name__ == "__main__":
    main()
