"""One watcher of a chat on this replica: its bounded queue of frames and its paged catch-up.

A client that stops reading overflows its queue (`max_queued_events_per_client` live frames):
its queue is dropped and replaced by one final `error` frame of kind `resync`, carrying the
cursor of the last frame it was given, and the connection is closed; memory never grows (a
client holds at most one snapshot page plus that many live frames).

Live frames skip the queue when they can: a connection that can take bytes synchronously (an
SSE response, app/http/stream_endpoints.py) installs a `sink`, and a push that finds the queue
empty hands the frames straight to it from the hub's task. No wake-up of the connection's
writer, no queue, one socket write per batch: the CPU per delivered frame is then that of the
write itself (docs/benchmarks.md, fan-out). The sink declines when the socket's buffer is above
its limit (a slow client), and the frames queue as before: the bound, the overflow and the
stalled-write deadline of the writer are unchanged."""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Callable

from app.aio import wait_event
from app.stream.position import Position
from app.stream.protocol import Frame, StreamCursor, notice_frame

# Takes a batch of live frames synchronously (one socket write); False when it cannot now.
Sink = Callable[[list[Frame]], bool]


class StreamClient:
    """One connected watcher: a bounded queue of frames that its connection's writer drains.

    A client joins with a snapshot from its cursor, read page by page (`stream_read`): the next
    page is read only once the writer has taken every frame of the previous one, and live frames
    start after the last page. So the queue holds at most one snapshot page (not counted against
    the bound: a page is bounded by itself, and its frames are shared) plus the live frames,
    which are counted. On overflow the queue is replaced by one final `resync` frame."""

    def __init__(self, chat_id: uuid.UUID, cursor: StreamCursor, max_queued: int) -> None:
        self.chat_id = chat_id
        self.position = Position.at(cursor)
        self.delivered = cursor  # the cursor of the last frame handed to the writer
        self.overflowed = False
        self.closed = False
        self.left = False  # its connection is gone
        self.catching_up = False  # given a snapshot page; the next one is read once it drained
        self.on_drained: Callable[[], None] | None = None  # the hub's "read its next page"
        self.sink: Sink | None = None  # the connection's synchronous writer, when it has one
        self._max_queued = max_queued
        self._frames: deque[Frame] = deque()
        self._snapshot_left = 0
        self._ready = asyncio.Event()

    @property
    def queued(self) -> int:
        return len(self._frames)

    def push_snapshot(self, frames: list[Frame], *, more: bool = False) -> None:
        """Queue a snapshot page; `more` when it is not the last one."""
        if self.closed:
            return
        self.catching_up = more
        self._frames.extend(frames)
        self._snapshot_left += len(frames)
        if frames:
            self._ready.set()
            if frames[-1].final:
                self.closed = True
                self.catching_up = False

    def push(self, frames: list[Frame]) -> bool:
        """Queue live frames; False when the client overflowed (it is closed then)."""
        if self.closed:
            return not self.overflowed
        sink = self.sink
        if (
            sink is not None
            and frames
            and not self._frames
            and not frames[-1].final  # a final frame ends the connection: the writer's job
            and sink(frames)
        ):
            # Written: nothing was queued before them, so the order is the hub's.
            for frame in reversed(frames):
                if frame.cursor is not None:
                    self.delivered = frame.cursor
                    break
            return True
        for frame in frames:
            if len(self._frames) - self._snapshot_left >= self._max_queued:
                self.overflowed = True
                self.finish(
                    notice_frame(
                        self.chat_id,
                        self.delivered,
                        "resync",
                        "the client fell behind; reconnect from the cursor",
                    ),
                    drop_queued=True,
                )
                return False
            self._frames.append(frame)
            if frame.final:
                self.closed = True
                break
        self._ready.set()
        return True

    def finish(self, frame: Frame, *, drop_queued: bool = False) -> None:
        """Queue a final frame (after what is queued, or instead of it)."""
        if self.closed and not drop_queued:
            return
        if drop_queued:
            self._frames.clear()
            self._snapshot_left = 0
        self._frames.append(frame)
        self.closed = True
        self.catching_up = False
        self._ready.set()

    def abort(self) -> None:
        """The connection is gone: drop everything and wake the writer so that it stops."""
        self.closed = True
        self.catching_up = False
        self._frames.clear()
        self._snapshot_left = 0
        self._ready.set()

    def tail_cursor(self) -> StreamCursor:
        """The cursor a client will hold once everything queued is delivered."""
        for frame in reversed(self._frames):
            if frame.cursor is not None:
                return frame.cursor
        return self.delivered

    async def take(self, timeout_s: float) -> list[Frame]:
        """Everything queued, in order (one write for all of it); empty when nothing came within
        timeout_s, or at once when the client is closed and everything queued was handed out."""
        if not self._frames:
            if self.closed:
                return []
            self._ready.clear()
            await wait_event(self._ready, timeout_s)
            if not self._frames:
                return []
        frames = list(self._frames)
        self._frames.clear()
        self._snapshot_left = 0
        for frame in reversed(frames):
            if frame.cursor is not None:
                self.delivered = frame.cursor
                break
        if self.catching_up and self.on_drained is not None:
            self.on_drained()  # read the next page while these frames are being written
        return frames

    async def next(self, timeout_s: float) -> Frame | None:
        """The next frame; None when nothing came within timeout_s (time for a keepalive), or
        at once when the client is closed and everything queued was handed out."""
        if not self._frames:
            if self.closed:
                return None
            self._ready.clear()
            await wait_event(self._ready, timeout_s)
            if not self._frames:
                return None
        frame = self._frames.popleft()
        if self._snapshot_left:
            self._snapshot_left -= 1
        if frame.cursor is not None:
            self.delivered = frame.cursor
        if self.catching_up and not self._frames and self.on_drained is not None:
            self.on_drained()  # read the next page while this frame is being written
        return frame
