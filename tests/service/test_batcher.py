"""The micro-batcher's hand-off: the next batch is collected once a batch's last model call is queued.

The batcher is driven directly here (the handler records what it is given); the real pipeline behind it is
exercised over HTTP in test_predict.py and test_demo.py.
"""

from __future__ import annotations

import asyncio

from service.batcher import MicroBatcher, WorkItem


def item(text: str) -> WorkItem:
    return WorkItem(
        text=text, task="sst2", max_new_tokens=4, backbone_only=False, future=asyncio.get_running_loop().create_future()
    )


class Handler:
    """Records each batch's texts; holds the first batch before and after its hand-off until told to go on."""

    def __init__(self, hand_off_first: bool = True) -> None:
        self.batches: list[list[str]] = []
        self.events: list[str] = []
        self.hand_off_first = hand_off_first
        self.before_handoff = asyncio.Event()
        self.after_handoff = asyncio.Event()

    async def __call__(self, batch: list[WorkItem], handoff) -> None:
        n = len(self.batches)
        self.batches.append([i.text for i in batch])
        self.events.append(f"start {n}")
        if n == 0:
            await self.before_handoff.wait()
            if self.hand_off_first:
                handoff()
            await self.after_handoff.wait()
        for i in batch:
            i.future.set_result(None)
        self.events.append(f"end {n}")


async def until(condition, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_next_batch_starts_after_handoff_and_keeps_its_size():
    async def scenario():
        handler = Handler()
        batcher = MicroBatcher(handler, max_batch=8, max_wait_s=0.01)
        batcher.start()
        batcher.submit(item("a"))
        await until(lambda: handler.events == ["start 0"])
        later = [item(t) for t in ("b", "c", "d")]
        for i in later:  # arrive while batch 0 runs: they must form one batch, not be taken one by one
            batcher.submit(i)
        await asyncio.sleep(0.05)
        assert handler.events == ["start 0"], "a batch was collected before the running one handed off"
        handler.before_handoff.set()
        await until(lambda: "end 1" in handler.events)
        assert "end 0" not in handler.events, "batch 1 waited for batch 0 to finish, not for its hand-off"
        handler.after_handoff.set()
        await asyncio.gather(*(i.future for i in later))
        await batcher.stop()
        return handler.batches

    assert asyncio.run(scenario()) == [["a"], ["b", "c", "d"]]


def test_a_handler_that_never_hands_off_releases_the_batcher_when_done():
    async def scenario():
        handler = Handler(hand_off_first=False)
        batcher = MicroBatcher(handler, max_batch=8, max_wait_s=0.01)
        batcher.start()
        batcher.submit(item("a"))
        await until(lambda: handler.events == ["start 0"])
        second = item("b")
        batcher.submit(second)
        handler.before_handoff.set()
        await asyncio.sleep(0.05)
        assert handler.events == ["start 0"]
        handler.after_handoff.set()
        await asyncio.wait_for(second.future, 2)
        await batcher.stop()
        return handler.events

    assert asyncio.run(scenario()) == ["start 0", "end 0", "start 1", "end 1"]
