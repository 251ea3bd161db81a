"""The stream's wire vocabulary, shared by the hubs and the endpoints: cursors, payloads and
frames encoded once for every client (SSE and WebSocket), the one `error` event, notices and
the keep-alive. The cursor of an event is `<last message id>:<last part id of the step in
progress, or 0>` (docs/api.md, "Cursor and resume")."""

from __future__ import annotations

import re
import uuid
from typing import Any, NamedTuple

from app.errors import ValidationFailed
from app.text import json_dumps, json_loads

MAX_ID = 2**63 - 1


_CURSOR = re.compile(r"(\d{1,19}):(\d{1,19})")


class StreamCursor(NamedTuple):
    """`<last message id>:<last part id>`; 0 means "none". A named tuple, not a frozen
    dataclass: every frame has one, and a frozen dataclass costs several times more to make."""

    message_id: int = 0
    part_id: int = 0

    def __str__(self) -> str:
        return f"{self.message_id}:{self.part_id}"

    @classmethod
    def parse(cls, text: str, *, field: str = "after") -> StreamCursor:
        match = _CURSOR.fullmatch(text.strip())
        if match is None or int(match[1]) > MAX_ID or int(match[2]) > MAX_ID:
            raise ValidationFailed(
                "invalid stream cursor",
                validations=[{"field": field, "detail": "expected <message id>:<part id>"}],
            )
        return cls(int(match[1]), int(match[2]))


class Payload:
    """The JSON data of one event, encoded at most once however many clients receive it. A
    payload made from its encoding (`of_json`) is decoded only if someone asks for its data
    (the AI SDK translation): the SSE and WebSocket paths only ever send its bytes."""

    __slots__ = ("_bytes", "_data", "_json")

    def __init__(self, data: dict[str, Any]) -> None:
        self._data: dict[str, Any] | None = data
        self._bytes: bytes | None = None
        self._json: str | None = None

    @classmethod
    def of_json(cls, encoded: bytes) -> Payload:
        """A payload from its JSON encoding (a JSON object)."""
        payload = cls.__new__(cls)
        payload._data = None
        payload._bytes = encoded
        payload._json = None
        return payload

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = json_loads(self._bytes.decode()) if self._bytes is not None else {}
        return self._data

    def encoded(self) -> bytes:
        if self._bytes is None:
            self._bytes = json_dumps(self._data)
        return self._bytes

    def json(self) -> str:
        if self._json is None:
            self._json = self.encoded().decode()
        return self._json


class Frame:
    """One event as sent: SSE (`id:` cursor, `event:`, `data:`) or a WebSocket text frame (the
    same JSON with a `cursor` field). `final` frames end the connection after they are sent."""

    __slots__ = ("_sse", "_sse_chunk", "_ws", "cursor", "event", "final", "payload")

    def __init__(
        self, event: str, payload: Payload, cursor: StreamCursor | None, *, final: bool = False
    ) -> None:
        self.event = event
        self.payload = payload
        self.cursor = cursor
        self.final = final
        self._sse: bytes | None = None
        self._sse_chunk: bytes | None = None
        self._ws: str | None = None

    @property
    def data(self) -> dict[str, Any]:
        return self.payload.data

    def sse(self) -> bytes:
        if self._sse is None:
            body = self.payload.encoded()
            if self.cursor is None:
                self._sse = b"event: %b\ndata: %b\n\n" % (self.event.encode(), body)
            else:
                cursor = str(self.cursor).encode()
                self._sse = b"id: %b\nevent: %b\ndata: %b\n\n" % (cursor, self.event.encode(), body)
        return self._sse

    def sse_chunk(self) -> bytes:
        """The SSE bytes as one HTTP/1.1 chunk (`<size in hex>CRLF<bytes>CRLF`): what a chunked
        response writes for it, framed once for every client."""
        if self._sse_chunk is None:
            sse = self.sse()
            self._sse_chunk = b"%x\r\n%b\r\n" % (len(sse), sse)
        return self._sse_chunk

    def ws(self) -> str:
        if self._ws is None:
            body = self.payload.json()
            if self.cursor is None:
                self._ws = body
            else:
                # The payload is a JSON object: splice the cursor in without re-encoding it.
                self._ws = f'{{"cursor":"{self.cursor}",{body[1:]}'
        return self._ws


SSE_KEEPALIVE = b": keepalive\n\n"


def error_event(
    chat_id: str,
    *,
    message: str,
    kind: Any,
    retryable: bool,
    provider: Any = None,
    status_code: Any = None,
    detail: Any = None,
) -> Payload:
    """The payload of a stream's `error` event, the one shape every error event has: a chat
    that failed, a deleted chat, and the notices that tell a client to reconnect."""
    return Payload(
        {
            "type": "error",
            "chat_id": chat_id,
            "message": message,
            "kind": kind,
            "provider": provider,
            "retryable": retryable,
            "status_code": status_code,
            "detail": detail,
        }
    )


def notice_frame(chat_id: uuid.UUID, cursor: StreamCursor | None, kind: str, message: str) -> Frame:
    """A final `error` frame that tells a client to reconnect from `cursor` (kind `resync`
    after an overflow, `shutdown` when the replica stops, `unavailable` when the hub failed)."""
    return Frame(
        "error",
        error_event(
            str(chat_id),
            message=message,
            kind=kind,
            retryable=True,
            detail=f"reconnect with cursor {cursor}" if cursor is not None else None,
        ),
        cursor,
        final=True,
    )
