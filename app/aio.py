"""Small asyncio helpers the rest of app/ shares."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` passed (a negative timeout counts as zero);
    whether it is set. A timeout is the expected outcome, not an error: the caller loops."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(timeout_s, 0.0)):
            await event.wait()
    return event.is_set()


class Backoff:
    """The extra wait of a loop while what it needs fails: 0, then `initial_s` doubling to
    `max_s`; back to 0 once it works again."""

    def __init__(self, *, initial_s: float, max_s: float) -> None:
        self._initial_s = initial_s
        self._max_s = max_s
        self.delay_s = 0.0

    def grow(self) -> None:
        self.delay_s = min(max(self.delay_s * 2, self._initial_s), self._max_s)

    def reset(self) -> None:
        self.delay_s = 0.0


class Batcher(Generic[In, Out]):
    """Many callers' requests, served in batches by one task: a request waits only while the
    batch before it is in flight (nothing waits for company), and the requests that arrive
    meanwhile form the next batch (at most `max_batch`). A lone request is served as fast as
    alone; under load the batches grow by themselves.

    `run()` is the batch task (in its owner's TaskGroup). Without it (not started, or
    stopped) a request is served alone by its caller. A caller cancelled before its batch began
    withdraws its request; one cancelled while its batch is in flight does not (the batch goes
    on; the outcome is dropped)."""

    def __init__(self, *, max_batch: int) -> None:
        self._max_batch = max_batch
        self._waiting: list[tuple[In, asyncio.Future[Out]]] = []
        self._wake = asyncio.Event()
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    @property
    def queued(self) -> int:
        """Requests handed over whose batch has not begun."""
        return len(self._waiting)

    async def submit(self, request: In) -> Out:
        if not self._running:
            return await self._serve_alone(request)
        outcome: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, outcome))
        self._wake.set()
        try:
            return await outcome
        except _NotTaken:
            return await self._serve_alone(request)

    async def run(self) -> None:
        self._running = True
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._waiting:
                    taken = self._waiting[: self._max_batch]
                    del self._waiting[: self._max_batch]
                    batch = [(request, f) for request, f in taken if not f.done()]
                    if batch:
                        await self._serve(batch)
        finally:
            self._running = False
            # Handed over but not begun: their callers serve them alone.
            left, self._waiting = self._waiting, []
            for _request, outcome in left:
                _settle(outcome, _NotTaken())

    async def _serve(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            outcomes = await self._serve_batch([request for request, _ in batch])
        except asyncio.CancelledError:
            # Only when the owner stops, after its callers ended: nobody should be waiting.
            for _request, outcome in batch:
                _settle(outcome, RuntimeError("stopped while the request was being served"))
            raise
        except Exception as exc:
            for _request, outcome in batch:
                _settle(outcome, exc)
            return
        for (_request, outcome), result in zip(batch, outcomes, strict=True):
            _settle(outcome, result)

    async def _serve_batch(self, requests: list[In]) -> Sequence[Out | Exception]:
        """Serve a batch: per request in order, its outcome or the exception its caller gets.
        An exception raised here goes to every caller of the batch."""
        raise NotImplementedError

    async def _serve_alone(self, request: In) -> Out:
        """Serve one request without the batch task (raising its exception)."""
        raise NotImplementedError


class _NotTaken(Exception):
    """The batch task stopped before the request's batch began: its caller serves it alone."""


def _settle(outcome: asyncio.Future[Out], result: Out | BaseException) -> None:
    # A caller cancelled while its batch was in flight no longer waits: nothing to tell.
    if outcome.done():
        return
    if isinstance(result, BaseException):
        outcome.set_exception(result)
    else:
        outcome.set_result(result)
