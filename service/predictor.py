"""One /predict request: check it against the limits and the catalogue, queue its texts, gather the answers.

Everything that can be refused is refused before any text is queued, so a bad request never costs model time
and never changes the server's state.
"""

from __future__ import annotations

import asyncio

from pha_core.inference import Engine
from pha_core.source import Tokens
from pha_core.tasks import fill_template, template_fields

from .batcher import ItemResult, MicroBatcher, WorkItem
from .catalog import TaskCatalog
from .errors import ServiceError
from .limits import RequestLimits
from .logging import annotate
from .pipeline import RoutePolicy
from .routing import Group
from .schemas import Prediction, PredictRequest, PredictResponse, RouteInfo, Truncation
from .telemetry import Metrics


class Predictor:
    def __init__(
        self,
        *,
        engine: Engine,
        catalog: TaskCatalog,
        batcher: MicroBatcher,
        limits: RequestLimits,
        policy: RoutePolicy | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.batcher = batcher
        self.limits = limits
        self.no_fit_action = "abstain" if policy is None else policy.no_fit_action  # texts fitting no template
        self.metrics = metrics

    async def predict(self, request: PredictRequest) -> PredictResponse:
        inputs = request.input_list
        self.limits.check_texts(len(inputs))
        max_new = self.limits.new_tokens(request.max_new_tokens)
        self.limits.check_backbone_only(request.backbone_only)
        if not request.backbone_only:
            self._check_task(request.task)
        texts, among = self._formatted(inputs, request.task)
        # Tokenizing a large body takes milliseconds: off the event loop, and not on the model thread's queue,
        # once (the encoder pass assembles these ids).
        cuts = [(text, 0, 0) for text in texts]
        if request.truncate:
            cuts, tokens = await asyncio.to_thread(self._cut, texts)
            texts = [text for text, _, _ in cuts]
        else:
            tokens = await asyncio.to_thread(self.engine.tokenize, texts)
            self.limits.check_token_counts([t.count for t in tokens])
        if request.task is None and not request.backbone_only:
            among = [
                self._candidates(i, text) if a is None else a
                for i, (text, a) in enumerate(zip(texts, among, strict=True))
            ]
        results = await self._run(texts, tokens, among, request.task, max_new, request.backbone_only)
        annotate(texts=len(texts), tasks=sorted({r.task or "-" for r in results}))
        predictions = [_prediction(r, lost, chars) for r, (_, lost, chars) in zip(results, cuts, strict=True)]
        return PredictResponse(predictions=predictions, model=self.engine.model_version)

    def _cut(self, texts: list[str]) -> tuple[list[tuple[str, int, int]], list[Tokens]]:
        """Each text cut to the model's window (`Engine.truncate`), and the cut texts tokenised."""
        cuts = self.engine.truncate(texts, self.limits.model_max_tokens)
        return cuts, self.engine.tokenize([text for text, _, _ in cuts])

    def _formatted(
        self, inputs: list[str | dict[str, str]], task: str | None
    ) -> tuple[list[str], list[tuple[Group, ...] | None]]:
        """Texts to encode, and for each the task groups it may be routed among (None: every task).

        A structured input is written with the template of the tasks that take exactly its fields; pinned to a
        task, its fields must be that task's.
        """
        texts, among = [], []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                texts.append(item)
                among.append(None)
                continue
            template, names = self._template_for(i, item, task)
            texts.append(fill_template(template, item))
            among.append(None if task is not None else names)
        return texts, among

    def _candidates(self, i: int, text: str) -> tuple[Group, ...] | None:
        """The task groups a plain text may be routed among: the templates it is written with. None: all of
        them; () when none (answered "no task fits", refused, or routed among all, as PHA_NO_FIT_ACTION says)."""
        among = self.catalog.tasks_fitting(text)
        if among == () and self.no_fit_action == "refuse":
            raise ServiceError(
                422,
                f"inputs[{i}] is written as no task's template, so no task fits it; the tasks take "
                f"{self.catalog.field_sets()[:20]} (write it as GET /prototypes shows a task's template, send "
                'the fields as an object, or name the task with "task")',
                reason="no_task_fits",
            )
        return None if among == () and self.no_fit_action == "flag" else among

    def _template_for(self, i: int, item: dict[str, str], task: str | None) -> tuple[str, tuple[Group, ...]]:
        given = sorted(item)
        if task is not None:
            entry = self.catalog.get(task)
            template = entry.template if entry is not None else None
            if template is None:
                raise ServiceError(
                    422, f"task {task!r} has no template, so inputs[{i}] must be a text, not fields", reason="invalid"
                )
            if sorted(template_fields(template)) != given:
                raise ServiceError(
                    422,
                    f"inputs[{i}] has fields {given}; task {task!r} takes {list(template_fields(template))}",
                    reason="invalid",
                )
            return template, (template,)
        templates = self.catalog.templates_taking(given)
        if not templates:
            raise ServiceError(
                422,
                f"inputs[{i}] has fields {given}, and no task takes exactly those; the tasks take "
                f"{self.catalog.field_sets()[:20]} (GET /prototypes), or send a text",
                reason="invalid",
            )
        # Tasks sharing fields nearly always share the template (rte, mrpc, stsb); else the first one's is used
        # and routing stays among the tasks written that way.
        return templates[0], (templates[0],)

    def _check_task(self, task: str | None) -> None:
        if task is None:
            if not self.engine.can_route:
                raise ServiceError(
                    422,
                    f"this model (variant {self.engine.config.variant!r}) cannot pick a task from the input: "
                    f'a task is required; give "task", one of {self.catalog.some_names()}',
                    reason="task",
                )
            return
        if self.catalog.get(task) is None:
            raise ServiceError(
                422,
                f"unknown task {task!r}; known tasks: {self.catalog.some_names()} "
                '(or leave "task" out to let the server route)',
                reason="task",
            )

    async def _run(
        self,
        texts: list[str],
        tokens: list[Tokens],
        among: list[tuple[Group, ...] | None],
        task: str | None,
        max_new: int,
        plain: bool,
    ) -> list[ItemResult]:
        loop = asyncio.get_running_loop()
        items = [
            WorkItem(text, task, max_new, plain, loop.create_future(), among=candidates, tokens=ids)
            for text, ids, candidates in zip(texts, tokens, among, strict=True)
        ]
        for item in items:
            if item.among == ():  # written as no task's template: no task fits, and no model time is spent
                item.future.set_result(_fits_no_template())
                if self.metrics is not None:
                    self.metrics.no_fit.labels("template").inc()
            else:
                self.batcher.submit(item)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            # On an error or a client that went away, the batcher skips the texts not yet processed.
            for item in items:
                if not item.future.cancel() and not item.future.cancelled():
                    item.future.exception()  # mark a second failure as seen (the first one is raised)


def _fits_no_template() -> ItemResult:
    reason = "the input is written as no task's template (GET /prototypes shows each task's): no task fits it"
    return ItemResult(output=None, task=None, routed=True, low_confidence=True, candidates=0, fits=False, reason=reason)


def _prediction(result: ItemResult, tokens_cut: int, characters_cut: int) -> Prediction:
    truncated = Truncation(tokens=tokens_cut, characters=characters_cut) if tokens_cut else None
    if result.task is None and result.fits:  # backbone_only: no task, no route
        return Prediction(output=result.output, task=None, routed=False, truncated=truncated)
    route = RouteInfo(
        task=result.task,
        routed=result.routed,
        cosine=result.score,
        margin=result.margin,
        candidates=result.candidates,
        low_confidence=result.low_confidence,
        confidence=result.confidence,
        typicality=result.typicality,
        fits=result.fits,
        reason=result.reason,
    )
    return Prediction(output=result.output, probabilities=result.probabilities, route=route, truncated=truncated)
