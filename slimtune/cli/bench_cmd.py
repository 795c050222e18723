"""`slimtune bench`: peak memory and tokens/s of LoRA/QLoRA steps on random weights of a real geometry (GPU)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark training memory and speed on a real Gemma 4 geometry (GPU)")
    p.add_argument("--geometry", default="e2b", choices=["e2b", "e4b", "26b-a4b", "31b"])
    p.add_argument("--multimodal", action="store_true",
                   help="include the vision/audio towers; each step's batch holds one image and one audio clip")
    p.add_argument("--finetune-vision-layers", action="store_true", help="with --multimodal: LoRA on the vision tower")
    p.add_argument("--finetune-audio-layers", action="store_true", help="with --multimodal: LoRA on the audio tower")
    p.add_argument("--mode", default="qlora", help="qlora, lora16 or both comma-separated")
    p.add_argument("--seq", default="2048,8192", help="comma-separated sequence lengths")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--attention", default="sdpa", help="sdpa | slimtune")
    p.add_argument("--no-offload-ple", action="store_true", help="keep the per-layer-embedding table on the GPU")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--activation-offload", action="store_true",
                   help="keep checkpointed decoder-layer inputs in pinned host memory")
    p.add_argument("--recompute-norms", action=argparse.BooleanOptionalAction, default=True,
                   help="RMSNorms save their 16-bit input, not fp32, through the fused kernels on CUDA (default: on)")
    p.add_argument("--finetune-experts", action="store_true", help="26b-a4b: LoRA on the fused expert tensors too")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture each training step as one CUDA graph after 2 warm-up steps")
    p.add_argument("--experts-impl", default="auto",
                   help="26b-a4b NF4 experts / expert LoRA: auto | loop | grouped, or a comma list run one after the "
                        "other in this process (auto: grouped on CUDA bf16). 16-bit experts without "
                        "--finetune-experts run transformers' own implementation")
    p.add_argument("--checkpoint-layers", type=int, default=None,
                   help="recompute only the first N decoder layers in backward (default: all)")
    p.add_argument("--mlp-chunk-size", type=int, default=0, help="sequence-tiled MLP: tokens per chunk (0 = off)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit"])
    p.add_argument("--steps-profile", type=int, default=0,
                   help="after the timed steps, profile N more (torch.profiler): GPU time per kernel group")
    p.add_argument("--loss-chunk-size", type=int, default=None, help="rows per lm_head + loss chunk (default: auto)")
    p.add_argument("--max-memory", help="GPU memory budget (e.g. 8GiB): options not given are planned to fit it")
    p.add_argument("--card-gib", type=float, default=None,
                   help="act as a GPU of this many GiB: the allocator may hold no more (cached blocks and CUDA-graph "
                        "pools included), so what would not fit such a card runs out of memory here")
    p.add_argument("--json", help="append one JSON line per result to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import replace  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from slimtune.bench.run import BenchOptions, run_bench  # noqa: PLC0415
    from slimtune.errors import ConfigError  # noqa: PLC0415
    from slimtune.memory.sizes import parse_memory_size  # noqa: PLC0415

    if args.steps_profile < 0:
        raise ConfigError(f"--steps-profile must be >= 0 (got {args.steps_profile}).")
    budget = parse_memory_size(args.max_memory) if args.max_memory is not None else None  # bad sizes fail first
    if not torch.cuda.is_available():
        raise ConfigError("slimtune bench measures GPU memory and needs a CUDA GPU; none is visible here.")
    opts = BenchOptions(offload_ple=not args.no_offload_ple, gradient_checkpointing=not args.no_gradient_checkpointing,
                        attention=args.attention, compile_layers=args.compile,
                        activation_offload=args.activation_offload, mlp_chunk_size=args.mlp_chunk_size,
                        optimizer=args.optimizer,
                        loss_chunk_size=args.loss_chunk_size or 0,
                        finetune_vision_layers=args.finetune_vision_layers,
                        finetune_audio_layers=args.finetune_audio_layers, cuda_graphs=args.cuda_graphs,
                        finetune_experts=args.finetune_experts, recompute_norms=args.recompute_norms,
                        checkpoint_layers=args.checkpoint_layers)
    if args.card_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(card_fraction(args.card_gib, total))
        opts = replace(opts, extra={**opts.extra, "card_gib": args.card_gib})
    impls = [replace(opts, experts_impl=i) for i in args.experts_impl.split(",")]  # each one validated
    explicit = frozenset(name for name, given in (("gradient_checkpointing", args.no_gradient_checkpointing),
                                                  ("loss_chunk_size", args.loss_chunk_size is not None),
                                                  ("activation_offload", args.activation_offload),
                                                  ("mlp_chunk_size", args.mlp_chunk_size != 0),
                                                  ("optimizer", args.optimizer != "adamw")) if given)
    if (args.finetune_vision_layers or args.finetune_audio_layers) and not args.multimodal:
        raise ConfigError("--finetune-vision-layers / --finetune-audio-layers need --multimodal (the towers).")
    for options in impls:  # built and checked above, so a bad name fails before any model is built
        run_bench(args.geometry, args.mode.split(","), [int(s) for s in args.seq.split(",")], steps=args.steps,
                  multimodal=args.multimodal, options=options, json_path=args.json, max_memory=budget,
                  explicit=explicit, profile_steps=args.steps_profile)
    return 0


def card_fraction(card_gib: float, total_bytes: int) -> float:
    """The share of this GPU's memory that a `card_gib` GiB card has (for set_per_process_memory_fraction).

    Raises:
        ConfigError: not a positive size, or more than this GPU has.
    """
    from slimtune.errors import ConfigError  # noqa: PLC0415

    total_gib = total_bytes / 2**30
    if not card_gib > 0 or card_gib > total_gib:
        raise ConfigError(f"--card-gib must be above 0 and at most this GPU's {total_gib:.1f} GiB (got {card_gib}).")
    return card_gib / total_gib
