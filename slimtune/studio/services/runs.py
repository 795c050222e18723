"""Training runs: turn a config into a ``slimtune train`` command line, queue it, stop, resume, delete."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from slimtune.studio import library
from slimtune.studio.context import Studio
from slimtune.studio.db import ACTIVE_STATES, QUEUED, dumps
from slimtune.studio.jobs import Job
from slimtune.studio.paths import check_id, new_id
from slimtune.studio.schemas import TrainConfig, TrainSettings
from slimtune.studio.services import datasets as datasets_svc
from slimtune.studio.services import models as models_svc
from slimtune.studio.services.tails import last_metric

# Studio settings handed to `slimtune train`, each as the flag of the same name (--max-seq-length for
# max_seq_length). The names are TrainConfig's fields: check_train_config validates the same values the worker gets.
TRAIN_FIELDS = ("max_steps", "epochs", "lr", "lora_r", "lora_alpha", "batch_size", "grad_accum", "max_seq_length",
                "seed", "save_steps", "max_memory", "mlp_chunk_size", "loss_chunk_size", "optimizer",
                "load_in_4bit", "activation_offload", "recompute_norms", "cuda_graphs", "compile_layers", "packing",
                "text_only", "finetune_multimodal_embedders")
RESUMABLE = ("stopped", "failed", "interrupted")


def _trainer_default(name: str) -> Any:
    from slimtune.train.config import TrainConfig as TrainerConfig  # noqa: PLC0415

    return TrainerConfig.__dataclass_fields__[name].default


def train_values(settings: TrainSettings) -> dict[str, Any]:
    """The settings given, as TrainConfig keyword arguments. None, and a switch at the trainer's default, are not
    given: like a flag left off the command line, the trainer's default applies or, with max_memory, the planner
    chooses. A switch the trainer turns on by default (recompute_norms) is given only when turned off."""
    values = {}
    for name in TRAIN_FIELDS:
        value = getattr(settings, name, None)
        if isinstance(value, bool):
            if value != _trainer_default(name):
                values[name] = value
        elif value is not None:  # `is`: 0 (e.g. mlp_chunk_size=0, "off") is a given value
            values[name] = value
    return values


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_train_argv(command: list[str], cfg: TrainConfig, *, model_ref: str, data_path: Path,
                     run_dir: Path, resume: bool) -> list[str]:
    """The worker's command line: ``<command> --model M --data FILE --output RUN_DIR [--flag value...] [switches]``
    where a switch is ``--name`` (on) or ``--no-name`` (off, where the trainer's default is on or auto)."""
    argv = [*command, "--model", model_ref, "--data", str(data_path), "--output", str(run_dir)]
    values = train_values(cfg)
    for name, value in values.items():
        if not isinstance(value, bool):
            argv += [_flag(name), str(value)]
    argv += [_flag(name) if value else "--no-" + _flag(name)[2:] for name, value in values.items()
             if isinstance(value, bool)]
    if resume:
        argv.append("--resume")
    return argv


def check_config(cfg: TrainSettings, *, model_ref: str, data_path: Path | str, output: Path | str) -> Any:
    """The run's ``slimtune.train.TrainConfig``, validated as the worker will validate it.

    Raises:
        slimtune.errors.ConfigError: bad settings, with the trainer's own message (answered as 422).
    """
    return library.check_train_config({"model": model_ref, "data": str(data_path), "output": str(output),
                                       **train_values(cfg)})


def run_dir(studio: Studio, run_id: str) -> Path:
    """The run's output folder. Paths are derived from ids, never read back from the database, so a moved
    data directory keeps working and a tampered row cannot point outside it."""
    return studio.dirs.runs / run_id


def log_path(studio: Studio, run_id: str) -> Path:
    """The worker's combined stdout/stderr."""
    return studio.dirs.logs / f"run-{run_id}.log"


def get_run(studio: Studio, run_id: str) -> dict[str, Any]:
    """One run row. Raises HTTPException 400 (bad id) or 404."""
    row = studio.store.get("runs", check_id(run_id, "run id"))
    if row is None:
        raise HTTPException(status_code=404, detail=f"No run with id {run_id}.")
    return row


def _job(studio: Studio, row: dict[str, Any], *, resume: bool) -> Job:
    cfg = TrainConfig.model_validate_json(row["config_json"])
    data_path = datasets_svc.dataset_path(studio, datasets_svc.get_dataset(studio, row["dataset_id"]))
    argv = build_train_argv(studio.settings.train_command, cfg, model_ref=row["model_ref"], data_path=data_path,
                            run_dir=run_dir(studio, row["id"]), resume=resume)
    return Job(table="runs", id=row["id"], argv=argv, log_path=log_path(studio, row["id"]))


def create_run(studio: Studio, cfg: TrainConfig) -> dict[str, Any]:
    """Record a run and queue its worker (it starts now if the GPU is free)."""
    if cfg.max_steps is None and cfg.epochs is None:
        raise HTTPException(status_code=422, detail="Set max_steps or epochs (or both).")
    data_path = datasets_svc.dataset_path(studio, datasets_svc.get_dataset(studio, cfg.dataset_id))
    model_ref = models_svc.model_ref(studio, cfg.model_id)
    run_id = new_id()
    # Refused here, with the trainer's message, rather than as a failed run a moment later.
    check_config(cfg, model_ref=model_ref, data_path=data_path, output=run_dir(studio, run_id))
    row = {
        "id": run_id, "name": (cfg.name or "").strip() or f"run-{run_id[:6]}", "status": QUEUED,
        "model_id": cfg.model_id, "model_ref": model_ref, "dataset_id": cfg.dataset_id,
        "config_json": dumps(cfg.model_dump()), "run_dir": str(run_dir(studio, run_id)),
        "log_path": str(log_path(studio, run_id)), "created_at": time.time(),
    }
    studio.store.insert("runs", row)
    studio.jobs.submit(_job(studio, row, resume=False))
    return get_run(studio, run_id)


def resume_run(studio: Studio, run_id: str) -> dict[str, Any]:
    """Queue a stopped, failed or interrupted run again with ``--resume``."""
    row = get_run(studio, run_id)
    if row["status"] not in RESUMABLE:
        raise HTTPException(status_code=409, detail=f"Only {', '.join(RESUMABLE)} runs can be resumed; "
                                                    f"this one is {row['status']}.")
    job = _job(studio, row, resume=True)
    studio.store.update("runs", run_id, resume_count=row["resume_count"] + 1)
    studio.jobs.submit(job)
    return get_run(studio, run_id)


def requeue(studio: Studio, run_id: str) -> None:
    """Queue a run that was still waiting when the server last stopped (it never started)."""
    row = get_run(studio, run_id)
    try:
        studio.jobs.submit(_job(studio, row, resume=False))
    except HTTPException as exc:
        studio.store.update("runs", run_id, status="failed", error=f"Could not queue again: {exc.detail}")


def stop_run(studio: Studio, run_id: str) -> dict[str, Any]:
    """Stop a queued or running run (its whole process group gets SIGTERM, then SIGKILL)."""
    row = get_run(studio, run_id)
    if not studio.jobs.stop("runs", run_id):
        raise HTTPException(status_code=409, detail=f"The run is {row['status']}, not queued or running.")
    return get_run(studio, run_id)


def delete_run(studio: Studio, run_id: str) -> None:
    """Delete a finished run: its row, run folder, log, exports and cached zips."""
    row = get_run(studio, run_id)
    if row["status"] in ACTIVE_STATES:
        raise HTTPException(status_code=409, detail="Stop the run before deleting it.")
    from slimtune.studio.services import exports as exports_svc  # imported here: exports imports this module

    exports_svc.delete_exports_of_run(studio, run_id)
    folder = run_dir(studio, run_id)
    if folder.is_symlink():
        folder.unlink()  # never follow a link out of the data directory
    elif folder.exists():
        shutil.rmtree(folder)
    log_path(studio, run_id).unlink(missing_ok=True)
    (studio.dirs.cache / f"run-{run_id}-adapter.zip").unlink(missing_ok=True)
    studio.store.delete("runs", run_id)


def adapter_dir(studio: Studio, run_id: str) -> Path:
    return run_dir(studio, run_id) / "adapter"


def run_info(studio: Studio, row: dict[str, Any]) -> dict[str, Any]:
    """A run row plus what the UI shows next to it: queue place, adapter presence, last step and loss."""
    last = last_metric(run_dir(studio, row["id"]) / "metrics.jsonl")
    loss = last.get("loss") if last else None
    return {
        **row,
        "config": json.loads(row["config_json"]),
        "queue_position": studio.jobs.queue_position("runs", row["id"]),
        "has_adapter": adapter_dir(studio, row["id"]).is_dir(),
        "last_step": last.get("step") if last else None,
        "last_loss": float(loss) if isinstance(loss, (int, float)) else None,
    }
