"""The FastAPI app: `create_app()` (also the uvicorn factory) and `serve()` (what `pha serve` runs).

    uvicorn service.main:create_app --factory --host 127.0.0.1 --port 8000
    pha serve --host 127.0.0.1 --port 8000

Settings come from PHA_* environment variables (service/settings.py); none is required.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

from fastapi import Depends, FastAPI

from .batcher import ModelRunner
from .deps import single_query_values
from .errors import install_error_handlers
from .loader import LoadedModel, load_model
from .logging import annotate, configure_logging
from .middleware import BodyLimitMiddleware, RequestContextMiddleware, route_matcher
from .routers import adapt, health, predict, prototypes
from .schemas import ErrorBody
from .settings import Settings
from .state import build_state, close_state, describe_runtime, warm_up
from .telemetry import Metrics

log = logging.getLogger("pha.main")

DESCRIPTION = """\
One frozen language model, many tasks. Each input is encoded, matched against the task prototypes (FAISS, cosine),
and answered with decoder adapters that a hypernetwork generates from the matched prototype (cached in memory and
Redis). Send `task` to pin a task instead. `GET /prototypes` lists the tasks and how to write their inputs."""


def _version() -> str:
    try:
        return metadata.version("pha-serve")
    except metadata.PackageNotFoundError:  # running from a source tree without `pip install`
        return "0+unknown"


def create_app(
    settings: Settings | None = None, loaded: LoadedModel | None = None, runner: ModelRunner | None = None
) -> FastAPI:
    """A new app with its own model state and metrics. `loaded` skips loading (serve() preloads, on `runner`)."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The model is loaded on the thread that will run it: torch passes on another thread than the one that
        # loaded the weights were 1.4x slower here (one 40-token text through the encoder: 16-18 ms on the loading
        # thread, 23-30 ms on another; 2-core AMD EPYC, torch 2.13, docs/serving.md "Benchmark", session 17).
        model_thread = runner or ModelRunner()
        model = loaded or await model_thread(load_model, settings)
        state = build_state(settings, model, metrics, model_thread)
        state.batcher.start()
        app.state.pha = state
        try:
            await state.start_registry()
            await describe_runtime(state)
            if settings.warmup:
                await warm_up(state)
            state.ready = True
            log.info(
                "serving",
                extra={
                    "model_version": model.engine.model_version,
                    "source": model.source,
                    "redis": state.cache.redis_state,
                    "tasks": len(state.catalog),
                },
            )
            yield
        finally:
            await close_state(state)

    app = FastAPI(
        title="PHA Serve",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(single_query_values)],
    )
    app.state.metrics = metrics
    for router in (predict.router, prototypes.router, adapt.router, health.router):
        app.include_router(router)

    def on_reject(reason: str) -> None:
        metrics.rejected.labels(reason).inc()
        annotate(rejected=reason)

    install_error_handlers(app, on_reject)
    _document_error_bodies(app)
    # Added inner first: RequestContext ends up outermost, so even a 413 carries a request id and is timed.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, on_reject=on_reject)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, route_label=route_matcher(app))
    return app


def _document_error_bodies(app: FastAPI) -> None:
    """Every error answer is an `ErrorBody` (errors.py). FastAPI documents its own 422 shape (a list under
    `detail`) and nothing for the other error codes, nor the answers of BodyLimitMiddleware, which applies to every
    request with a body; the generated OpenAPI is corrected once, when built."""
    build = app.openapi
    ref = "#/components/schemas/ErrorBody"
    body_errors = {
        "400": "the body is not UTF-8, or its Content-Length is malformed",
        "413": "the body is larger than PHA_MAX_BODY_BYTES",
    }

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = build()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(error_schema.pop("$defs", {}))
        schemas["ErrorBody"] = error_schema
        for operation in (op for ops in spec["paths"].values() for op in ops.values()):
            if "requestBody" in operation:
                for code, description in body_errors.items():
                    operation["responses"].setdefault(code, {"description": description})
            for code, response in operation.get("responses", {}).items():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if code[0] in "45" and (not schema or schema.get("$ref", "").endswith("/HTTPValidationError")):
                    response["content"] = {"application/json": {"schema": {"$ref": ref}}}
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        return spec

    app.openapi = openapi


def steady_allocator(threshold: int = 1 << 20) -> None:
    """Serve allocations of >= 1 MiB from mmap, returned to the OS when freed (glibc only; elsewhere a no-op).

    Rank classification makes per-batch logits of tens of MB; glibc's default raises its mmap threshold after
    such a block is freed, so later ones come from the heap and the process grows by fragments (the load test
    saw +10-14 MiB RSS under traffic). A fixed threshold keeps RSS flat for the same work.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; fixing it also turns off the dynamic adjustment
    except (OSError, AttributeError):
        return


def serve(host: str | None = None, port: int | None = None) -> int:
    """Load the model (errors become the CLI's one-line message), then run uvicorn until stopped."""
    import uvicorn

    settings = Settings()
    configure_logging(settings.log_level)
    steady_allocator()
    runner = ModelRunner()
    loaded = runner.call(load_model, settings)
    app = create_app(settings, loaded, runner)
    uvicorn.run(
        app,
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,  # keep the JSON logging configured above
        access_log=False,  # RequestContextMiddleware writes the access lines
        timeout_graceful_shutdown=30,
    )
    return 0
