"""app.aio.wait_event: whether the event is set, a timeout being an ordinary outcome."""

from __future__ import annotations

import asyncio

from app.aio import wait_event


async def test_a_set_event_is_reported_at_once() -> None:
    event = asyncio.Event()
    event.set()
    assert await wait_event(event, 0.0) is True


async def test_a_timeout_reports_the_event_unset() -> None:
    assert await wait_event(asyncio.Event(), 0.0) is False
    assert await wait_event(asyncio.Event(), -1.0) is False  # a deadline already past


async def test_an_event_set_while_waiting_wakes_the_waiter() -> None:
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_event(event, 3600.0))
    await asyncio.sleep(0)
    event.set()
    assert await waiter is True
