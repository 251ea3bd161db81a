"""The stream protocol as pure functions (no database): `advance()` turns reads into the frames
that move a position forward; frames encode once for SSE and WebSocket; a client queue is
bounded and overflows into one final resync frame; cursors parse strictly."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from app.errors import ValidationFailed
from app.stream.position import ChatRead, LivePart, Position, advance
from app.stream.protocol import Frame, Payload, StreamCursor
from app.stream.subscriber import StreamClient

CHAT = uuid.UUID("00000000-0000-0000-0000-00000000c4a7")


def _read(
    *,
    messages: list[int] | None = None,
    parts: list[tuple[int, str]] | None = None,
    status: str = "running",
    version: int = 5,
    queue: list[int] | None = None,
    resets: dict[int, int] | None = None,
    error: dict[str, Any] | None = None,
    calls: list[str] | None = None,
) -> ChatRead:
    action = status == "requires_action"
    return ChatRead(
        chat_id=CHAT,
        exists=True,
        status=status,
        version=version,
        generation=1,
        status_payload=Payload({"type": "status", "status": status, "version": version}),
        error_payload=Payload({"type": "error", **(error or {})}) if status == "error" else None,
        error_key=json.dumps(error) if status == "error" else None,
        action_payload=Payload({"type": "action_required", "calls": calls}) if action else None,
        action_key=json.dumps(calls) if action else None,
        messages=None
        if messages is None
        else [(m, Payload({"type": "message", "message": {"id": m}})) for m in messages],
        parts=None
        if parts is None
        else [
            LivePart(
                id=p,
                is_retry=kind == "retry",
                payload=Payload({"type": kind, "part_id": p}),
            )
            for p, kind in parts
        ],
        queue_payload=None if queue is None else Payload({"type": "queue", "queued": queue}),
        queue_key=None if queue is None else json.dumps(queue),
        resets=resets or {},
    )


def _summary(frames: list[Frame]) -> list[tuple[str, str]]:
    return [(f.event, str(f.cursor)) for f in frames]


def test_a_fresh_position_gets_history_step_status_and_queue() -> None:
    position = Position.at(StreamCursor())
    frames = advance(
        _read(messages=[1, 2], parts=[(10, "message_part"), (11, "message_part")], queue=[]),
        position,
    )
    assert _summary(frames) == [
        ("message", "1:0"),
        ("message", "2:0"),
        ("message_part", "2:10"),
        ("message_part", "2:11"),
        ("status", "2:11"),
        ("queue", "2:11"),
    ]
    # The same read again brings nothing new.
    assert (
        advance(
            _read(messages=[1, 2], parts=[(10, "message_part"), (11, "message_part")], queue=[]),
            position,
        )
        == []
    )


def test_a_message_ends_the_step_and_the_cursor_drops_the_part_id() -> None:
    position = Position(message_id=2, part_id=11, in_step=True, status="running", version=5)
    frames = advance(_read(messages=[3], parts=[]), position)
    assert _summary(frames) == [("message", "3:0")]
    assert position.part_id == 11  # the high-water mark stays: stale parts are never re-sent
    assert advance(_read(messages=[], parts=[(11, "message_part")]), position) == []


def test_a_retry_voids_the_parts_before_it() -> None:
    position = Position.at(StreamCursor(2, 0))
    parts = [(10, "message_part"), (11, "retry"), (12, "message_part")]
    frames = advance(_read(messages=[], parts=parts), position)
    assert [f.event for f in frames] == ["retry", "message_part", "status"]


def test_a_vanished_step_is_discarded_unless_a_message_or_retry_explains_it() -> None:
    following = Position(message_id=2, part_id=11, in_step=True, status="running", version=5)
    frames = advance(_read(messages=[], parts=[(20, "message_part")], version=6), following)
    assert [f.event for f in frames] == ["history_reset", "message_part"]
    assert frames[0].data["reason"] == "step_discarded"
    assert frames[0].data["from_message_id"] == 3

    persisted = Position(message_id=2, part_id=11, in_step=True, status="running", version=5)
    frames = advance(_read(messages=[3], parts=[(20, "message_part")]), persisted)
    assert [f.event for f in frames] == ["message", "message_part"]

    retried = Position(message_id=2, part_id=11, in_step=True, status="running", version=5)
    frames = advance(_read(messages=[], parts=[(15, "retry")]), retried)
    assert [f.event for f in frames] == ["retry"]


def test_a_read_says_whether_the_part_at_its_cursor_is_still_live() -> None:
    """A database read leaves the part at its cursor out of `parts` and says whether it is
    still there (`part_held`): the step goes on, or it vanished."""
    for held, events in [(True, ["message_part"]), (False, ["history_reset", "message_part"])]:
        following = Position(message_id=2, part_id=11, in_step=True, status="running", version=5)
        read = _read(messages=[], parts=[(12, "message_part")])
        read.part_held = held
        assert [f.event for f in advance(read, following)] == events
        assert following.cursor == StreamCursor(2, 12)


def test_a_deleted_cursor_message_resets_history_first() -> None:
    position = Position(message_id=7, status="waiting", version=5)
    frames = advance(_read(messages=[9], parts=[], resets={7: 4}), position)
    assert _summary(frames) == [("history_reset", "3:0"), ("message", "9:0")]
    assert frames[0].data["from_message_id"] == 4


def test_status_is_sent_when_it_changes_never_older() -> None:
    position = Position(status="running", version=5)
    assert advance(_read(version=6), position) == []  # a heartbeat
    assert [f.event for f in advance(_read(status="waiting", version=7), position)] == ["status"]
    assert advance(_read(status="running", version=6), position) == []  # older: dropped
    error = {"kind": "auth", "message": "bad key"}
    frames = advance(_read(status="error", version=9, error=error), position)
    assert [f.event for f in frames] == ["status", "error"]


def test_action_required_follows_the_status_and_new_calls_are_sent_again() -> None:
    position = Position(status="running", version=5)
    frames = advance(
        _read(messages=[3], status="requires_action", version=6, calls=["a"]), position
    )
    assert [f.event for f in frames] == ["message", "status", "action_required"]
    assert frames[-1].data["calls"] == ["a"]
    assert advance(_read(status="requires_action", version=7, calls=["a"]), position) == []
    # The calls were answered, the turn went on and called the client again: the reads in
    # between were missed, the status is the same, the calls are new.
    frames = advance(_read(status="requires_action", version=12, calls=["b"]), position)
    assert [f.event for f in frames] == ["status", "action_required"]
    assert frames[-1].data["calls"] == ["b"]
    assert [f.event for f in advance(_read(status="pending", version=13), position)] == ["status"]


def test_queue_is_sent_when_it_changes() -> None:
    position = Position(status="running", version=5)
    assert [f.event for f in advance(_read(queue=[1]), position)] == ["queue"]
    assert advance(_read(queue=[1]), position) == []
    assert [f.event for f in advance(_read(queue=[]), position)] == ["queue"]


def test_a_missing_chat_ends_the_stream() -> None:
    frames = advance(ChatRead(chat_id=CHAT, exists=False), Position.at(StreamCursor(4, 0)))
    assert len(frames) == 1 and frames[0].final and frames[0].data["kind"] == "deleted"


def test_frames_encode_once_for_sse_and_websocket() -> None:
    payload = Payload({"type": "message_part", "chat_id": str(CHAT), "part": {"text": "a\nb"}})
    frame = Frame("message_part", payload, StreamCursor(3, 9))
    sse = frame.sse().decode()
    assert sse.startswith("id: 3:9\nevent: message_part\ndata: {")
    assert sse.endswith("}\n\n") and sse.count("\n") == 4  # the newline in the text is escaped
    assert json.loads(frame.ws()) == {"cursor": "3:9", **payload.data}
    assert frame.sse() is frame.sse()


def test_a_client_queue_is_bounded_and_overflows_into_one_resync_frame() -> None:
    client = StreamClient(CHAT, StreamCursor(1, 0), max_queued=4)
    snapshot = [Frame("message", Payload({"type": "message"}), StreamCursor(1, 0))] * 10
    client.push_snapshot(snapshot)  # the snapshot does not count against the bound
    live = [
        Frame("message_part", Payload({"type": "message_part"}), StreamCursor(1, n))
        for n in range(1, 100)
    ]
    assert client.push(live[:4])
    assert client.queued == 14
    assert not client.push(live[4:])
    assert client.queued == 1 and client.overflowed and client.closed
    assert not client.push(live)  # nothing more is queued, ever
    assert client.queued == 1


async def test_the_resync_frame_carries_the_cursor_of_the_last_frame_delivered() -> None:
    client = StreamClient(CHAT, StreamCursor(1, 0), max_queued=2)
    frames = [
        Frame("message_part", Payload({"type": "message_part"}), StreamCursor(1, n))
        for n in range(1, 6)
    ]
    assert client.push(frames[:2])
    delivered = await client.next(1.0)
    assert delivered is not None and delivered.cursor == StreamCursor(1, 1)
    assert not client.push(frames[2:])
    final = await client.next(1.0)
    assert final is not None and final.final
    assert final.cursor == StreamCursor(1, 1)
    assert final.data["kind"] == "resync"
    assert await client.next(1.0) is None


async def test_live_frames_go_to_the_sink_only_while_nothing_is_queued_before_them() -> None:
    client = StreamClient(CHAT, StreamCursor(1, 0), max_queued=8)
    frames = [
        Frame("message_part", Payload({"type": "message_part"}), StreamCursor(1, n))
        for n in range(1, 7)
    ]
    written: list[list[Frame]] = []
    accept = True

    def sink(batch: list[Frame]) -> bool:
        if accept:
            written.append(batch)
        return accept

    client.sink = sink
    assert client.push(frames[:2])  # one batch, one write, nothing queued
    assert written == [frames[:2]] and client.queued == 0
    assert client.delivered == StreamCursor(1, 2)
    accept = False  # the socket's buffer is full: the frames queue for the writer
    assert client.push(frames[2:3])
    accept = True
    assert client.push(frames[3:5])  # behind a queued frame: queued too, in order
    assert written == [frames[:2]] and client.queued == 3
    assert await client.take(1.0) == frames[2:5]  # the writer takes them all, for one write
    assert client.delivered == StreamCursor(1, 5)
    final = Frame("error", Payload({"type": "error"}), StreamCursor(1, 6), final=True)
    assert client.push([frames[5], final])  # a final frame is the writer's: it ends the stream
    assert written == [frames[:2]]
    assert await client.take(1.0) == [frames[5], final]
    assert await client.take(1.0) == []


def test_a_frame_is_framed_once_as_an_http_chunk() -> None:
    frame = Frame("status", Payload({"type": "status", "text": "é"}), StreamCursor(3, 0))
    sse = frame.sse()
    assert frame.sse_chunk() == f"{len(sse):x}\r\n".encode() + sse + b"\r\n"
    assert frame.sse_chunk() is frame.sse_chunk()


@pytest.mark.parametrize(
    "text", ["", "1", "1:", ":1", "a:b", "-1:0", "1:2:3", "1 :2", "99999999999999999999:0"]
)
def test_cursors_parse_strictly(text: str) -> None:
    with pytest.raises(ValidationFailed):
        StreamCursor.parse(text)


def test_cursors_round_trip() -> None:
    assert StreamCursor.parse(" 12:345 ") == StreamCursor(12, 345)
    assert str(StreamCursor(12, 345)) == "12:345"
