"""Typed FastAPI dependencies: the app's state and a concurrency slot for /predict."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from .errors import ServiceError
from .metrics import Metrics
from .state import AppState


def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "pha", None)
    if state is None or not state.ready:
        raise ServiceError(
            503, "the model is still loading; retry in a few seconds", reason="overload", headers={"Retry-After": "5"}
        )
    return state


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def predict_slot(state: Annotated[AppState, Depends(get_state)]) -> AsyncIterator[None]:
    """Holds one of PHA_MAX_CONCURRENT_REQUESTS slots for the whole request (429 when none is free)."""
    state.limiter.acquire()
    try:
        yield
    finally:
        state.limiter.release()


StateDep = Annotated[AppState, Depends(get_state)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PredictSlot = Annotated[None, Depends(predict_slot)]
