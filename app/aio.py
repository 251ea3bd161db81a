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
