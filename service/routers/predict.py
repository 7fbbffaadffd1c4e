"""POST /predict."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import PredictSlot, StateDep
from ..schemas import PredictRequest, PredictResponse

router = APIRouter(tags=["predict"])

_ERRORS = {
    400: {"description": "the body is not UTF-8 or its Content-Length is malformed"},
    413: {"description": "body over PHA_MAX_BODY_BYTES"},
    422: {
        "description": "invalid field, too many texts or tokens, unknown task, task required, or (with "
        "PHA_LOW_SCORE_ACTION=refuse) an input below PHA_MIN_ROUTE_SCORE; `detail` says which"
    },
    429: {"description": "PHA_MAX_CONCURRENT_REQUESTS reached; retry after the Retry-After header"},
    503: {"description": "still loading or shutting down"},
}


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS)
async def predict(body: PredictRequest, state: StateDep, _slot: PredictSlot) -> PredictResponse:
    """Answer one text or a list. Without `task`, each input is routed to the nearest task prototype; every
    prediction says which task answered, its cosine `score` and the `margin` to the runner-up. With `task`,
    retrieval is skipped (`routed: false`, score and margin null)."""
    return await state.predictor.predict(body)
