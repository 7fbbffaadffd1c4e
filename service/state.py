"""Everything one running app holds, built in its lifespan and reached through `request.app.state.pha`.

Nothing lives in module globals: two apps in one process (tests do this) share no model, cache or metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from pha_core import runtime
from pha_core.inference import Engine

from .adaptation import RegistrySync, follow_registry
from .batcher import MicroBatcher, ModelRunner
from .cache import AdapterCache, RedisTier
from .catalog import TaskCatalog, trained_entries
from .changes import TaskChanges
from .jobs import JobQueue
from .limits import ConcurrencyLimiter, RequestLimits
from .loader import LoadedModel
from .pipeline import Pipeline, RoutePolicy
from .predictor import Predictor
from .redis_client import connect
from .registry import RegistryStore, open_registry
from .routing import PrototypeIndex, search_thread
from .schemas import PredictRequest
from .settings import Settings
from .telemetry import Metrics

log = logging.getLogger("pha.state")
WARMUP_TEXT = "sentence: a warm-up request, answered once at start-up"


@dataclass
class AppState:
    settings: Settings
    loaded: LoadedModel
    metrics: Metrics
    index: PrototypeIndex
    catalog: TaskCatalog
    cache: AdapterCache
    runner: ModelRunner
    batcher: MicroBatcher
    pipeline: Pipeline
    predictor: Predictor
    limiter: ConcurrencyLimiter
    registry: RegistryStore
    sync: RegistrySync
    jobs: JobQueue | None
    changes: TaskChanges
    warmup_seconds: float | None = None
    runtime: dict[str, object] | None = None  # torch threads etc. as the model thread sees them
    ready: bool = False
    follower: asyncio.Task | None = None

    async def start_registry(self) -> None:
        """Catch up with the registry (a restarted replica serves every adapted task), then follow it."""
        await asyncio.to_thread(self.sync.apply)
        self.follower = asyncio.create_task(
            follow_registry(self.sync, self.settings.redis_url, self.settings.registry_poll_seconds)
        )

    @property
    def engine(self) -> Engine:
        return self.loaded.engine


def build_state(settings: Settings, loaded: LoadedModel, metrics: Metrics, runner: ModelRunner) -> AppState:
    """Wire the parts (must run inside the event loop: the batcher and cache bind to it); `runner` is the model
    thread, the one that loaded the model."""
    engine = loaded.engine
    index = PrototypeIndex(
        engine.config.proto_dim, nprobe=settings.faiss_nprobe, ivf_threads=settings.faiss_ivf_threads
    )
    spreads = loaded.calibration.spreads if loaded.calibration is not None else None
    prior = loaded.label_prior
    entries = trained_entries(
        engine.tasks,
        engine.trained_prototypes(),
        loaded.created,
        loaded.examples,
        spreads,
        prior.offsets if prior is not None else None,
        prior.temperatures if prior is not None else None,
    )
    catalog = TaskCatalog(index, entries)
    redis_tier = None
    if settings.redis_url:
        redis_tier = RedisTier(
            settings.redis_url,
            timeout=settings.redis_timeout_seconds,
            ttl=settings.redis_ttl_seconds,
            backoff=settings.redis_backoff_seconds,
            metrics=metrics,
        )
    cache = AdapterCache(
        model_version=engine.model_version,
        n_layers=engine.model.n_decoder_layers,
        l1_size=settings.l1_cache_size,
        l1_bytes=settings.l1_cache_bytes,
        redis=redis_tier,
        metrics=metrics,
    )
    catalog.subscribe(cache.on_catalog_change)
    # Read when scraped, not set on every change: a replica catching up applies a million changes.
    metrics.tasks.set_function(lambda: len(catalog))
    metrics.catalog_version.set_function(lambda: catalog.version)
    metrics.watch_model_thread(lambda: runner.busy_seconds)
    policy = RoutePolicy(
        settings.min_route_score,
        settings.low_score_action,
        settings.min_route_typicality,
        settings.no_fit_action,
        loaded.calibration,
        loaded.content if settings.content_check else None,
    )
    pipeline = Pipeline(
        engine=engine,
        catalog=catalog,
        index=index,
        search_thread=search_thread(settings.faiss_threads),
        cache=cache,
        runner=runner,
        metrics=metrics,
        policy=policy,
        both_orders=settings.both_orders,
    )
    batcher = MicroBatcher(pipeline, max_batch=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000)
    limits = RequestLimits.from_settings(settings, engine.config.max_source_length, engine.config.max_target_length)
    predictor = Predictor(
        engine=engine,
        catalog=catalog,
        batcher=batcher,
        limits=limits,
        policy=policy,
        metrics=metrics,
    )
    limiter = ConcurrencyLimiter(settings.max_concurrent_requests, settings.retry_after_seconds, metrics)
    client = connect(settings.redis_url, timeout=2.0) if settings.redis_url else None
    registry = open_registry(settings, client)
    sync = RegistrySync(registry, catalog, engine.model_version, engine.model.n_decoder_layers, metrics)
    jobs = None
    if client is not None:
        jobs = JobQueue(
            client,
            settings.job_stream,
            settings.job_group,
            consumer="api",
            idle_ms=settings.job_idle_ms,
            max_attempts=settings.job_max_attempts,
        )
    changes = TaskChanges(
        settings=settings, engine=engine, catalog=catalog, registry=registry, sync=sync, jobs=jobs, limits=limits
    )
    return AppState(
        changes=changes,
        registry=registry,
        sync=sync,
        jobs=jobs,
        settings=settings,
        loaded=loaded,
        metrics=metrics,
        index=index,
        catalog=catalog,
        cache=cache,
        runner=runner,
        batcher=batcher,
        pipeline=pipeline,
        predictor=predictor,
        limiter=limiter,
    )


async def warm_up(state: AppState) -> None:
    """Generate (or fetch) every trained task's adapters, then answer one real request end to end.

    The first user request then pays for neither adapter generation nor torch's first-call overheads.
    """
    start = time.perf_counter()
    # The model's own tasks only: adapted ones (up to a million, caught up before this) get theirs on first use;
    # generating them all here made a replica's start O(tasks) at ~1 ms a task.
    trained = [e for e in map(state.catalog.get, state.engine.tasks) if e is not None]
    for entry in trained:
        await state.cache.get_or_create(entry, state.pipeline.generate_adapters)
    # Pinned, so that a strict PHA_MIN_ROUTE_SCORE cannot refuse it; the router gets its own first call.
    first = trained[0] if trained else state.catalog.entries()[0]
    await state.pipeline.route(first.routing_key.reshape(1, -1))
    response = await state.predictor.predict(PredictRequest(inputs=WARMUP_TEXT, task=first.name, max_new_tokens=2))
    state.warmup_seconds = time.perf_counter() - start
    log.info(
        "warm-up done",
        extra={
            "seconds": round(state.warmup_seconds, 3),
            "redis": state.cache.redis_state,
            "output": response.predictions[0].output,
        },
    )


async def describe_runtime(state: AppState) -> None:
    """Torch's settings as seen from the model thread (OpenMP thread counts are per thread)."""
    info = await state.runner(runtime.describe)
    state.runtime = {**info, "device": str(state.engine.model.device), "precision": state.engine.precision}


async def close_state(state: AppState) -> None:
    state.ready = False
    if state.follower is not None:
        state.follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state.follower
    if state.jobs is not None:
        state.jobs.r.close()
    await state.batcher.stop()
    state.registry.close()
    state.runner.shutdown()
    state.pipeline.search_thread.shutdown(wait=True)
    await state.cache.close()
