"""The Train form's memory panel: what `slimtune train` would predict, or plan for a budget, with these settings.

The settings go through the same TrainConfig validation and the same planner call (``plan_for_config``) as the
worker's, so the panel shows the numbers and the chosen settings the run will print when it starts.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException

from slimtune.studio import library
from slimtune.studio.context import Studio
from slimtune.studio.schemas import MemoryEstimate, MemoryRequest, MemoryTerm
from slimtune.studio.services import models as models_svc
from slimtune.studio.services.runs import check_config

log = logging.getLogger("slimtune.studio.memory")
GIB = 2**30
# The planner's settings that are TrainConfig fields too, i.e. what a budget can change in a run (offload_ple is
# always on and not a field). Same list as slimtune.memory.train_plan's.
SHOWN_SETTINGS = ("load_in_4bit", "gradient_checkpointing", "activation_offload", "mlp_chunk_size",
                  "loss_chunk_size", "batch_size", "grad_accum", "optimizer")
# TrainConfig needs a data file and a run folder to be valid; the estimate reads neither.
_NO_PATH = "(memory estimate)"


def estimate(studio: Studio, body: MemoryRequest) -> MemoryEstimate:
    """Prediction or plan for the form's settings.

    Raises:
        HTTPException: 404 unknown model; 422 the model's config cannot be read.
        slimtune.errors.ConfigError: settings TrainConfig refuses, e.g. an unreadable max_memory (422).
    """
    ref = models_svc.model_ref(studio, body.model_id)
    cfg = check_config(body, model_ref=ref, data_path=_NO_PATH, output=_NO_PATH)
    try:
        out = library.memory_plan(cfg)
    except library.LibraryUnavailable:
        raise
    except Exception as exc:  # deliberately broad: see below
        # The model's config cannot be read or is not Gemma 4's (a hub id while offline, a broken folder, another
        # architecture: ValueError, OSError, AttributeError...). The panel is advisory; the run itself still
        # reports the problem when it loads the model. Logged in full in case it is a bug of ours.
        log.warning("memory estimate for %s failed", ref, exc_info=True)
        raise HTTPException(status_code=422, detail=f"No memory estimate for {ref}: "
                                                    f"{type(exc).__name__}: {exc}") from exc
    return to_estimate(cfg, out["plan"], out["message"], out["longest_seq_length"])


def to_estimate(cfg: Any, plan: Any, message: str | None = None, longest: int | None = None) -> MemoryEstimate:
    """The API's view of a planner Plan for ``cfg`` (and of its "does not fit" message).

    ``planned`` is what the trainer's apply_memory_plan will change in cfg (``plan_changes``), limited to the
    settings the panel shows.
    """
    from slimtune.memory.train_plan import plan_changes, report_lines  # noqa: PLC0415 - the trainer's own view

    budget = plan.budget_bytes
    planned = {}
    if budget and message is None:
        planned = {k: v for k, v in plan_changes(cfg, plan).items() if k in SHOWN_SETTINGS}
    return MemoryEstimate(
        total_gib=round(plan.predicted_bytes / GIB, 3),
        breakdown={str(k): float(v) for k, v in plan.breakdown.items()},
        main_terms=[MemoryTerm(name=str(k), gib=float(v)) for k, v in plan.main_terms()],
        phase=str(plan.phase),
        budget_gib=round(budget / GIB, 3) if budget else None,
        fits=message is None and plan.fits,
        planned=planned,
        settings={k: plan.settings[k] for k in SHOWN_SETTINGS if k in plan.settings},
        notes=[str(n) for n in plan.notes],
        message=message,
        longest_seq_length=longest if message is not None else None,
        summary=message if message is not None else "\n".join(report_lines(cfg, plan)),
    )
