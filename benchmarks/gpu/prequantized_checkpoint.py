"""A bitsandbytes-4bit checkpoint of a real Gemma 4 geometry with random weights, for side-by-side runs (issue 9).

Why: comparing 31B (or 26B-A4B) QLoRA with Unsloth on the GPU box needs a checkpoint both can load, and a 16-bit
31B checkpoint is 62 GB (the box's disk holds 64). This writes the NF4 weights slimtune builds directly on the GPU
(`slimtune.bench.random_model`) in the layout transformers' bitsandbytes integration reads: each 4-bit linear as
`weight` (packed uint8) plus its quant-state entries, and a `quantization_config` in config.json. 31B: ~17 GB.
MoE experts stay 16-bit (transformers cannot load 4-bit 3-D expert tensors): 26B-A4B is ~48 GB.

The same folder loads in slimtune (`load_model(folder, load_in_4bit=True)`) and in transformers/Unsloth
(`from_pretrained(folder)`), with identical NF4 bytes. slimtune's small built-in tokenizer is added unless
--no-tokenizer (the Unsloth anchor probe then writes its own word-level one).

Usage (GPU box): python benchmarks/gpu/prequantized_checkpoint.py --geometry 31b --out /tmp/g31b --no-tokenizer
    then: benchmarks/gpu/anchors_geometry.py --checkpoint /tmp/g31b --probe unsloth (the anchor probe's own run)
CPU smoke run (tests/bench/test_prequantized_checkpoint.py): --geometry 31b --tiny --device cpu --out DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing


def write_checkpoint(geometry: str, out: Path, *, device: str, tiny: bool = False, seed: int = 0,
                     tokenizer: bool = True) -> Path:
    """Build the random NF4 model on `device` and save it (and slimtune's tokenizer) to `out`, atomically."""
    from transformers import BitsAndBytesConfig

    from slimtune.bench.random_model import build_random_model
    from slimtune.models.tokenizer_build import build_tokenizer
    from slimtune.utils.atomic import atomic_dir

    model = build_random_model(geometry, mode="qlora", device=device, tiny=tiny, seed=seed, offload_ple=False,
                               quantize_experts=False)
    from slimtune.adapt.quantize import is_nf4_linear

    # Linears slimtune keeps in 16 bits (26B-A4B's router) must be named, or transformers expects 4-bit bytes there.
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not is_nf4_linear(m)]
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,  # what QLoRA linears use
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=kept or None)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        if tokenizer:
            build_tokenizer().save_pretrained(tmp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="31b", choices=["e2b", "e4b", "26b-a4b", "31b"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the geometry's tiny look-alike (CPU smoke runs)")
    ap.add_argument("--no-tokenizer", action="store_true")
    a = ap.parse_args()
    start = time.perf_counter()
    out = write_checkpoint(a.geometry, Path(a.out), device=a.device, tiny=a.tiny, tokenizer=not a.no_tokenizer)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**30
    print(f"{out}: {size:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
