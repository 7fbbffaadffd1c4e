"""Typed FastAPI dependencies: the app's state and a concurrency slot for /predict.

Every one is `async def` although none awaits: FastAPI runs a plain `def` dependency in its thread pool, a
thread hop per request for a getattr (docs/serving.md, "Benchmark").
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Request

from .errors import ServiceError
from .state import AppState
from .telemetry import Metrics


async def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "pha", None)
    if state is None or not state.ready:
        raise ServiceError(
            503, "the model is still loading; retry in a few seconds", reason="overload", headers={"Retry-After": "5"}
        )
    return state


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def predict_slot(state: Annotated[AppState, Depends(get_state)]) -> AsyncIterator[None]:
    """Holds one of PHA_MAX_CONCURRENT_REQUESTS slots for the whole request (429 when none is free)."""
    state.limiter.acquire()
    try:
        yield
    finally:
        state.limiter.release()


async def require_api_key(
    state: Annotated[AppState, Depends(get_state)],
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> None:
    """Mutations need `Authorization: Bearer <PHA_API_KEY>`; with no key configured they are refused, unless
    PHA_DEV_MODE is on. The key is compared in constant time and never logged."""
    configured = state.settings.api_key.get_secret_value()
    if not configured:
        if state.settings.dev_mode:
            return
        raise ServiceError(
            403,
            "run-time changes are disabled: set PHA_API_KEY on the server (or PHA_DEV_MODE=true for development)",
            reason="auth",
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), configured.encode()):
        raise ServiceError(
            401,
            "missing or wrong API key: send the header Authorization: Bearer <key>",
            reason="auth",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def single_query_values(request: Request) -> None:
    """Every query parameter at most once: `?offset=1&offset=5` would otherwise quietly mean the last one."""
    keys = [key for key, _ in request.query_params.multi_items()]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ServiceError(
            422, f"query parameter(s) {repeated} given more than once; give each at most once", reason="query"
        )


StateDep = Annotated[AppState, Depends(get_state)]
ApiKey = Annotated[None, Depends(require_api_key)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PredictSlot = Annotated[None, Depends(predict_slot)]
