"""Memory estimate for the Train form: the planner's prediction, or its plan for a max_memory budget."""

from __future__ import annotations

from fastapi import APIRouter

from slimtune.studio.context import StudioDep
from slimtune.studio.schemas import Detail, MemoryEstimate, MemoryRequest
from slimtune.studio.services import memory as svc

router = APIRouter(prefix="/api/memory", tags=["memory"])


@router.post("/estimate", response_model=MemoryEstimate,
             responses={404: {"model": Detail}, 422: {"model": Detail}, 503: {"model": Detail}})
def estimate(body: MemoryRequest, studio: StudioDep) -> MemoryEstimate:
    """Predicted peak GPU memory for these settings and its main terms, exactly as `slimtune train` prints it.

    With ``max_memory``, the plan the trainer would choose: the settings left unset that it fills in, or (200 with
    ``fits: false``) why nothing fits and the longest max_seq_length that does. Settings the trainer refuses (an
    unreadable budget such as "8 gigs") answer 422 with its message. For the embedded tiny model this builds it
    first if needed, since the estimate reads its config.
    """
    return svc.estimate(studio, body)
