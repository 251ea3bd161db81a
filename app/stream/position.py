"""Where a watcher is in a chat's stream, and the pure step that moves it: `advance(read,
position)` turns one read of the chat into the frames that take `position` to the state of the
read. It is the whole stream protocol (docs/api.md, "Streams"), without I/O:

  - a message cursor that was soft-deleted since (an edit) -> `history_reset` from the first id
    to drop, then the messages after it;
  - messages after the cursor, in id order (a message ends the step in progress); a cursor
    beyond the chat's newest message moves back to it (nothing to replay);
  - live parts of the chat's current generation after the part cursor, only while the chat is
    `running` (an archived or stopped run's parts are void); a `retry` control part voids the
    parts before it, so a position behind it starts at the last retry;
  - a step the position was following that vanished without a message (its run failed, was
    requeued or re-acquired) -> `history_reset` for the step only (`reason: step_discarded`);
  - the status when it changed (never older than one sent), then `error` when it is `error`,
    or `action_required` with the pending client tool calls when it is `requires_action` (again
    when the calls changed, even if a read missed the statuses in between);
  - the queue when it changed.

A `Position` is the last message id delivered, the part high-water mark, whether a step is in
progress (parts were delivered since the last message), and the last status/version and queue
sent. A hub and each joining client have one."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.state.model import Message, QueuedMessage
from app.stream.protocol import Frame, Payload, StreamCursor, error_event
from app.text import json_dumps, json_loads


class LivePart:
    """A live part of the step in progress, after the read's part cursor. Read from the row's
    columns (`stream_read`), its event is built only when a position is given it, by splicing
    the part's stored JSON text into the frame (no decode, no encode)."""

    __slots__ = ("_chat_id", "_payload", "_role", "_text", "id", "is_retry")

    def __init__(self, id: int, is_retry: bool, payload: Payload) -> None:
        self.id = id
        self.is_retry = is_retry
        self._payload: Payload | None = payload
        self._chat_id = self._role = self._text = ""

    @classmethod
    def of_columns(cls, chat_id: str, id: int, role: str, text: str, is_retry: bool) -> LivePart:
        part = cls.__new__(cls)
        part.id = id
        part.is_retry = is_retry
        part._payload = None
        part._chat_id = chat_id
        part._role = role
        part._text = text
        return part

    @property
    def payload(self) -> Payload:
        if self._payload is None:
            self._payload = _part_payload(
                self._chat_id, self.id, self._role, self._text, self.is_retry
            )
        return self._payload


