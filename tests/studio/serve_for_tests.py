"""Start the real Studio server (uvicorn, real HTTP) for end-to-end and load tests.

Usage: python tests/studio/serve_for_tests.py --port P --data-dir D [--password X] [--fake train,chat,export,tiny]
       [--fake-library summary,memory,formats]

``--fake`` swaps the named worker commands for the scripts in tests/studio/fakes; ``--fake-library`` swaps
the named in-process library calls (dataset summary, memory estimate, export formats) for the fakes. Everything
else, the app, routes, security and job handling, is the shipped code.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, so `slimtune` imports from this checkout

from slimtune.studio import library
from slimtune.studio.server import serve
from slimtune.studio.settings import StudioSettings

FAKES = HERE / "fakes"


def _load_fake_library():
    spec = importlib.util.spec_from_file_location("studio_fake_library", FAKES / "fake_library.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--password")
    p.add_argument("--max-upload-mb", type=int, default=16)
    p.add_argument("--fake", default="", help="comma-separated: train,chat,export,tiny")
    p.add_argument("--fake-library", default="", help="comma-separated: summary,memory,formats")
    args = p.parse_args()
    fakes = {x for x in args.fake.split(",") if x}
    kw = {}
    py = sys.executable
    if "train" in fakes:
        kw["train_command"] = [py, str(FAKES / "fake_train.py")]
    if "chat" in fakes:
        kw["chat_command"] = [py, str(FAKES / "fake_chat.py")]
    if "export" in fakes:
        kw["export_command"] = [py, str(FAKES / "fake_export.py")]
    if "tiny" in fakes:
        kw["tiny_command"] = [py, str(FAKES / "fake_tiny.py")]
    fake_lib = {x for x in args.fake_library.split(",") if x}
    if fake_lib:
        fake = _load_fake_library()
        if "summary" in fake_lib:
            library.summarize_dataset = fake.summarize_dataset
        if "memory" in fake_lib:
            library.memory_plan = fake.memory_plan
        if "formats" in fake_lib:
            library.export_formats = lambda: list(fake.FAKE_FORMATS)
    settings = StudioSettings(host="127.0.0.1", port=args.port, data_dir=Path(args.data_dir), password=args.password,
                              max_upload_mb=args.max_upload_mb, stop_grace_s=2.0, **kw)
    serve(settings)


if __name__ == "__main__":
    main()
