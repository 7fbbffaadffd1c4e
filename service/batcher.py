"""Micro-batching: texts of concurrent requests are gathered into one model call.

Requests put one `WorkItem` per text on an asyncio queue. When the previous batch has queued its last model call,
the batcher takes the waiting items, up to `max_batch` texts, waiting until the oldest has waited `max_wait` if
there are fewer, and hands the batch to the pipeline. Items of one batch may belong to different requests and
different tasks.

Every model call runs on ONE dedicated thread (`ModelRunner`): the event loop never blocks on torch, and model
calls never run concurrently (so CPU threads are not oversubscribed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pha_core.source import Tokens

from .errors import ServiceError

log = logging.getLogger("pha.batcher")

T = TypeVar("T")


@dataclass(frozen=True)
class ItemResult:
    output: str | None  # None: no task fits the input (abstained)
    task: str | None
    routed: bool
    score: float | None = None
    margin: float | None = None
    low_confidence: bool = False
    probabilities: dict[str, float] | None = None
    candidates: int | None = None  # tasks routed among (None when pinned)
    confidence: float | None = None  # P(route right), calibrated
    typicality: float | None = None
    fits: bool = True
    reason: str | None = None  # why no task fits


@dataclass
class WorkItem:
    """One text of a request, and the future its request awaits."""

    text: str
    task: str | None  # pinned task, or None to route
    max_new_tokens: int
    backbone_only: bool
    future: asyncio.Future[ItemResult]
    enqueued: float = field(default_factory=time.perf_counter)
    among: tuple[str | None, ...] | None = None  # route only among these task groups (templates), None: all
    tokens: Tokens | None = None  # the text tokenised when its length was checked (None: the encoder pass does it)

    @property
    def live(self) -> bool:
        """False once the request gave up (client gone) or the item was already answered."""
        return not self.future.done()


class ModelRunner:
    """Runs callables on the single model thread and awaits them from the event loop.

    `busy_seconds` is the thread's time in the calls the event loop made (loading is not counted): its rate is
    the model thread's utilisation (exported as pha_model_busy_seconds_total), 1.0 when the server does nothing
    but model work."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pha-model")
        self._busy = 0.0  # written on the model thread only

    @property
    def busy_seconds(self) -> float:
        return self._busy

    def _timed(self, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return call()
        finally:
            self._busy += time.perf_counter() - start

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue `fn` on the model thread now (not when the result is first awaited) and return its future."""
        return asyncio.get_running_loop().run_in_executor(self._executor, self._timed, functools.partial(fn, *args))

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the model thread and wait for it, outside any event loop (loading before serving)."""
        return self._executor.submit(fn, *args).result()  # not counted as busy: loading is not serving

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


Handoff = Callable[[], None]
# A batch's handler gets the batch and a `Handoff`, to call once its last model call is queued on the model thread.
BatchHandler = Callable[[list[WorkItem], Handoff], Awaitable[None]]


class MicroBatcher:
    def __init__(self, handler: BatchHandler, *, max_batch: int, max_wait_s: float) -> None:
        self._handler = handler
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._queue: asyncio.Queue[WorkItem] = asyncio.Queue()
        # One batch at a time until its model work is queued: texts that arrive while a batch runs wait and form
        # the next, full batch (two batches collected at once halved the batch size under load, measured with
        # bench/serve.py). Taken by the collecting loop; released by the batch's handler as soon as its last
        # model call is queued (the handoff), so the next batch's encode waits on the model thread behind that
        # call instead of behind the event loop writing this batch's responses (docs/serving.md, session 22).
        self._one_batch = asyncio.Lock()
        self._running: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._last_size = 1  # texts in the last batch: whether concurrent requests are to be waited for

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="pha-batcher")

    def submit(self, item: WorkItem) -> None:
        if self._loop_task is None or self._loop_task.done():
            raise ServiceError(503, "the server is shutting down; retry on another replica", reason="overload")
        self._queue.put_nowait(item)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def _run(self) -> None:
        while True:
            await self._one_batch.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._one_batch.release()
                raise
            task = asyncio.get_running_loop().create_task(self._process(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect(self) -> list[WorkItem]:
        """The live items of the next batch (items whose request was cancelled meanwhile are dropped)."""
        while True:
            live = [item for item in await self._gather() if item.live]
            if live:
                return live

    async def _gather(self) -> list[WorkItem]:
        """The oldest waiting item, then more until max_batch or until the oldest has waited max_wait.

        The wait counts from the oldest item's arrival (like Triton's max queue delay): under load the queue
        filled while the previous batch ran, the oldest item is already late, and the batch leaves at once.
        When the last batch was a single text, requests are coming one at a time and waiting would only add
        latency (every request at concurrency 1 waited the full max_wait): the batch leaves with what is
        queued now. After a larger batch the clients of that batch are about to send again, so it waits.
        """
        batch = [await self._queue.get()]
        if self._last_size <= 1:
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._last_size = len(batch)
            return batch
        deadline = batch[0].enqueued + self._max_wait_s
        while len(batch) < self._max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:  # not the builtin on Python 3.10
                break
        self._last_size = len(batch)
        return batch

    async def _process(self, batch: list[WorkItem]) -> None:
        handed_off = False

        def handoff() -> None:
            nonlocal handed_off
            if not handed_off:
                handed_off = True
                self._one_batch.release()

        try:
            await self._handler(batch, handoff)
        except Exception as exc:  # the handler failed as a whole: no item may wait forever
            log.exception("batch failed", extra={"batch_size": len(batch)})
            _fail(batch, exc)
        finally:
            handoff()  # a handler that returned early, or failed, before queuing a last model call

    async def stop(self) -> None:
        """Stop taking batches, let running ones finish, and answer queued items with 503."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._running:
            await asyncio.wait(self._running, timeout=30)
        leftover = []
        while not self._queue.empty():
            leftover.append(self._queue.get_nowait())
        _fail(leftover, ServiceError(503, "the server is shutting down; retry", reason="overload"))


def _fail(items: list[WorkItem], exc: BaseException) -> None:
    for item in items:
        if item.live:
            item.future.set_exception(exc)
