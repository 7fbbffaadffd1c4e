"""Probes and metrics: /livez (process up), /readyz (able to serve), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..deps import MetricsDep
from ..schemas import Liveness, Readiness
from ..state import AppState

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=Liveness)
async def livez() -> Liveness:
    """The process answers. Touches nothing else (not the model, not Redis): a dead Redis must not restart pods."""
    return Liveness()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    """200 while the server can answer /predict: model loaded and warmed up, routing index non-empty. Redis is
    `ok`, `disabled` (no PHA_REDIS_URL), or `degraded` (unreachable: answers continue, adapters are regenerated)."""
    state: AppState | None = getattr(request.app.state, "pha", None)
    if state is None:
        body = Readiness(
            status="not_ready",
            model=None,
            model_source=None,
            tasks=0,
            can_route=False,
            redis="disabled",
            queued=0,
            in_flight=0,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    redis = await state.cache.redis.ping() if state.cache.redis is not None else "disabled"
    ready = state.ready and len(state.index) > 0
    body = Readiness(
        status="ready" if ready else "not_ready",
        model=state.engine.model_version,
        model_source=state.loaded.source,
        tasks=len(state.index),
        can_route=state.engine.can_route,
        redis=redis,
        redis_error=state.cache.redis.last_error if state.cache.redis is not None else None,
        queued=state.batcher.queued,
        in_flight=state.limiter.active,
        warmup_seconds=state.warmup_seconds,
        runtime=state.runtime or {},
        registry_version=state.sync.version,
        registry_error=state.sync.error,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
async def metrics(m: MetricsDep) -> Response:
    """Prometheus text format, from this app's own registry."""
    return Response(m.render(), media_type=m.content_type)
