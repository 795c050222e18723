"""``slimtune studio``: start the local web Studio.

The main CLI calls :func:`register` with its sub-parser collection; ``python -m slimtune.studio`` uses
:func:`main` with the same options.
"""

from __future__ import annotations

import argparse
import os
import sys

from slimtune.errors import ConfigError
from slimtune.studio.settings import (
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_PORT,
    PASSWORD_ENV,
    StudioSettings,
)

HELP = "Start the local web Studio: upload data, train, watch live charts, chat and export."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``slimtune studio``."""
    parser.add_argument("-H", "--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST}; any other needs a password)")
    parser.add_argument("-p", "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--password", default=None,
                        help=f"require this password to log in (or set {PASSWORD_ENV}; the variable keeps it "
                             f"out of your shell history and process list)")
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                        help=f"where runs, uploads, exports and the database live (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest dataset upload in MiB (default {DEFAULT_MAX_UPLOAD_MB})")


def settings_from_args(args: argparse.Namespace) -> StudioSettings:
    """Build settings; the password comes from --password, else from the environment variable."""
    password = args.password if args.password is not None else os.environ.get(PASSWORD_ENV) or None
    return StudioSettings(host=args.host, port=args.port, data_dir=args.data_dir, password=password,
                          max_upload_mb=args.max_upload_mb)


def run(args: argparse.Namespace) -> int:
    """Start the Studio; print a clear message and return 2 when the settings are refused."""
    from slimtune.studio import serve

    try:
        serve(settings_from_args(args))
    except ConfigError as exc:
        print(f"slimtune studio: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        print(f"slimtune studio: {exc.name} is not installed; install the Studio extras with "
              f"pip install 'slimtune[studio]'", file=sys.stderr)
        return 2
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``studio`` sub-command; its handler is stored as ``args.func`` (returns an exit code)."""
    parser = subparsers.add_parser("studio", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m slimtune.studio``)."""
    parser = argparse.ArgumentParser(prog="slimtune studio", description=HELP)
    add_arguments(parser)
    return run(parser.parse_args(argv))
