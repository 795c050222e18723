"""Memory estimate for the Train form, from ``slimtune.memory.estimate_training_memory``."""

from __future__ import annotations

from fastapi import APIRouter

from slimtune.studio import library
from slimtune.studio.context import StudioDep
from slimtune.studio.schemas import Detail, MemoryEstimate, MemoryRequest
from slimtune.studio.services import models as models_svc

router = APIRouter(prefix="/api/memory", tags=["memory"])


@router.post("/estimate", response_model=MemoryEstimate,
             responses={404: {"model": Detail}, 422: {"model": Detail}, 503: {"model": Detail}})
def estimate(body: MemoryRequest, studio: StudioDep) -> MemoryEstimate:
    """Estimated GPU memory (GiB, total and by component) for training with these settings.

    For the embedded tiny model this builds it first if needed, since the estimate reads its config.
    """
    ref = models_svc.model_ref(studio, body.model_id)
    out = library.estimate_training_memory(ref, seq_len=body.max_seq_length, batch_size=body.batch_size,
                                           load_in_4bit=body.load_in_4bit, lora_r=body.lora_r)
    breakdown = {str(k): float(v) for k, v in dict(out.get("breakdown", {})).items()}
    return MemoryEstimate(total_gib=float(out["total_gib"]), breakdown=breakdown)
