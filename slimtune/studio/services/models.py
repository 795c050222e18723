"""The model picker: the embedded tiny model, local folders registered by path, and hub ids.

Registering a local folder is the one place the Studio looks outside its data directory: it checks that
the folder exists and holds a ``config.json``, and stores the path for ``slimtune train --model``. It never
reads or serves files from there.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from slimtune.studio.context import Studio
from slimtune.studio.paths import check_id, new_id

TINY_ID = "embeddedtiny"
TINY_NAME = "Embedded tiny Gemma 4 (demo, CPU-friendly)"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
TINY_BUILD_TIMEOUT_S = 600


def _tiny_marker(studio: Studio) -> Path:
    return studio.dirs.models / "tiny.json"


def tiny_path(studio: Studio) -> Path | None:
    """Folder of the tiny model if it has been written (and still lies inside the data directory)."""
    try:
        path = Path(json.loads(_tiny_marker(studio).read_text())["path"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not path.is_relative_to(studio.dirs.root) or not (path / "config.json").is_file():
        return None
    return path


def ensure_tiny(studio: Studio) -> Path:
    """Write the tiny model once, in a worker process, and remember where it is.

    Raises:
        HTTPException: 500 with the worker's last output lines if it failed.
    """
    with studio.tiny_lock:
        existing = tiny_path(studio)
        if existing is not None:
            return existing
        out_dir = studio.dirs.models / "tiny-gemma4"
        proc = subprocess.run(
            [*studio.settings.tiny_command, str(out_dir)], check=False, capture_output=True, text=True,
            timeout=TINY_BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
            raise HTTPException(status_code=500, detail=f"Could not build the embedded tiny model:\n{tail}")
        path = Path(json.loads(lines[-1])["path"]).resolve()
        if not path.is_relative_to(studio.dirs.root):
            raise HTTPException(status_code=500, detail="The tiny model was written outside the data directory.")
        _tiny_marker(studio).write_text(json.dumps({"path": str(path)}))
        return path


def _tiny_record(studio: Studio) -> dict[str, Any]:
    path = tiny_path(studio)
    return {"id": TINY_ID, "kind": "tiny", "name": TINY_NAME, "ref": str(path) if path else "(not built yet)",
            "ready": path is not None, "created_at": None}


def list_models(studio: Studio) -> list[dict[str, Any]]:
    """The tiny model first, then registered models, newest first."""
    rows = [{**r, "ready": True} for r in studio.store.list("models")]
    return [_tiny_record(studio), *rows]


def get_model(studio: Studio, model_id: str) -> dict[str, Any]:
    """One model record. Raises HTTPException 404 if unknown."""
    if model_id == TINY_ID:
        return _tiny_record(studio)
    row = studio.store.get("models", check_id(model_id, "model id"))
    if row is None:
        raise HTTPException(status_code=404, detail=f"No model with id {model_id}.")
    return {**row, "ready": True}


def register_model(studio: Studio, kind: str, ref: str, name: str | None) -> dict[str, Any]:
    """Add a local folder (absolute path holding config.json) or a hub id to the picker.

    Raises:
        HTTPException: 400 with what is wrong with the path or id.
    """
    ref = ref.strip()
    if kind == "hub":
        if not _HUB_ID.fullmatch(ref):
            raise HTTPException(status_code=400, detail=f"{ref!r} is not a hub id; use the form org/name.")
    else:
        path = Path(ref).expanduser()
        if not path.is_absolute():
            raise HTTPException(status_code=400, detail="Give the model folder as an absolute path.")
        path = path.resolve()
        if not (path / "config.json").is_file():
            raise HTTPException(status_code=400, detail=f"{path} is not a model folder (no config.json in it).")
        ref = str(path)
    row = {"id": new_id(), "kind": kind, "name": (name or ref).strip()[:100], "ref": ref, "created_at": time.time()}
    return {**studio.store.insert("models", row), "ready": True}


def delete_model(studio: Studio, model_id: str) -> None:
    """Forget a registered model (its files, if local, are left alone)."""
    if model_id == TINY_ID:
        raise HTTPException(status_code=400, detail="The embedded tiny model cannot be removed.")
    get_model(studio, model_id)
    studio.store.delete("models", model_id)


def model_ref(studio: Studio, model_id: str) -> str:
    """What to pass to ``--model``, building the tiny model first if it is the one chosen."""
    if model_id == TINY_ID:
        return str(ensure_tiny(studio))
    return str(get_model(studio, model_id)["ref"])
