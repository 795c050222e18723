"""`slimtune chat`: talk to a base model (optionally with an adapter); one-shot with --prompt."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (and adapter)")
    p.add_argument("--model", required=True, help="model folder or hub id (for a run: the base model)")
    p.add_argument("--adapter", help="LoRA adapter folder (e.g. RUN_DIR/adapter)")
    p.add_argument("--prompt", help="one-shot: answer this and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--device")
    p.set_defaults(func=run)


def run(args) -> int:
    from slimtune.adapt.adapter_io import load_adapter  # noqa: PLC0415
    from slimtune.infer.generate import generate  # noqa: PLC0415
    from slimtune.models.loader import load_model  # noqa: PLC0415

    model, tok = load_model(args.model, load_in_4bit=args.load_in_4bit, device=args.device)
    if args.adapter:
        load_adapter(model, args.adapter)
    model.eval()
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop)
    history = [{"role": "system", "content": args.system}] if args.system else []

    def answer(text: str) -> str:
        history.append({"role": "user", "content": text})
        pieces = []
        for piece in generate(model, tok, history, stream=True, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
        sys.stdout.write("\n")
        reply = "".join(pieces)
        history.append({"role": "assistant", "content": reply})
        return reply

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("chat: type a message, /reset to clear, /exit or Ctrl-D to quit")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            del history[len([m for m in history if m["role"] == "system"]):]
            continue
        if text:
            answer(text)
