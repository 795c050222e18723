"""`slimtune` entry point: builds the parser from the sub-command modules and turns our errors into messages."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers); its parser sets `func`. Studio is optional (web extras).
_COMMANDS = ("tiny_cmd", "train_cmd", "chat_cmd", "demo_cmd", "export_cmd", "bench_cmd", "plot_cmd", "studio_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtune", description="Fine-tune Gemma 4 with LoRA / QLoRA.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"slimtune.cli.{name}")
        except ImportError as exc:  # a command whose optional dependencies are missing stays listed with a hint
            p = sub.add_parser(name.removesuffix("_cmd").replace("_", "-"), help=f"(unavailable: {exc})")
            p.set_defaults(func=lambda args, exc=exc: _fail(f"this command needs more packages: {exc}"))
            continue
        module.register(sub)
    return parser


def _version() -> str:
    from slimtune import __version__  # noqa: PLC0415

    return f"slimtune {__version__}"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `train --nproc` re-runs the same command
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    from slimtune.errors import SlimtuneError  # noqa: PLC0415

    try:
        return int(args.func(args) or 0)
    except SlimtuneError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")
