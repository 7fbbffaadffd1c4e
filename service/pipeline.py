"""What one micro-batch goes through: encode + route, adapters per task, one answer call.

Tasks with label words answer by rank classification (pha_core.scoring: every label scored, the best one
returned with every label's probability); tasks without generate freely.
Model calls go through the `ModelRunner` (the one model thread); cache lookups and bookkeeping stay on the event
loop. Items of a batch are grouped only by what a single model call cannot mix (adapters on or off, the number of
new tokens); tasks are never a reason to split: every example carries its own adapter set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from typing import TypeVar

import numpy as np

from pha_core.calibration import RouteCalibration
from pha_core.content import ContentBank
from pha_core.inference import AdapterSet, Engine
from pha_core.source import Tokens

from .batcher import Handoff, ItemResult, ModelRunner, WorkItem
from .cache import AdapterCache
from .catalog import TaskCatalog, TaskEntry
from .errors import ServiceError
from .routing import Group, PrototypeIndex, Route
from .telemetry import Metrics

T = TypeVar("T")


@dataclass(frozen=True)
class RoutePolicy:
    """When a route is doubtful, and what then happens.

    Below `min_score` (a raw cosine): serve with `low_confidence: true` ("flag") or refuse with 422 ("refuse").
    Below `min_typicality` (calibrated; needs the model's `calibration` and the task's spread, or the task's
    `content` bank): no task fits, and `no_fit_action` says what follows: "abstain" (output null), "refuse"
    (422) or "flag" (served anyway). A task with a content bank is judged by its content typicality, others
    by the typicality of their route cosine.
    """

    min_score: float
    action: str  # "flag" | "refuse"
    min_typicality: float = 0.0
    no_fit_action: str = "abstain"  # "abstain" | "refuse" | "flag"
    calibration: RouteCalibration | None = None
    content: ContentBank | None = None


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


class Pipeline:
    def __init__(
        self,
        *,
        engine: Engine,
        catalog: TaskCatalog,
        index: PrototypeIndex,
        search_thread: ThreadPoolExecutor,
        cache: AdapterCache,
        runner: ModelRunner,
        metrics: Metrics,
        policy: RoutePolicy,
        both_orders: bool = True,
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.index = index
        self.search_thread = search_thread  # one thread runs every FAISS search (routing.search_thread)
        self.cache = cache
        self.runner = runner
        self.metrics = metrics
        self.policy = policy
        self.both_orders = both_orders  # STS-B's two sentences read in both orders (scoring.BOTH_ORDERS)

    async def __call__(self, batch: list[WorkItem], handoff: Handoff = lambda: None) -> None:
        """Answer every item of `batch`; `handoff()` once the batch's last model call is queued (batcher.py)."""
        now = time.perf_counter()
        for item in batch:
            self.metrics.phase_seconds.labels("queue").observe(now - item.enqueued)
        self.metrics.batch_size.observe(len(batch))

        def key(item: WorkItem) -> tuple[bool, int]:
            return item.backbone_only, item.max_new_tokens

        groups = [list(group) for _, group in groupby(sorted(batch, key=key), key=key)]
        for n, items in enumerate(groups, start=1):
            last = handoff if n == len(groups) else lambda: None  # earlier groups still have model calls to make
            try:
                await (self._run_plain(items, last) if items[0].backbone_only else self._run_pha(items, last))
            except Exception as exc:  # one group's failure must not stall the others
                for item in items:
                    if item.live:
                        item.future.set_exception(exc)

    # ------------------------------------------------------------------------------------------- PHA
    async def _run_pha(self, items: list[WorkItem], handoff: Handoff) -> None:
        texts = [item.text for item in items]
        to_route = [i for i, item in enumerate(items) if item.task is None]
        start = time.perf_counter()
        encoded = await self.runner(self.engine.encode, texts, True, _tokens(items))
        routes = await self.route(encoded.z[to_route], [items[i].among for i in to_route]) if to_route else []
        by_item = dict(zip(to_route, routes, strict=True))
        content = self._content_typicality(encoded.content, by_item)
        self.metrics.phase_seconds.labels("encode_route").observe(time.perf_counter() - start)

        decisions = self._decide(items, by_item, content)
        for i, (_, fields) in enumerate(decisions):
            if items[i].live and not fields.get("fits", True) and self.policy.no_fit_action == "abstain":
                # abstained: answered without the decoder
                items[i].future.set_result(ItemResult(output=None, **fields))
        live = [i for i, item in enumerate(items) if item.live]
        if not live:
            return
        adapters = await self._adapters([decisions[i][0] for i in live])
        sets = [adapters[decisions[i][0].name] for i in live]
        spaces = [decisions[i][0].answers for i in live]
        max_new = items[0].max_new_tokens
        part = encoded if len(live) == len(items) else encoded.select(live)
        read = [items[i].text for i in live] if self.both_orders else None  # the texts a second reading swaps
        answering = self.runner.submit(lambda: timed(lambda: self.engine.answer(part, sets, spaces, max_new, read)))
        handoff()  # the next batch may be collected: its encode queues behind this answer
        answers, seconds = await answering
        self.metrics.phase_seconds.labels("generate").observe(seconds)
        for i, answer in zip(live, answers, strict=True):
            fields = decisions[i][1]
            items[i].future.set_result(ItemResult(output=answer.output, probabilities=answer.probabilities, **fields))

    async def route(self, vectors: np.ndarray, among: list[tuple[Group, ...] | None] | None = None) -> list[Route]:
        """Nearest prototypes of `vectors` [B, dim] (row i only among the task groups `among[i]` when given), on
        the routing thread."""
        loop = asyncio.get_running_loop()
        if among is None or all(a is None for a in among):
            return await loop.run_in_executor(self.search_thread, self.index.search, vectors)
        return await loop.run_in_executor(self.search_thread, self._search_groups, vectors, among)

    def _search_groups(self, vectors: np.ndarray, among: list[tuple[Group, ...] | None]) -> list[Route]:
        """One search per distinct candidate set, results put back in row order."""
        routes: list[Route | None] = [None] * len(among)
        for candidates in dict.fromkeys(among):
            rows = [i for i, a in enumerate(among) if a == candidates]
            for i, route in zip(rows, self.index.search(vectors[rows], candidates), strict=True):
                routes[i] = route
        return routes  # type: ignore[return-value]

    def _content_typicality(self, vectors: np.ndarray | None, routes: dict[int, Route]) -> dict[int, float]:
        """The content check (pha_core/content.py) of the routed items whose task has a bank, from the content
        vectors the encoder pass made: a k-NN lookup in the task's bank, no model call."""
        bank = self.policy.content
        if bank is None or vectors is None:
            return {}
        checked = [i for i, route in routes.items() if route.task in bank]
        out: dict[int, float] = {}
        for task in {routes[i].task for i in checked}:
            rows = [i for i in checked if routes[i].task == task]
            for i, value in zip(rows, bank.typicality(task, vectors[rows]).tolist(), strict=True):
                out[i] = value
        return out

    def _decide(
        self, items: list[WorkItem], routes: dict[int, Route], content: dict[int, float]
    ) -> list[tuple[TaskEntry, dict]]:
        """The task entry of every item, and its result fields. Refused items get their 422 here."""
        decisions = []
        for i, item in enumerate(items):
            route = routes.get(i)
            name = item.task if route is None else route.task
            entry = self.catalog.get(name)
            if entry is None:  # removed between validation (or search) and now
                if item.live:
                    item.future.set_exception(
                        ServiceError(503, f"task {name!r} was just removed; retry", reason="task")
                    )
                entry = self.catalog.entries()[0]  # a stand-in row: generate needs one set per example
                decisions.append((entry, {}))
                continue
            decisions.append((entry, self._fields(item, entry, route, content.get(i))))
        return decisions

    def _fields(self, item: WorkItem, entry: TaskEntry, route: Route | None, content: float | None) -> dict:
        if route is None:  # pinned: retrieval skipped, so no score (documented in docs/serving.md)
            return {"task": entry.name, "routed": False}
        policy = self.policy
        self.metrics.route_score.observe(route.score)
        typicality = confidence = None
        if policy.calibration is not None:
            confidence = policy.calibration.confidence(route.margin)
        # A task with a content bank is judged by it, one without by its route cosine: on the demo the content
        # check alone kept more of the tasks' own rows at a higher OOD rejection than both together
        # (docs/results.md section 5).
        by_content = content is not None
        if by_content:
            typicality = content
        elif policy.calibration is not None and entry.spread is not None:
            typicality = policy.calibration.typicality(entry.spread, route.score)
        fits = typicality is None or typicality >= policy.min_typicality
        low = route.score < policy.min_score or not fits or (confidence is not None and confidence < 0.5)
        if low:
            self.metrics.low_confidence.inc()
        if not fits:
            self.metrics.no_fit.labels("content" if by_content else "typicality").inc()
        if item.live and route.score < policy.min_score and policy.action == "refuse":
            item.future.set_exception(_low_score_error(route, policy.min_score))
        elif item.live and not fits and policy.no_fit_action == "refuse":
            item.future.set_exception(_no_fit_error(entry.name, typicality, policy.min_typicality, by_content))
        candidates = self.index.size(item.among)
        return {
            "task": entry.name,
            "routed": True,
            "score": route.score,
            "margin": route.margin,
            "low_confidence": low,
            "candidates": candidates,
            "confidence": confidence,
            "typicality": typicality,
            "fits": fits,
            "reason": None if fits else _untypical(entry.name, typicality, policy.min_typicality, by_content),
        }

    async def _adapters(self, entries: list[TaskEntry]) -> dict[str, AdapterSet]:
        """One adapter set per distinct task: the task's own explicit adapters, else fetched concurrently from
        L1, Redis, or the hypernetwork."""
        start = time.perf_counter()
        distinct = list({entry.name: entry for entry in entries}.values())
        explicit = {e.name: e.adapters for e in distinct if e.adapters is not None}
        generated = [e for e in distinct if e.adapters is None]
        found = await asyncio.gather(*(self.cache.get_or_create(e, self.generate_adapters) for e in generated))
        self.metrics.phase_seconds.labels("adapter").observe(time.perf_counter() - start)
        return {**explicit, **{e.name: adapters for e, (adapters, _) in zip(generated, found, strict=True)}}

    async def generate_adapters(self, entry: TaskEntry) -> AdapterSet:
        return await self.runner(self.engine.adapters_for_prototype, entry.vector)

    # ------------------------------------------------------------------------------------ baseline
    async def _run_plain(self, items: list[WorkItem], handoff: Handoff) -> None:
        """The backbone without adapters (benchmark baseline): same batching, no routing, no adapters."""
        texts = [item.text for item in items]
        max_new = items[0].max_new_tokens
        tokens = _tokens(items)
        encoded, enc_s = await self.runner(lambda: timed(lambda: self.engine.encode(texts, False, tokens)))
        # Encode, then decode, handing off once the decode is queued, as _run_pha does (handed off before a single
        # call had even run, the next batch was collected at once from a near-empty queue: batches of ~4 at c=32).
        generating = self.runner.submit(lambda: timed(lambda: self.engine.generate_plain(encoded, max_new)))
        handoff()
        outputs, gen_s = await generating
        self.metrics.phase_seconds.labels("encode_route").observe(enc_s)
        self.metrics.phase_seconds.labels("generate").observe(gen_s)
        for item, output in zip(items, outputs, strict=True):
            if item.live:
                item.future.set_result(ItemResult(output=output, task=None, routed=False))


