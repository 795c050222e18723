"""The anchor probes' own measurements on other Gemma 4 geometries (issue 6's E4B table, issue 9's 31B/26B).

The anchor scripts (../shared/bench/anchors/probe_{hf_baseline,unsloth}.py, copied into the git-ignored .anchors/
as the brief asks) build and measure E2B text only. This runs their functions unchanged (same LoRA settings,
steps, and memory method), so that the geometry is the only difference. There are two ways to pick it:
- `--geometry e4b`: the probes' E2B_TEXT config is replaced in place by that geometry's real text config
  (slimtune.models.geometry), and their checkpoint folder by /tmp/<geometry>_text_random. The HF probe builds,
  saves and loads exactly as it does for E2B; Unsloth's probe reads that checkpoint. For 31B this needs 62 GB of
  disk: use the next option instead.
- `--checkpoint DIR` (Unsloth only, QLoRA only): a pre-quantized checkpoint from prequantized_checkpoint.py (31B:
  ~17 GB).
Records go to $ANCHOR_OUT/results.jsonl (HF) or unsloth.jsonl, after a note that names the geometry.

Usage (GPU box, repository root; PYTHONPATH with .gpu-site as for the anchors):
    ANCHOR_OUT=$OUT python benchmarks/gpu/anchors_geometry.py --geometry e4b --probe hf --runs qlora:2048,lora16:2048
    ANCHOR_OUT=$OUT python benchmarks/gpu/anchors_geometry.py --geometry e4b --probe unsloth --runs qlora:2048
    ANCHOR_OUT=$OUT python benchmarks/gpu/anchors_geometry.py --checkpoint /tmp/g31b --probe unsloth --runs qlora:2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def anchors_folder(given: str | None) -> Path:
    """.anchors/ in the checkout (or `given`), else the shared originals beside the checkout."""
    for folder in [Path(given)] if given else [ROOT / ".anchors", ROOT.parent / "shared" / "bench" / "anchors"]:
        if (folder / "probe_hf_baseline.py").is_file():
            return folder
    raise SystemExit("anchor probes not found: copy ../shared/bench/anchors/*.py into .anchors/ first")


def use_geometry(hf_probe, geometry: str) -> str:
    """Point the HF probe's E2B config (shared with the Unsloth probe, which imports it) at `geometry`."""
    from slimtune.models.geometry import real_text_config_kwargs

    hf_probe.E2B_TEXT.clear()
    hf_probe.E2B_TEXT.update(real_text_config_kwargs(geometry))  # the same dict object the probes read
    hf_probe.SAVE = f"/tmp/{geometry}_text_random"
    return hf_probe.SAVE


def parse_runs(text: str) -> list[tuple[str, int]]:
    runs = []
    for item in text.split(","):
        mode, _, seq = item.partition(":")
        if mode not in ("qlora", "lora16") or not seq.isdigit():
            raise SystemExit(f"--runs: {item!r} is not mode:seq with mode qlora or lora16 (e.g. qlora:2048)")
        runs.append((mode, int(seq)))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", required=True, choices=["hf", "unsloth"])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--geometry", choices=["e2b", "e4b", "26b-a4b", "31b"])
    where.add_argument("--checkpoint", help="pre-quantized folder from prequantized_checkpoint.py (unsloth, qlora)")
    ap.add_argument("--runs", default="qlora:2048", help="comma-separated mode:seq, e.g. qlora:2048,lora16:8192")
    ap.add_argument("--anchors", help="folder holding the anchor probes (default .anchors/)")
    a = ap.parse_args()
    runs = parse_runs(a.runs)
    if a.checkpoint and (a.probe != "unsloth" or any(mode != "qlora" for mode, _ in runs)):
        ap.error("--checkpoint holds 4-bit weights: use it with --probe unsloth and qlora runs")
    sys.path.insert(0, str(anchors_folder(a.anchors)))
    if a.probe == "unsloth":
        import unsloth  # noqa: F401,PLC0415 - before transformers, as the Unsloth probe does
    else:
        # .gpu-site carries Unsloth's torchao 0.15; peft 0.21 finds it and refuses to build a bf16 LoRA (it wants
        # >= 0.16: session 5, call 3). The HF+PEFT stack the anchors measured has no torchao: hide it.
        sys.modules["torchao"] = None
    import probe_hf_baseline as hf  # noqa: PLC0415 - the anchors' modules, unmodified

    save = str(Path(a.checkpoint).resolve()) if a.checkpoint else use_geometry(hf, a.geometry)
    if a.probe == "hf":
        hf.emit(probe="note", geometry=a.geometry, text="anchors_geometry.py: the HF probe's functions")
        for mode, seq in runs:
            if mode == "lora16":
                hf.e2b_lora_bf16(seq)
            else:
                if not (Path(save) / "config.json").is_file():
                    hf.save_e2b()
                hf.e2b_qlora(seq)
        return
    import probe_unsloth as un  # noqa: PLC0415

    un.SAVE = save
    un.make_ckpt()  # builds hf.E2B_TEXT's model where missing; adds its word-level tokenizer to the folder
    un.emit(probe="note", geometry=a.geometry, checkpoint=save, text="anchors_geometry.py: the Unsloth probe's run()")
    for mode, seq in runs:
        try:
            un.run(mode == "qlora", seq)
        except Exception as exc:  # recorded as the probe records its own failures, then the next run
            un.emit(probe="unsloth", load_in_4bit=mode == "qlora", seq=seq, error=repr(exc)[:800])


if __name__ == "__main__":
    main()
