"""One /predict request: check it against the limits and the catalogue, queue its texts, gather the answers.

Everything that can be refused is refused before any text is queued, so a bad request never costs model time
and never changes the server's state.
"""

from __future__ import annotations

import asyncio

from pha_core.inference import Engine

from .batcher import ItemResult, MicroBatcher, WorkItem
from .catalog import TaskCatalog
from .errors import ServiceError
from .limits import RequestLimits
from .logging import annotate
from .schemas import Prediction, PredictRequest, PredictResponse


class Predictor:
    def __init__(self, *, engine: Engine, catalog: TaskCatalog, batcher: MicroBatcher, limits: RequestLimits) -> None:
        self.engine = engine
        self.catalog = catalog
        self.batcher = batcher
        self.limits = limits

    async def predict(self, request: PredictRequest) -> PredictResponse:
        texts = request.texts
        self.limits.check_texts(len(texts))
        max_new = self.limits.new_tokens(request.max_new_tokens)
        self.limits.check_backbone_only(request.backbone_only)
        if not request.backbone_only:
            self._check_task(request.task)
        # Tokenizing a large body takes milliseconds: off the event loop, and not on the model thread's queue.
        counts = await asyncio.to_thread(self.engine.count_tokens, texts)
        self.limits.check_token_counts(counts)
        results = await self._run(texts, request.task, max_new, request.backbone_only)
        annotate(texts=len(texts), tasks=sorted({r.task or "-" for r in results}))
        return PredictResponse(predictions=[Prediction(**vars(r)) for r in results], model=self.engine.model_version)

    def _check_task(self, task: str | None) -> None:
        if task is None:
            if not self.engine.can_route:
                raise ServiceError(
                    422,
                    f"this model (variant {self.engine.config.variant!r}) cannot pick a task from the input: "
                    f'a task is required; give "task", one of {sorted(self.catalog.names())}',
                    reason="task",
                )
            return
        if self.catalog.get(task) is None:
            raise ServiceError(
                422,
                f"unknown task {task!r}; known tasks: {', '.join(sorted(self.catalog.names()))} "
                '(or leave "task" out to let the server route)',
                reason="task",
            )

    async def _run(self, texts: list[str], task: str | None, max_new: int, plain: bool) -> list[ItemResult]:
        loop = asyncio.get_running_loop()
        items = [WorkItem(text, task, max_new, plain, loop.create_future()) for text in texts]
        for item in items:
            self.batcher.submit(item)
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        finally:
            # On an error or a client that went away, the batcher skips the texts not yet processed.
            for item in items:
                if not item.future.cancel() and not item.future.cancelled():
                    item.future.exception()  # mark a second failure as seen (the first one is raised)