def _tokens(items: list[WorkItem]) -> list[Tokens] | None:
    """The items' texts as the predictor tokenised them; None (the encoder pass tokenises) if one was not."""
    tokens = [item.tokens for item in items]
    return None if any(t is None for t in tokens) else tokens  # type: ignore[return-value]


def _untypical(task: str, typicality: float | None, threshold: float, by_content: bool = False) -> str:
    what = "its text is less like the training texts of" if by_content else "the input is less typical of"
    return (
        f"{what} its nearest task {task!r} than {1 - (typicality or 0):.1%} of that task's held-out inputs "
        f"(typicality {typicality:.3f} < {threshold}, PHA_MIN_ROUTE_TYPICALITY): no task fits it"
    )


def _no_fit_error(task: str, typicality: float | None, threshold: float, by_content: bool = False) -> ServiceError:
    return ServiceError(
        422,
        _untypical(task, typicality, threshold, by_content) + '. Name the task with "task" if it is meant for one.',
        reason="no_task_fits",
    )


def _low_score_error(route: Route, threshold: float) -> ServiceError:
    return ServiceError(
        422,
        f"an input matched no task closely enough: its best task {route.task!r} scored {route.score:.3f}, below "
        f'the server\'s minimum route score {threshold:.3f} (PHA_MIN_ROUTE_SCORE). Name the task with "task", '
        "or write the input the way GET /prototypes shows the task's template.",
        reason="low_score",
    )
