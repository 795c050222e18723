"""`slimtune train`: fine-tune from flags and/or a YAML run file (flags win)."""

from __future__ import annotations

import argparse
import os
import sys

# flag → (TrainConfig field, type, help). Defaults live in TrainConfig; unset flags do not override the file.
_FLAGS = [
    ("--model", "model", str, "local model folder, hub id, or random:e2b/e4b/26b-a4b/31b (random weights)"),
    ("--data", "data", str, "dataset file or folder"),
    ("--output", "output", str, "run folder (adapter/, metrics.jsonl, config.yaml)"),
    ("--max-steps", "max_steps", int, "optimizer steps (default: one epoch)"),
    ("--epochs", "epochs", float, "passes over the data when --max-steps is not given"),
    ("--lr", "lr", float, "peak learning rate (default 2e-4)"),
    ("--lr-scheduler", "lr_scheduler", str, "cosine | linear | constant"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps (default 3%% of the run)"),
    ("--lora-r", "lora_r", int, "LoRA rank (default 16)"),
    ("--lora-alpha", "lora_alpha", float, "LoRA alpha (default 16)"),
    ("--lora-dropout", "lora_dropout", float, "dropout on the LoRA input"),
    ("--batch-size", "batch_size", int, "samples per micro-batch"),
    ("--grad-accum", "grad_accum", int, "micro-batches per optimizer step"),
    ("--max-seq-length", "max_seq_length", int, "truncate samples to this many tokens"),
    ("--seed", "seed", int, "seed for adapter init, data order and dropout"),
    ("--save-steps", "save_steps", int, "checkpoint every K steps (0 = only at the end)"),
    ("--dtype", "dtype", str, "bfloat16 | float16 | float32 (default: auto)"),
    ("--device", "device", str, "cuda | cpu (default: auto)"),
    ("--train-on", "train_on", str, "assistant (default) | all"),
    ("--chat-template", "chat_template", str, "auto (default) | gemma4 | gemma4-thinking"),
    ("--tool-messages", "tool_messages", str, "keep (default) | reject rows with tool turns"),
    ("--image-max-soft-tokens", "image_max_soft_tokens", int, "image budget: 70 | 140 | 280 | 560 | 1120"),
    ("--max-grad-norm", "max_grad_norm", float, "gradient clipping norm (0 = off)"),
    ("--max-memory", "max_memory", str, "GPU memory budget, e.g. 8GiB, 8GB, 8000MiB (per GPU with --nproc): "
     "settings you leave unset are planned to fit it"),
    ("--loss-chunk-size", "loss_chunk_size", int, "rows per lm_head + loss chunk (0 = automatic)"),
    ("--eval-data", "eval_data", str, "held-out dataset file for evaluation"),
    ("--eval-fraction", "eval_fraction", float, "fraction of the training samples held out for evaluation"),
    ("--eval-steps", "eval_steps", int, "evaluate every N steps (0 = only at the end)"),
    ("--checkpoint-layers", "checkpoint_layers", int,
     "recompute only the first N decoder layers in backward (faster, more memory; default: all)"),
    ("--mlp-chunk-size", "mlp_chunk_size", int, "run each decoder MLP over chunks of N tokens (0 = off)"),
    ("--optimizer", "optimizer", str, "adamw (default) | adamw8bit"),
    ("--early-stopping-patience", "early_stopping_patience", int,
     "stop after N evaluations without improvement (0 = off)"),
    ("--distributed", "distributed", str, "with several processes: auto (= ddp) | ddp | fsdp (shards weights and LoRA)"),
]
_BOOLS = [
    ("--load-in-4bit", "load_in_4bit", "QLoRA: NF4 base weights"),
    ("--use-rslora", "use_rslora", "rank-stabilised LoRA scaling"),
    ("--finetune-vision-layers", "finetune_vision_layers", "LoRA on the vision tower too"),
    ("--finetune-audio-layers", "finetune_audio_layers", "LoRA on the audio tower too"),
    ("--finetune-multimodal-embedders", "finetune_multimodal_embedders",
     "LoRA on the embed_vision / embed_audio projections into the text model too"),
    ("--finetune-experts", "finetune_experts",
     "MoE (26B-A4B): LoRA on the fused expert tensors too (PEFT target_parameters; large, needs dropout 0)"),
    ("--text-only", "text_only", "multimodal checkpoint: load only the language model (towers are never read)"),
    ("--packing", "packing", "pack several samples per sequence (no cross-sample attention or loss)"),
    ("--activation-offload", "activation_offload", "keep checkpointed layer inputs in pinned host memory"),
    ("--compile", "compile_layers", "torch.compile each decoder layer (faster steps after compiling; fixed shapes)"),
    ("--recompute-norms", "recompute_norms", "(default) RMSNorms keep their 16-bit input, not an fp32 copy"),
    ("--cuda-graphs", "cuda_graphs", "capture each step as one CUDA graph (much faster short sequences; default "
     "auto: on when the run allows it and fits with headroom)"),
    ("--resume", "resume", "continue exactly from the newest complete checkpoint in the run folder"),
]


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model with LoRA / QLoRA",
                       description="Fine-tune with LoRA/QLoRA. Settings come from --config (YAML) and flags; "
                                   "flags override the file.")
    p.add_argument("--config", help="YAML run file (e.g. a previous run's config.yaml)")
    for flag, dest, typ, help_ in _FLAGS:
        p.add_argument(flag, dest=dest, type=typ, help=help_, default=argparse.SUPPRESS)
    for flag, dest, help_ in _BOOLS:
        p.add_argument(flag, dest=dest, action="store_true", help=help_, default=argparse.SUPPRESS)
    p.add_argument("--nproc", dest="nproc", type=int, default=argparse.SUPPRESS,
                   help="train with N processes (GPUs): re-runs this command under torchrun")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                   default=argparse.SUPPRESS, help="keep all activations (faster, more memory)")
    p.add_argument("--no-recompute-norms", dest="recompute_norms", action="store_false", default=argparse.SUPPRESS,
                   help="transformers' own RMSNorms (fp32 copy saved for backward; slower, more memory)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=argparse.SUPPRESS,
                   help="never capture steps as CUDA graphs (the default, auto, captures when the run allows it)")
    p.set_defaults(func=run)


def run(args) -> int:
    from slimtune.train.config_io import resolve_config  # noqa: PLC0415
    from slimtune.train.run import train  # noqa: PLC0415

    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "argv", "nproc")}
    cfg = resolve_config(args.config, **overrides)  # bad settings are reported before any process starts
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc != 1:
        from slimtune.cli.launch import relaunch  # noqa: PLC0415

        return relaunch(nproc, getattr(args, "argv", None) or sys.argv[1:])
    result = train(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for the job
        return 0
    last = result.history[-1] if result.history else {}
    print(f"done: {len(result.history)} steps, final loss {last.get('loss', float('nan')):.4f}; "
          f"adapter in {result.adapter_dir}")
    return 0
