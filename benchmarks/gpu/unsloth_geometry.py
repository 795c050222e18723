"""The Unsloth anchor probe's own measurement on another geometry (issue 9: 31B / 26B-A4B beside Unsloth).

The anchor script (../shared/bench/anchors/probe_unsloth.py, copied into the git-ignored .anchors/ as the brief
asks) builds and measures E2B only. This runs its `run()` unchanged (same LoRA settings, steps and memory method)
on a pre-quantized checkpoint written by prequantized_checkpoint.py, so the only difference is the geometry.
Its records go to $ANCHOR_OUT/unsloth.jsonl after a note naming the checkpoint.

Usage (GPU box, repository root):
    python benchmarks/gpu/prequantized_checkpoint.py --geometry 31b --out /tmp/g31b --no-tokenizer
    ANCHOR_OUT=$OUT python benchmarks/gpu/unsloth_geometry.py --checkpoint /tmp/g31b --seq 2048
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="folder from prequantized_checkpoint.py")
    ap.add_argument("--seq", default="2048", help="comma-separated sequence lengths")
    ap.add_argument("--anchors", default=str(ROOT / ".anchors"), help="folder holding probe_unsloth.py")
    a = ap.parse_args()
    if not (Path(a.anchors) / "probe_unsloth.py").is_file():
        sys.exit(f"{a.anchors}/probe_unsloth.py not found: copy ../shared/bench/anchors/*.py there first")
    sys.path.insert(0, a.anchors)
    import probe_unsloth as probe  # noqa: PLC0415 - the anchor's module, unmodified

    import unsloth  # noqa: F401,PLC0415 - imported before transformers, as the probe does

    probe.SAVE = str(Path(a.checkpoint).resolve())
    if not (Path(probe.SAVE) / "tokenizer.json").is_file():
        probe.make_tokenizer()  # the anchor's own word-level tokenizer, written into the checkpoint folder
    probe.emit(probe="note", checkpoint=probe.SAVE, text="unsloth_geometry.py: the anchor's run() on this checkpoint",
               anchor_out=os.environ.get("ANCHOR_OUT", "."))
    for seq in (int(s) for s in a.seq.split(",")):
        try:
            probe.run(True, seq)
        except Exception as exc:  # recorded like the probe's own failures, then the next length
            probe.emit(probe="unsloth", load_in_4bit=True, seq=seq, error=repr(exc)[:800])


if __name__ == "__main__":
    main()
