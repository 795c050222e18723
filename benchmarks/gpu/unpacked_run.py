"""Issue 6's default path end to end: `slimtune train` on samples of varied length, eager vs CUDA graphs.

`slimtune bench` times one fixed-shape batch; a user's run without `--packing` feeds batches of every width. This
script writes a dataset of plain-text samples whose lengths spread over the whole context, trains on it through
the real CLI with
  eager      `--no-cuda-graphs` (each batch padded to its longest sample),
  buckets    `--cuda-graphs` without packing (one captured step per length bucket, slimtune.train.graph_buckets),
  auto       no flag: the default a user gets (`cuda_graphs: auto` decides, and the log says why),
  packed     `--packing` with the default `cuda_graphs: auto`,
and reads metrics.jsonl: real (non-pad) tokens per second over the second half of the run (after every bucket
has captured), the median step, and the peak memory. One JSON line per variant.

Usage (GPU box, repository root):
    python benchmarks/gpu/unpacked_run.py --model random:e2b --seq 2048 --steps 80 --json out.jsonl
CPU smoke run (tests/bench/test_unpacked_run_script.py): --model <tiny checkpoint> --device cpu --steps 3
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

VARIANTS = {"eager": ("--no-cuda-graphs",), "buckets": ("--cuda-graphs",), "auto": (), "packed": ("--packing",)}
WORDS = ("alpha beta gamma delta river mountain city light paper stone music garden window winter signal number "
         "market bridge forest engine").split()


def write_data(path: Path, *, rows: int, max_words: int, seed: int = 0) -> Path:
    """`rows` samples of 8..max_words random words (uniform), written atomically."""
    from slimtune.utils.atomic import atomic_write_text

    rng = random.Random(seed)
    lines = (json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, max_words)))}) + "\n"
             for _ in range(rows))
    atomic_write_text(path, "".join(lines))
    return path


def summarize(rows: list[dict]) -> dict:
    """Throughput of the second half of the run (real tokens / wall time), median step, peak memory."""
    late = rows[len(rows) // 2:] or rows
    return {"steps": len(rows), "tok_s": round(sum(r["tokens"] for r in late) / sum(r["step_s"] for r in late), 1),
            "median_step_s": round(statistics.median(r["step_s"] for r in late), 4),
            "tokens_per_step": round(statistics.mean(r["tokens"] for r in late), 1),
            "peak_gib": round(max(r.get("mem_gib", 0.0) for r in rows), 3),
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"]}


def run(variant: str, *, model: str, data: Path, out: Path, seq: int, steps: int, batch_size: int, device: str,
        qlora: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume of an earlier one
    cmd = [sys.executable, "-m", "slimtune", "train", "--model", model, "--data", str(data), "--output", str(out),
           "--max-seq-length", str(seq), "--max-steps", str(steps), "--batch-size", str(batch_size),
           "--device", device, *VARIANTS[variant], *(("--load-in-4bit",) if qlora else ())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    record = {"probe": "unpacked_run", "variant": variant, "model": model, "seq": seq, "batch_size": batch_size,
              "qlora": qlora}
    if proc.returncode != 0:
        return {**record, "error": proc.stderr[-1500:]}
    graphs = [line for line in proc.stdout.splitlines() if line.startswith("cuda_graphs")]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {**record, **summarize(rows), "graphs_log": graphs[:2]}


def main() -> None:
    from slimtune.bench.run import emit_record

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:e2b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--lora16", action="store_true", help="16-bit base instead of QLoRA")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", default="/tmp/unpacked_run")
    ap.add_argument("--json", help="append one JSON line per variant")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    # lengths spread up to ~the context: the built-in tokenizer gives a bit over one token per word
    data = write_data(work / f"data-{a.seq}.jsonl", rows=max(64, 4 * a.steps * a.batch_size), max_words=a.seq // 2)
    for variant in a.variants.split(","):
        result = run(variant, model=a.model, data=data, out=work / f"run-{variant}", seq=a.seq, steps=a.steps,
                     batch_size=a.batch_size, device=a.device, qlora=not a.lora16)
        emit_record(result, a.json)


if __name__ == "__main__":
    main()
