"""Small asyncio helpers the rest of app/ shares."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` passed (a negative timeout counts as zero);
    whether it is set. A timeout is the expected outcome, not an error: the caller loops."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(timeout_s, 0.0)):
            await event.wait()
    return event.is_set()
