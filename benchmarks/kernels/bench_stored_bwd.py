"""The stored backward (``flash_attention_stored_bwd``) against the fused kernels: head_dim 512, E2B full layer.

One JSON line per measurement: fwd+bwd eager and graphed ms, peak memory, at 2K/8K/32K with the default backward
and with the stored one at each chunk size asked for; optionally, at 8K, other product tiles and a kernel profile of
one stored step. CUDA only.

Usage::

    python benchmarks/kernels/bench_stored_bwd.py [--seqs 2048,8192,32768] [--waves 1,2,4] [--profile-waves 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flash_attention as bfa  # noqa: E402

from slimtune.kernels import flash_attention_stored_bwd as stored  # noqa: E402
from slimtune.kernels.flash_attention import KernelConfig as C  # noqa: E402

STORED = {"dq": C(64, 32, 8, 1, False, 2, 5)}  # the default since session 13
FUSED = {"dq": C(64, 32, 8, 1, False, 2, 1)}  # δ in the dQ kernel, then the fused dK/dV kernel (the old backward)
GEMMS = [stored.ProductTile(256, 64, 8, 3), stored.ProductTile(128, 64, 4, 4)]  # besides the default (128, 64, 8, 3)


def row(label, t, configs, **extra):
    try:
        r = bfa.bench_row("slimtune", "full_hd512", 512, None, t, configs)
        out = {"which": label, "status": "ok", **r, **extra}
    except Exception as e:  # noqa: BLE001 - report and go on
        out = {"which": label, "seq": t, "status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}", **extra}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", default="2048,8192,32768")
    ap.add_argument("--waves", default="1", help="chunk sizes to time, in waves of dQ programs (module WAVES)")
    ap.add_argument("--gemms", action="store_true", help="also the other product tiles at 8K")
    ap.add_argument("--profile-waves", type=int, default=0, help="profile one 8K step with this many waves")
    ap.add_argument("--budget-gib", type=float, default=64.0,
                    help="buffer budget of the --waves rows (the default row keeps the module default)")
    args = ap.parse_args()
    sms = bfa.torch.cuda.get_device_properties(0).multi_processor_count
    stored.BUFFER_BUDGET_BYTES = int(args.budget_gib * 2**30)
    for t in (int(x) for x in args.seqs.split(",")):
        row("fused", t, FUSED)
        budget = stored.BUFFER_BUDGET_BYTES
        stored.BUFFER_BUDGET_BYTES = None  # the default budget
        row("default", t, None, rows=stored.chunk_rows(1, 8, t, 64, sms))
        stored.BUFFER_BUDGET_BYTES = budget
        for waves in (int(w) for w in args.waves.split(",") if w):
            stored.WAVES = waves
            row("stored", t, STORED, waves=waves, rows=stored.chunk_rows(1, 8, t, 64, sms))
    stored.WAVES = 1
    if args.gemms:
        base = stored.PRODUCT_TILE
        for tile in GEMMS:
            stored.PRODUCT_TILE = tile
            row("stored_gemm", 8192, STORED, gemm=tile._asdict())
        stored.PRODUCT_TILE = base
    if args.profile_waves:
        stored.WAVES = args.profile_waves
        bfa.profile_step(f"full_hd512 stored waves={args.profile_waves}", 512, None, 8192, STORED)


if __name__ == "__main__":
    main()
