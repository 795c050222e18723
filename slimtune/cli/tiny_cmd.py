"""`slimtune tiny-model OUT_DIR`: write a tiny random Gemma 4 checkpoint with the structure of a real variant."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny random-init Gemma 4 model folder (tests, demos)")
    p.add_argument("out_dir", help="folder to create")
    p.add_argument("--variant", default="e2b", choices=["e2b", "e4b", "26b-a4b", "31b"])
    p.add_argument("--text-only", action="store_true", help="no vision/audio towers (Gemma4ForCausalLM)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="test", choices=["test", "demo"], help="test = smallest; demo = a bit larger")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from slimtune.models.tiny import write_tiny_model  # noqa: PLC0415

    out = write_tiny_model(args.out_dir, variant=args.variant, text_only=args.text_only, seed=args.seed,
                           size=args.size, overwrite=args.overwrite)
    print(f"wrote tiny Gemma 4 ({args.variant}{', text only' if args.text_only else ''}) to {out}")
    return 0
