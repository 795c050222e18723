"""`slimtune demo`: the embedded default job — fine-tune the tiny Gemma 4 on the bundled dataset, show before/after."""

from __future__ import annotations

from pathlib import Path

PROMPTS = ["What is the capital of France?", "What is the opposite of hot?"]


def register(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune the embedded tiny Gemma 4 on the bundled data (a few CPU minutes)")
    p.add_argument("--output", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def _show(model, tok, title: str) -> None:
    from slimtune.infer.generate import generate  # noqa: PLC0415

    print(f"--- {title} ---")
    for prompt in PROMPTS:
        reply = generate(model, tok, [{"role": "user", "content": prompt}], max_new_tokens=24, temperature=0.0)
        print(f"Q: {prompt}\nA: {reply.strip()!r}")


def run(args) -> int:
    import torch  # noqa: PLC0415

    from slimtune.models.tiny import write_tiny_model  # noqa: PLC0415
    from slimtune.train.config import TrainConfig  # noqa: PLC0415
    from slimtune.train.run import prepare_data, prepare_model, write_run_config  # noqa: PLC0415
    from slimtune.train.loop import fit  # noqa: PLC0415
    from slimtune.data.tokenize import text_tokenizer  # noqa: PLC0415

    torch.set_num_threads(max(1, torch.get_num_threads()))
    run_dir = Path(args.output)
    model_dir = run_dir / "base-model"
    if not (model_dir / "config.json").is_file():
        write_tiny_model(model_dir, variant="e2b", text_only=True, seed=0, size="demo", overwrite=True)
    data = Path(__file__).resolve().parent.parent / "data" / "default_data.jsonl"
    cfg = TrainConfig(model=str(model_dir), data=str(data), output=str(run_dir), max_steps=args.max_steps,
                      lr=args.lr, batch_size=8, grad_accum=1, max_seq_length=256, lora_r=32, lora_alpha=64,
                      gradient_checkpointing=False, log_every=50, device=args.device)
    write_run_config(cfg, run_dir)
    model, tok = prepare_model(cfg)
    examples = prepare_data(cfg, tok)
    _show(model, tok, "before fine-tuning")
    device = next(p.device for p in model.parameters() if p.requires_grad)
    result = fit(model, examples, cfg, run_dir, pad_id=text_tokenizer(tok).pad_token_id or 0, device=device,
                 dtype=model.get_input_embeddings().weight.dtype)
    _show(model, tok, "after fine-tuning")
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    print(f"loss {first:.3f} → {last:.3f} over {len(result.history)} steps; adapter: {result.adapter_dir}")
    print(f"chat with it: slimtune chat --model {model_dir} --adapter {result.adapter_dir}")
    return 0
