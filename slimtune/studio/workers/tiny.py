"""Writes the embedded tiny Gemma 4 model: ``python -m slimtune.studio.workers.tiny OUT_DIR``.

Runs in its own process so the Studio server never imports torch just to build a demo model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="slimtune.studio.workers.tiny", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)

    from slimtune.models.tiny import write_tiny_model

    # Same model as `slimtune demo`: text-only (chat data needs no vision/audio towers) and the "demo" size.
    path = write_tiny_model(args.out_dir, variant="e2b", text_only=True, seed=0, size="demo", overwrite=True)
    # The last stdout line tells the Studio where the model folder is (write_tiny_model returns it).
    print(json.dumps({"path": str(Path(path).resolve())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