@dataclass(slots=True)
class ChatRead:
    """What one read (a row of `stream_read`) returned, with every payload prepared once. Not
    frozen: a frozen dataclass sets each of its fields through `object.__setattr__`, and one
    of these is made for every read of every hub."""

    chat_id: uuid.UUID
    exists: bool
    status: str = ""
    version: int = 0
    generation: int = 0
    status_payload: Payload | None = None
    error_payload: Payload | None = None
    error_key: str | None = None
    action_payload: Payload | None = None
    action_key: str | None = None
    messages: list[tuple[int, Payload]] | None = None
    parts: list[LivePart] | None = None
    queue_payload: Payload | None = None
    queue_key: str | None = None
    resets: dict[int, int] | None = None
    more_messages: bool = False  # a page: messages after these were left out (and the rest)
    newest_message_id: int | None = None  # the chat's newest visible message (0: none)
    newest_part_id: int = 0  # the newest live part of the step in progress, 0 when none
    cid: str = ""  # str(chat_id), made once per read (empty: made when needed)
    # Whether the part at the read's part cursor is still live (`parts` holds only the parts
    # after it); None: look for it in `parts`.
    part_held: bool | None = None

    @classmethod
    def from_row(cls, chat_id: uuid.UUID, row: asyncpg.Record | None, *, cid: str = "") -> ChatRead:
        if row is None or not row["found"]:
            return cls(chat_id=chat_id, exists=False)
        cid = cid or str(chat_id)
        last_error = json_loads(row["last_error"]) if row["last_error"] is not None else None
        messages = None
        if row["messages"] is not None:
            messages = [
                (
                    record["id"],
                    Payload(
                        {
                            "type": "message",
                            "chat_id": cid,
                            "message": Message.from_record(record).to_json(),
                        }
                    ),
                )
                for record in row["messages"]
            ]
        parts = part_held = None
        part_ids = row["part_ids"]
        if part_ids is not None:
            part_held = row["part_held"]
            retry_ids = row["part_retry_ids"]
            parts = [
                LivePart.of_columns(
                    cid, part_id, role, text, bool(retry_ids) and part_id in retry_ids
                )
                for part_id, role, text in zip(
                    part_ids, row["part_roles"], row["part_texts"], strict=True
                )
            ]
        queue_payload = queue_key = None
        if row["queue"] is not None:
            queued = [QueuedMessage.from_record(record).to_json() for record in row["queue"]]
            queue_payload = Payload({"type": "queue", "chat_id": cid, "queued": queued})
            queue_key = queue_payload.json()
        status = row["status"]
        action_payload = action_key = None
        if status == "requires_action" and row["pending_tool_calls"] is not None:
            action_key = row["pending_tool_calls"]
            deadline = row["action_deadline_at"]
            action_payload = Payload(
                {
                    "type": "action_required",
                    "chat_id": cid,
                    "pending_tool_calls": json_loads(action_key),
                    "action_deadline_at": deadline.isoformat() if deadline else None,
                }
            )
        return cls(
            chat_id=chat_id,
            exists=True,
            status=status,
            version=row["version"],
            generation=row["generation"],
            # status_payload: built by `advance` when a position is to be sent the status (most
            # reads only bring parts).
            error_payload=_error_payload(cid, last_error) if status == "error" else None,
            error_key=row["last_error"] if status == "error" else None,
            action_payload=action_payload,
            action_key=action_key,
            messages=messages,
            parts=parts,
            queue_payload=queue_payload,
            queue_key=queue_key,
            resets={int(k): int(v) for k, v in json_loads(row["resets"]).items()}
            if row["resets"] is not None
            else None,
            more_messages=row["more_messages"],
            newest_message_id=(row["newest_message_id"] or 0) if row["state"] else None,
            newest_part_id=row["newest_part_id"] or 0,
            cid=cid,
            part_held=part_held,
        )


# The roles' JSON strings (the `role` column's CHECK allows these; anything else is encoded).
_ROLE_JSON = {role: json_dumps(role) for role in ("assistant", "tool", "user", "system")}


def _part_payload(chat_id: str, part_id: int, role: str, text: str, is_retry: bool) -> Payload:
    """A live part's event: `retry` for a retry notice, else `message_part` with the part's
    stored JSON text spliced in as it is. PostgreSQL writes jsonb as `{"a": 1, "b": [2]}`: the
    spaces after `:` and `,` differ from the compact rest of the event, the JSON is the same
    (docs/api.md specifies the JSON, not its bytes; every client parses it). Decoding and
    encoding it again would cost more than the rest of the event."""
    if is_retry:
        part = json_loads(text)
        return Payload(
            {
                "type": "retry",
                "chat_id": chat_id,
                "attempt": part.get("attempt"),
                "delay_ms": part.get("delay_ms"),
                "retrying_at": part.get("retrying_at"),
                "kind": part.get("kind"),
                "provider": part.get("provider"),
                "status_code": part.get("status_code"),
                "error": part.get("error"),
            }
        )
    role_json = _ROLE_JSON.get(role) or json_dumps(role)
    return Payload.of_json(
        b'{"type":"message_part","chat_id":"%b","part_id":%d,"role":%b,"part":%b}'
        % (chat_id.encode(), part_id, role_json, text.encode())
    )


def _error_payload(chat_id: str, last_error: Any) -> Payload:
    error = last_error if isinstance(last_error, dict) else {}
    return error_event(
        chat_id,
        message=str(error.get("message") or "the chat failed"),
        kind=error.get("kind", "generic"),
        provider=error.get("provider"),
        retryable=bool(error.get("retryable", False)),
        status_code=error.get("status_code"),
        detail=error.get("detail"),
    )


