"""`slimtune export`: adapter, merged 16-bit / 4-bit checkpoints, or GGUF from a run or adapter folder."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="export a run: lora | merged-16bit | merged-4bit | gguf-bf16 | gguf-q8_0")
    p.add_argument("source", help="RUN_DIR (with adapter/) or an adapter folder")
    p.add_argument("--format", required=True, help="lora | merged-16bit | merged-4bit | gguf-bf16 | gguf-q8_0")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from slimtune.export import export  # noqa: PLC0415

    out = export(args.source, args.format, args.out, overwrite=args.overwrite)
    print(f"exported {args.format} to {out}")
    return 0
