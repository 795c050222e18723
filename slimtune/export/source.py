"""Find what an export works from: the PEFT adapter folder and the base checkpoint it was trained on.

`source` is either a training run folder (``RUN_DIR/adapter/`` + ``RUN_DIR/config.yaml``) or a bare PEFT adapter
folder (``adapter_config.json`` + ``adapter_model.safetensors``). The base model comes from the run config's
``model`` key when there is one (it is what the user asked for), else from the adapter's
``base_model_name_or_path``. It may be a local folder or a hub id that is already in the local Hugging Face cache;
exports never download.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.errors import ExportError

logger = logging.getLogger(__name__)

__all__ = ["ExportSource", "read_json", "resolve_base_dir", "resolve_source"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class ExportSource:
    """Where an export reads from.

    Attributes:
        adapter_dir: folder holding adapter_config.json and adapter_model.safetensors.
        base_model: the base model as recorded (local path or hub id).
        run_dir: the training run folder, or None when `source` was a bare adapter folder.
        adapter_config: the parsed adapter_config.json.
    """

    adapter_dir: Path
    base_model: str
    run_dir: Path | None
    adapter_config: dict[str, Any]


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, raising ExportError (not JSONDecodeError) with the file name on failure."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{str(path)!r} does not hold a JSON object")
    return data


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml  # local import: only run folders need it

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ExportError(f"cannot read the run config {str(path)!r}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def resolve_source(source: Path | str) -> ExportSource:
    """Locate the adapter and the base model id/path for `source`.

    Args:
        source: a run folder (has ``adapter/``) or an adapter folder (has ``adapter_config.json``).

    Returns:
        The resolved `ExportSource`.

    Raises:
        ExportError: `source` does not exist, holds no adapter, the adapter is not a LoRA adapter in PEFT's
            safetensors format, or no base model is recorded anywhere.
    """
    src = Path(source).expanduser()
    if not src.is_dir():
        raise ExportError(f"export source {str(src)!r} is not a folder; pass a training run folder or an adapter folder")
    run_dir: Path | None = None
    if (src / "adapter" / ADAPTER_CONFIG).is_file():
        run_dir, adapter_dir = src, src / "adapter"
    elif (src / ADAPTER_CONFIG).is_file():
        adapter_dir = src
        # An adapter saved inside a run folder still gets the run's config.yaml.
        if (src.parent / "config.yaml").is_file() and src.name == "adapter":
            run_dir = src.parent
    else:
        raise ExportError(
            f"no adapter found in {str(src)!r}: expected {str(src / 'adapter' / ADAPTER_CONFIG)!r} (a training run "
            f"folder) or {str(src / ADAPTER_CONFIG)!r} (an adapter folder). Has the run saved a checkpoint yet?"
        )
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        hint = " (found adapter_model.bin: re-save it with safe_serialization=True)" if (
            adapter_dir / "adapter_model.bin"
        ).is_file() else ""
        raise ExportError(f"adapter folder {str(adapter_dir)!r} has no {ADAPTER_WEIGHTS}{hint}")
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ExportError(
            f"{str(adapter_dir / ADAPTER_CONFIG)!r} has peft_type={config.get('peft_type')!r}; only LoRA adapters "
            "can be exported"
        )
    base = None
    if run_dir is not None:
        base = _read_run_config(run_dir).get("model")
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ExportError(
            f"no base model recorded for {str(adapter_dir)!r}: set base_model_name_or_path in {ADAPTER_CONFIG} "
            "to the base model's folder or hub id"
        )
    return ExportSource(adapter_dir=adapter_dir, base_model=str(base), run_dir=run_dir, adapter_config=config)


def _has_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def resolve_base_dir(base_model: str, *, run_dir: Path | None = None) -> Path:
    """Return the local folder of the base checkpoint, without downloading anything.

    Args:
        base_model: a folder path, or a hub id such as ``google/gemma-4-E2B-it``.
        run_dir: the run folder; a relative path is also tried relative to it.

    Returns:
        A folder with config.json and safetensors weights.

    Raises:
        ExportError: the folder does not exist, is not in the local hub cache, or has no safetensors weights.
    """
    candidates = [Path(base_model).expanduser()]
    if run_dir is not None and not Path(base_model).is_absolute():
        candidates.append(run_dir / base_model)
    for cand in candidates:
        if cand.is_dir():
            if not (cand / "config.json").is_file() or not _has_weights(cand):
                raise ExportError(
                    f"base model folder {str(cand)!r} has no config.json or no safetensors weights "
                    "(model.safetensors or model.safetensors.index.json)"
                )
            return cand
    looks_like_hub_id = base_model.count("/") == 1 and not base_model.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(base_model, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any hub error means "not cached"; the raise below says what to do
            logger.debug("hub cache lookup for %s failed: %s", base_model, exc)
        else:
            if _has_weights(cached):
                return cached
    raise ExportError(
        f"base model {base_model!r} not found: it is not a local folder"
        + (" and is not in the local Hugging Face cache" if looks_like_hub_id else "")
        + ". Download it first (e.g. `hf download "
        + base_model
        + "`) or set base_model_name_or_path in adapter_config.json (or `model` in the run's config.yaml) "
        "to the folder that holds the base checkpoint"
    )
