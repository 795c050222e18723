"""Export worker: ``python -m slimtune.studio.workers.export RUN_DIR FORMAT OUT_DIR``.

A thin process wrapper around :func:`slimtune.export.export`, so a crash or an out-of-memory kill during
a merge takes down this process only, and the Studio records the job as failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtune.studio.workers.export", description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("format")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    from slimtune.errors import SlimtuneError
    from slimtune.export import export

    print(f"Exporting {args.run_dir} as {args.format} to {args.out_dir}", flush=True)
    try:
        path = export(args.run_dir, args.format, args.out_dir, overwrite=False)
    except SlimtuneError as exc:
        # Expected failures (unsupported format for this model, missing adapter): the message is enough.
        print(f"Export failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"Export written to {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
