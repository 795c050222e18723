"""The slimtune functions the Studio server calls in-process, imported lazily.

Lazy imports keep the server quick to start and light (no torch until a feature needs it), and turn a
missing piece of the library into a clear HTTP 503 instead of a server that will not boot. Heavy work
(training, export, chat, building the tiny model) never runs here: it runs in worker processes.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BUNDLED_DATASET = Path(__file__).resolve().parents[1] / "data" / "default_data.jsonl"


class LibraryUnavailable(RuntimeError):
    """A slimtune module or function the Studio needs is not installed or not importable."""


def _get(module: str, name: str) -> Any:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise LibraryUnavailable(f"{module} is not available in this installation: {exc}") from exc
    try:
        return getattr(mod, name)
    except AttributeError as exc:
        raise LibraryUnavailable(f"{module}.{name} is not available in this installation.") from exc


def summarize_dataset(path: Path, n_preview: int = 5) -> dict[str, Any]:
    """Detected format, columns, row counts, skipped rows and a preview (``slimtune.data.summarize_dataset``).

    Raises:
        slimtune.errors.DataError: the file cannot be used; its message is shown to the user.
        LibraryUnavailable: ``slimtune.data`` is missing.
    """
    return _get("slimtune.data", "summarize_dataset")(path, n_preview=n_preview)


def check_train_config(values: dict[str, Any]) -> Any:
    """A ``slimtune.train.TrainConfig`` from settings named as its fields, checked as ``slimtune train`` checks
    its flags (``resolve_config``): the keys given count as set by the user, which is what the planner reads.

    Raises:
        slimtune.errors.ConfigError: every problem at once, in the trainer's words (the app answers 422).
    """
    return _get("slimtune.train.config_io", "resolve_config")(None, **values)


def memory_plan(cfg: Any) -> dict[str, Any]:
    """What ``slimtune train`` prints before training (``slimtune.memory.train_plan.plan_for_config``): the
    prediction for cfg's settings or, with ``cfg.max_memory``, the plan chosen for that budget.

    Returns:
        ``{"plan": Plan, "message": None, "longest_seq_length": None}``; when nothing fits the budget, the smallest
        plan with the planner's message and the longest max_seq_length that fits (0: none).

    Raises:
        ValueError: the model's config cannot be read (e.g. a hub id while offline).
    """
    plan_for_config = _get("slimtune.memory.train_plan", "plan_for_config")
    budget_error = _get("slimtune.memory.planner", "MemoryBudgetError")
    try:
        return {"plan": plan_for_config(cfg), "message": None, "longest_seq_length": None}
    except budget_error as exc:
        return {"plan": exc.plan, "message": str(exc), "longest_seq_length": exc.longest_seq}


def export_formats() -> list[dict[str, str]]:
    """The export formats the library offers, as ``{"name", "description"}`` (``slimtune.export.EXPORT_FORMATS``).

    ``EXPORT_FORMATS`` may be a mapping of name to description (or to an object with a ``description``)
    or a plain sequence of names; all three are accepted.
    """
    formats = _get("slimtune.export", "EXPORT_FORMATS")
    out: list[dict[str, str]] = []
    if isinstance(formats, Mapping):
        for name, value in formats.items():
            desc = value if isinstance(value, str) else getattr(value, "description", "") or ""
            out.append({"name": str(name), "description": str(desc)})
    else:
        out = [{"name": str(name), "description": ""} for name in formats]
    return out


def bundled_dataset() -> Path:
    """Path of the sample dataset shipped with slimtune.

    Raises:
        LibraryUnavailable: the file is not part of this installation.
    """
    if not BUNDLED_DATASET.is_file():
        raise LibraryUnavailable(f"The bundled sample dataset is missing ({BUNDLED_DATASET}).")
    return BUNDLED_DATASET