@dataclass
class Position:
    """Where a stream stands. `part_id` is a high-water mark that never goes back; the cursor
    shows it only while a step is in progress, so `m:0` means "no live parts held"."""

    message_id: int = 0
    part_id: int = 0
    in_step: bool = False
    status: str | None = None
    version: int = 0
    generation: int | None = None
    error_key: str | None = None
    action_key: str | None = None
    queue_key: str | None = None

    @classmethod
    def at(cls, cursor: StreamCursor) -> Position:
        return cls(message_id=cursor.message_id, part_id=cursor.part_id, in_step=cursor.part_id > 0)

    @classmethod
    def of_state(cls, read: ChatRead) -> Position:
        """The position at the chat's state in `read`: where a hub starts. A hub's position
        never comes from a client's cursor (a cursor from the future would silence the others)."""
        return cls(
            message_id=read.newest_message_id or 0,
            part_id=read.newest_part_id,
            in_step=read.newest_part_id > 0,
            status=read.status,
            version=read.version,
            generation=read.generation,
            error_key=read.error_key,
            action_key=read.action_key,
            queue_key=read.queue_key,
        )

    @property
    def cursor(self) -> StreamCursor:
        return StreamCursor(self.message_id, self.part_id if self.in_step else 0)


def advance(read: ChatRead, position: Position) -> list[Frame]:  # noqa: PLR0912  one pure protocol step; its order is the point
    """The frames that take `position` to the state of `read` (and move it there)."""
    cid = read.cid or str(read.chat_id)
    if not read.exists:
        return [
            Frame(
                "error",
                error_event(cid, message="the chat was deleted", kind="deleted", retryable=False),
                position.cursor,
                final=True,
            )
        ]
    frames: list[Frame] = []
    reset_from = read.resets.get(position.message_id) if read.resets else None
    if reset_from is not None:
        position.message_id = reset_from - 1
        position.in_step = False
        frames.append(_reset_frame(cid, reset_from, "edit", position))
    if read.messages is not None:
        for message_id, payload in read.messages:
            if message_id > position.message_id:
                position.message_id = message_id
                position.in_step = False
                frames.append(Frame("message", payload, position.cursor))
        if read.more_messages:
            return frames  # one page of a longer history: the rest comes with the last page
        newest = read.newest_message_id
        if reset_from is None and newest is not None and position.message_id > newest:
            # A cursor beyond the chat's newest message (from the future, or hostile): there is
            # nothing after it to replay; the position continues from the chat's state.
            position.message_id = newest
    if read.parts is not None:
        _advance_parts(read.parts, read.part_held, position, cid, frames)
    if position.status is None or read.version > position.version:
        changed = (
            position.status != read.status
            or (read.status == "error" and position.error_key != read.error_key)
            or (read.status == "requires_action" and position.action_key != read.action_key)
        )
        position.version = read.version
        position.generation = read.generation
        if changed:
            position.status = read.status
            position.error_key = read.error_key
            position.action_key = read.action_key
            status_payload = read.status_payload or Payload(
                {"type": "status", "chat_id": cid, "status": read.status, "version": read.version}
            )
            frames.append(Frame("status", status_payload, position.cursor))
            if read.error_payload is not None:
                frames.append(Frame("error", read.error_payload, position.cursor))
            if read.action_payload is not None:
                frames.append(Frame("action_required", read.action_payload, position.cursor))
    if read.queue_payload is not None and read.queue_key != position.queue_key:
        position.queue_key = read.queue_key
        frames.append(Frame("queue", read.queue_payload, position.cursor))
    return frames


def _advance_parts(
    parts: list[LivePart], held: bool | None, position: Position, cid: str, frames: list[Frame]
) -> None:
    """The live parts' frames (see `advance`); `held`: whether the part at the position's part
    cursor is still live (None: look for it in `parts`). Plain loops, no generators: this runs
    for every read of every hub."""
    fresh = [part for part in parts if part.id > position.part_id]
    last_retry = None
    for i, part in enumerate(fresh):
        if part.is_retry:
            last_retry = i
    if last_retry is not None:
        fresh = fresh[last_retry:]  # a retry voids everything before it
    elif position.in_step:
        if held is None:
            held = False
            for part in parts:
                if part.id == position.part_id:
                    held = True
                    break
        if not held:
            # The step this position follows is gone without a message and without a retry
            # notice: its run failed, was requeued or taken over. Its parts are void.
            position.in_step = False
            frames.append(_reset_frame(cid, position.message_id + 1, "step_discarded", position))
    for part in fresh:
        position.part_id = part.id
        position.in_step = True
        frames.append(
            Frame("retry" if part.is_retry else "message_part", part.payload, position.cursor)
        )


def _reset_frame(chat_id: str, from_message_id: int, reason: str, position: Position) -> Frame:
    return Frame(
        "history_reset",
        Payload(
            {
                "type": "history_reset",
                "chat_id": chat_id,
                "from_message_id": from_message_id,
                "reason": reason,
            }
        ),
        position.cursor,
    )
