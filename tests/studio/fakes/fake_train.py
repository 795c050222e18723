"""Stand-in for ``python -m slimtune train`` in Studio tests: writes metrics lines fast, then an adapter.

Behaviour is chosen by environment variables (the Studio passes its environment to workers):
FAKE_TRAIN_MODE = ok (default) | fail | hang | oom;  FAKE_TRAIN_STEP_S = seconds per step (default 0.01).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--data", required=True)
p.add_argument("--output", required=True)
p.add_argument("--max-steps", type=int, default=20)
p.add_argument("--epochs", type=float)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--lora-r", type=int)
p.add_argument("--lora-alpha", type=int)
p.add_argument("--batch-size", type=int)
p.add_argument("--grad-accum", type=int)
p.add_argument("--max-seq-length", type=int)
p.add_argument("--seed", type=int)
p.add_argument("--save-steps", type=int)
p.add_argument("--load-in-4bit", action="store_true")
p.add_argument("--max-memory")
p.add_argument("--mlp-chunk-size", type=int)
p.add_argument("--loss-chunk-size", type=int)
p.add_argument("--optimizer", choices=["adamw", "adamw8bit"])
p.add_argument("--activation-offload", action="store_true")
p.add_argument("--cuda-graphs", action="store_true")
p.add_argument("--no-cuda-graphs", action="store_true")
p.add_argument("--packing", action="store_true")
p.add_argument("--text-only", action="store_true")
p.add_argument("--finetune-multimodal-embedders", action="store_true")
p.add_argument("--resume", action="store_true")
args = p.parse_args()

mode = os.environ.get("FAKE_TRAIN_MODE", "ok")
step_s = float(os.environ.get("FAKE_TRAIN_STEP_S", "0.01"))
out = Path(args.output)
out.mkdir(parents=True, exist_ok=True)
(out / "config.yaml").write_text(f"model: {args.model}\ndata: {args.data}\nlr: {args.lr}\n")
print(f"fake trainer: model={args.model} data={args.data} steps={args.max_steps} resume={args.resume}", flush=True)
if not Path(args.data).is_file():
    print(f"DataError: {args.data} does not exist", file=sys.stderr)
    sys.exit(2)

start = 1
metrics = out / "metrics.jsonl"
if args.resume and metrics.exists():
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    steps = [x["step"] for x in lines if "event" not in x]
    start = (max(steps) + 1) if steps else 1
with open(metrics, "a") as f:
    f.write(json.dumps({"event": "resumed" if args.resume else "started", "step": None}) + "\n")
    f.flush()
    step = start
    while step <= args.max_steps or mode == "hang":
        rec = {"step": step, "loss": round(2.5 * math.exp(-step / 8) + 0.3, 4), "lr": args.lr,
               "grad_norm": round(1.0 / math.sqrt(step), 4), "tokens_per_s": 1000 + step, "mem_gib": 0.5,
               "epoch": step / 100, "extra_unknown_key": True}
        if step % 5 == 0:
            rec["eval_loss"] = rec["loss"] + 0.1
        f.write(json.dumps(rec) + "\n")
        f.flush()
        print(f"step {step} loss {rec['loss']}", flush=True)
        if mode == "fail" and step == 2:
            print("Traceback (most recent call last):\n  File 'train.py'\nRuntimeError: fake failure at step 2",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        if mode == "oom" and step == 2:
            os.kill(os.getpid(), 9)
        time.sleep(step_s)
        step += 1

adapter = out / "adapter"
adapter.mkdir(exist_ok=True)
(adapter / "adapter_config.json").write_text(json.dumps({"r": args.lora_r, "lora_alpha": args.lora_alpha}))
(adapter / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
print("training done", flush=True)
print("some warning on stderr", file=sys.stderr, flush=True)
