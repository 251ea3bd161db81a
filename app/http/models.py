"""The shapes of the HTTP API (docs/api.md) as pydantic models. Request models validate every
request and generate the OpenAPI document; response and event models only describe (the
responses are built by the domain objects' `to_json`), and the tests check real responses
against them, so the document cannot drift from the server."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

from app.http.auth import MAX_TOKEN_CHARS
from app.state.client_tools import (
    CLIENT_TOOL_NAME_PATTERN,
    MAX_CLIENT_TOOLS,
    MAX_CLIENT_TOOLS_CHARS,
    MAX_INPUT_SCHEMA_CHARS,
    MAX_RESULT_CHARS,
    MAX_TOOL_DESCRIPTION_CHARS,
)
from app.state.mcp_servers import MAX_SERVERS_PER_CHAT
from app.state.model import MAX_PARTS, MAX_TEXT_CHARS, MAX_TITLE_CHARS, NON_BLANK_PATTERN

MAX_INT4 = 2**31 - 1
MAX_LIST_LIMIT = 200
MAX_MESSAGES_LIMIT = 1000

ChatStatus = Literal["waiting", "pending", "running", "requires_action", "error"]
Provider = Literal["anthropic", "openai", "builtin"]


class Strict(BaseModel):
    """Unknown fields are rejected; `model_*` field names are ours, not pydantic's."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Requests.


class TextPart(Strict):
    type: Literal["text"]
    text: Annotated[StrictStr, Field(max_length=MAX_TEXT_CHARS)]


UserContent = (
    Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS, pattern=NON_BLANK_PATTERN)]
    | Annotated[
        list[TextPart],
        Field(
            min_length=1,
            max_length=MAX_PARTS,
            description=f"At least one part with a character that is not blank; at most"
            f" {MAX_TEXT_CHARS} characters over all parts.",
            # What the server checks (app.state.model.normalize_user_content), said in JSON Schema.
            json_schema_extra={
                "contains": {
                    "type": "object",
                    "properties": {"text": {"type": "string", "pattern": NON_BLANK_PATTERN}},
                    "required": ["text"],
                }
            },
        ),
    ]
)
Title = Annotated[StrictStr, Field(max_length=MAX_TITLE_CHARS)]


class InputSchema(BaseModel):
    """A JSON Schema object of type `object` (what every provider needs of a tool's input);
    the rest of the schema is the client's business."""

    model_config = ConfigDict(
        extra="allow",
        frozen=True,
        json_schema_extra={"description": f"At most {MAX_INPUT_SCHEMA_CHARS} characters of JSON."},
    )

    type: Literal["object"]
    properties: dict[str, dict[str, Any]] = Field(default_factory=dict)
    required: list[StrictStr] = Field(default_factory=list)


class ClientToolDefinition(Strict):
    """A tool the chat's client executes (docs/requires_action.md)."""

    name: Annotated[StrictStr, Field(pattern=CLIENT_TOOL_NAME_PATTERN)]
    description: Annotated[StrictStr, Field(max_length=MAX_TOOL_DESCRIPTION_CHARS)] = ""
    input_schema: InputSchema


ClientTools = Annotated[
    list[ClientToolDefinition],
    Field(
        max_length=MAX_CLIENT_TOOLS,
        description="Tools the client executes: calling one puts the chat in requires_action."
        " Names are unique in the list and may not be those of server-side tools (400);"
        f" at most {MAX_CLIENT_TOOLS_CHARS} characters of JSON in all.",
        json_schema_extra={"x-unique-by": "name"},
    ),
]


class CreateChatRequest(Strict):
    content: UserContent = Field(description="The first user message: text, or text parts.")
    model_config_id: uuid.UUID | None = None
    title: Title | None = None
    client_type: Literal["ui", "api"] = "api"
    tools: ClientTools | None = None
    mcp_server_ids: list[uuid.UUID] | None = Field(
        None,
        max_length=MAX_SERVERS_PER_CHAT,
        description="The MCP servers whose tools the chat's runs use; null (the default): every"
        " enabled server at the time of each turn. Each id must name a server (400).",
    )


class UpdateChatRequest(Strict):
    title: Title | None = None
    archived: StrictBool | None = None


class SendMessageRequest(Strict):
    content: UserContent
    tools: ClientTools | None = Field(
        None, description="Replaces the chat's client tools (at once); absent: unchanged."
    )


class ToolResult(Strict):
    tool_call_id: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    result: Any = Field(
        description=f"Any JSON value (at most {MAX_RESULT_CHARS} characters of JSON): what the"
        " model reads as the tool's output."
    )
    is_error: StrictBool = False


class ToolResultsRequest(Strict):
    results: Annotated[
        list[ToolResult],
        Field(
            min_length=1,
            max_length=MAX_CLIENT_TOOLS * 4,
            description="One result for every pending tool call, each call once.",
            json_schema_extra={"x-unique-by": "tool_call_id"},
        ),
    ]


class EditMessageRequest(Strict):
    content: UserContent


ModelName = Annotated[StrictStr, Field(min_length=1, max_length=200)]
DisplayName = Annotated[StrictStr, Field(max_length=200)]
ContextLimit = Annotated[StrictInt, Field(ge=1, le=MAX_INT4)]
CompressionThreshold = Annotated[StrictInt, Field(ge=1, le=100)]


class CreateModelConfigRequest(Strict):
    provider: Provider
    model: ModelName
    display_name: DisplayName = ""
    context_limit: ContextLimit = 200_000
    compression_threshold: CompressionThreshold = Field(
        70, description="Percent of context_limit at which older messages are summarized."
    )
    is_default: StrictBool = False
    enabled: StrictBool = True
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Provider options: prices (*_micros_per_mtok), token_delay_ms (echo),"
        " startup_timeout_s, silence_timeout_s, ...",
    )


class UpdateModelConfigRequest(Strict):
    provider: Provider | None = None
    model: ModelName | None = None
    display_name: DisplayName | None = None
    context_limit: ContextLimit | None = None
    compression_threshold: CompressionThreshold | None = None
    is_default: StrictBool | None = None
    enabled: StrictBool | None = None
    options: dict[str, Any] | None = None


# --- MCP servers (admins; docs/tools.md) ------------------------------------------------------

MCP_SERVER_NAME_PATTERN = r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$"
McpServerName = Annotated[
    StrictStr,
    Field(
        min_length=1,
        max_length=24,
        pattern=MCP_SERVER_NAME_PATTERN,
        description="A lowercase identifier without a double underscore: its tools are named"
        " `<name>__<tool>`.",
    ),
]
EnvName = Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
EnvValue = Annotated[StrictStr, Field(max_length=32_768)]
HeaderName = Annotated[str, Field(max_length=200, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")]
HeaderValue = Annotated[StrictStr, Field(max_length=8000, pattern=r"^[^\r\n]*$")]
McpToolName = Annotated[StrictStr, Field(min_length=1, max_length=128)]
McpUrl = Annotated[StrictStr, Field(max_length=2048, pattern=r"^https?://[^\s/?#@]+(/[^\s]*)?$")]
CallTimeout = Annotated[float, Field(strict=True, gt=0, le=3600)]
SECRET_NOTE = (
    " Values are secrets: shown as `[redacted]`; sending `[redacted]` back keeps the stored one."
)


class StdioTransportIn(Strict):
    type: Literal["stdio"]
    command: Annotated[StrictStr, Field(min_length=1, max_length=4096, pattern=NON_BLANK_PATTERN)]
    args: list[Annotated[StrictStr, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=64
    )
    env: dict[EnvName, EnvValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Added to a minimal environment (PATH, HOME, ...): the replica's own"
        " environment is not passed on." + SECRET_NOTE,
    )


class HttpTransportIn(Strict):
    type: Literal["http"]
    url: McpUrl = Field(description="The streamable HTTP endpoint, e.g. https://host/mcp.")
    headers: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, max_length=64, description="Sent with every request." + SECRET_NOTE
    )


McpTransportIn = Annotated[StdioTransportIn | HttpTransportIn, Field(discriminator="type")]


class CreateMcpServerRequest(Strict):
    name: McpServerName
    transport: McpTransportIn
    enabled: StrictBool = True
    allow_tools: list[McpToolName] | None = Field(
        None, max_length=256, description="Only these tools (null: every tool of the server)."
    )
    deny_tools: list[McpToolName] = Field(
        default_factory=list, max_length=256, description="Never these tools (wins over allow)."
    )
    call_timeout_s: CallTimeout | None = Field(
        None, description="The bound of one call; null: the replica's CHATD_MCP_CALL_TIMEOUT_S."
    )


class UpdateMcpServerRequest(Strict):
    """Absent fields stay as they are; `allow_tools` and `call_timeout_s` may be set to null."""

    name: McpServerName | None = None
    transport: McpTransportIn | None = None
    enabled: StrictBool | None = None
    allow_tools: list[McpToolName] | None = Field(None, max_length=256)
    deny_tools: list[McpToolName] | None = Field(None, max_length=256)
    call_timeout_s: CallTimeout | None = None


def _digits_only(value: object) -> object:
    """A query integer is written in decimal digits: pydantic alone would also take "10.0",
    "+1", " 1" and "1_0", which the document's `integer` does not describe."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("expected an integer written in digits (10, not 10.0)")
    return value


# After the Field in Annotated[...]: placed before it, pydantic would document the bounds as
# "ge"/"le" instead of "minimum"/"maximum".
DIGITS_ONLY = BeforeValidator(_digits_only)
# The `next` of a chat page: the last chat's created_at in microseconds since the Unix epoch and
# its id. Every string of this shape is a valid cursor (app/http/routes.py, decode_page_cursor).
PAGE_CURSOR_PATTERN = r"^[0-9]{1,17}:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


class ListChatsQuery(Strict):
    status: ChatStatus | None = None
    archived: bool | None = None
    limit: Annotated[int, Field(ge=1, le=MAX_LIST_LIMIT), DIGITS_ONLY] = 50
    before: Annotated[str, Field(pattern=PAGE_CURSOR_PATTERN)] | None = Field(
        None, description="The `next` cursor of the previous page."
    )


class ListMessagesQuery(Strict):
    after_id: Annotated[int, Field(ge=0, le=2**63 - 1), DIGITS_ONLY] = 0
    limit: Annotated[int, Field(ge=1, le=MAX_MESSAGES_LIMIT), DIGITS_ONLY] = 100


class StreamQuery(Strict):
    after: Annotated[str, Field(max_length=41, pattern=r"^\d{1,19}:\d{1,19}$")] | None = Field(
        None,
        description="Resume after this cursor (`<last message id>:<last part id>`); the"
        " Last-Event-ID header wins when both are given.",
    )


# --------------------------------------------------------------------------------------------
# Responses (descriptive).


class Described(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class Validation(Described):
    field: str
    detail: str


class ErrorBody(Described):
    message: str
    detail: str | None = None
    validations: list[Validation] | None = None


class LimitBody(Described):
    """429 of a per-user limit (docs/operations.md, "Per-user limits")."""

    message: str
    detail: str
    limit: str = Field(
        description="The limit reached, named after its CHATD_MAX_<LIMIT> setting:"
        " chats_per_user, pending_chats_per_user, ..."
    )
    maximum: int


class SpendLimitBody(Described):
    message: str
    spent_micros: int
    limit_micros: int
    resets_at: str


class PendingToolCall(Described):
    id: str
    name: str
    args: dict[str, Any]


class ChatOut(Described):
    id: uuid.UUID
    owner_id: uuid.UUID
    parent_chat_id: uuid.UUID | None
    title: str
    status: ChatStatus
    version: int
    model_config_id: uuid.UUID | None
    client_type: Literal["ui", "api"]
    last_error: dict[str, Any] | None
    archived: bool
    created_at: datetime
    updated_at: datetime
    pending_tool_calls: list[PendingToolCall] | None = Field(
        description="While requires_action: the client tool calls waiting for results."
    )
    action_deadline_at: datetime | None = Field(
        description="While requires_action: when the pending calls time out."
    )


class Usage(Described):
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int


class MessageOut(Described):
    id: int
    chat_id: uuid.UUID
    role: Literal["system", "user", "assistant", "tool"]
    content: list[dict[str, Any]] = Field(
        description='Parts: {"type":"text","text"}, {"type":"reasoning","text"},'
        ' {"type":"tool_call","id","name","args"},'
        ' {"type":"tool_result","tool_call_id","name","result","is_error"};'
        " a compaction record (role system):"
        ' {"type":"compaction","summary","compressed_message_ids":[first,last],'
        '"compressed_count"}.'
    )
    created_at: datetime
    usage: Usage | None = None
    cost_micros: int | None = None


class QueuedOut(Described):
    id: int
    chat_id: uuid.UUID
    content: list[dict[str, Any]]
    promoted: bool
    created_at: datetime


class ChatList(Described):
    chats: list[ChatOut]
    next: str | None = Field(description="Pass as `before` for the next page; null at the end.")


class MessageList(Described):
    messages: list[MessageOut]
    queued: list[QueuedOut]
    next: int | None = Field(
        None, description="Pass as `after_id` for the next page; null when this page was short."
    )


class MessageEnvelope(Described):
    message: MessageOut


class QueuedEnvelope(Described):
    queued: QueuedOut


class ToolResultsAnswer(Described):
    chat: ChatOut
    message: MessageOut = Field(description="The tool message holding the results.")


class ModelConfigOut(Described):
    id: uuid.UUID
    provider: Provider
    model: str
    display_name: str
    context_limit: int
    compression_threshold: int
    is_default: bool
    enabled: bool
    options: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class ModelConfigList(Described):
    model_configs: list[ModelConfigOut]


class StdioTransportOut(Described):
    type: Literal["stdio"]
    command: str
    args: list[str]
    env: dict[str, str] = Field(description="Every value is `[redacted]`.")


class HttpTransportOut(Described):
    type: Literal["http"]
    url: str
    headers: dict[str, str] = Field(description="Every value is `[redacted]`.")


class McpServerOut(Described):
    id: uuid.UUID
    name: str
    transport: Annotated[StdioTransportOut | HttpTransportOut, Field(discriminator="type")]
    enabled: bool
    allow_tools: list[str] | None
    deny_tools: list[str]
    call_timeout_s: float | None
    version: int = Field(description="Bumped by every change; replicas reconnect or re-list.")
    created_at: datetime
    updated_at: datetime


class McpServerList(Described):
    mcp_servers: list[McpServerOut]


class ReplicaOut(Described):
    id: uuid.UUID
    hostname: str
    pid: int
    address: str
    started_at: datetime
    heartbeat_age_s: float
    running_chats: int


class ReplicaList(Described):
    replicas: list[ReplicaOut]


class Health(Described):
    """Public (no token): says what is missing, never why (the details are logged)."""

    status: Literal["ok", "unavailable"]
    message: str | None = None


# --------------------------------------------------------------------------------------------
# Stream events (the `data:` of SSE frames, the WebSocket frames minus their `cursor`).


class StatusEvent(Described):
    type: Literal["status"]
    chat_id: uuid.UUID
    status: ChatStatus
    version: int


class MessageEvent(Described):
    type: Literal["message"]
    chat_id: uuid.UUID
    message: MessageOut


class MessagePartEvent(Described):
    type: Literal["message_part"]
    chat_id: uuid.UUID
    part_id: int
    role: str
    part: dict[str, Any]


class QueueEvent(Described):
    type: Literal["queue"]
    chat_id: uuid.UUID
    queued: list[QueuedOut]


class RetryEvent(Described):
    type: Literal["retry"]
    chat_id: uuid.UUID
    attempt: int | None
    delay_ms: int | None
    retrying_at: str | None
    kind: str | None
    provider: str | None
    status_code: int | None
    error: str | None


class ErrorEvent(Described):
    type: Literal["error"]
    chat_id: uuid.UUID
    message: str
    kind: str
    provider: str | None
    retryable: bool
    status_code: int | None
    detail: str | None


class ActionRequiredEvent(Described):
    type: Literal["action_required"]
    chat_id: uuid.UUID
    pending_tool_calls: list[PendingToolCall]
    action_deadline_at: datetime | None


class HistoryResetEvent(Described):
    type: Literal["history_reset"]
    chat_id: uuid.UUID
    from_message_id: int
    reason: Literal["edit", "step_discarded"]


StreamEvent = Annotated[
    StatusEvent
    | MessageEvent
    | MessagePartEvent
    | QueueEvent
    | RetryEvent
    | ErrorEvent
    | ActionRequiredEvent
    | HistoryResetEvent,
    Field(discriminator="type"),
]


class ChatStreamEvent(Described):
    """Any chat stream event (documentation wrapper of the union)."""

    event: StreamEvent


class ChatListChangeEvent(Described):
    type: Literal["created", "updated", "deleted"]
    chat_id: uuid.UUID
    version: int | None
    status: ChatStatus | None
    title: str | None
    archived: bool | None
    parent_chat_id: uuid.UUID | None


class ResyncEvent(Described):
    type: Literal["resync"]
    reason: Literal["overflow", "reconnected"]


# Browser sessions (docs/web.md).

Secret = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TOKEN_CHARS)]


class CreateSessionRequest(Strict):
    token: Secret = Field(description="An API token (`chatd token create USER`).")


class LoginCodeRequest(Strict):
    code: Secret = Field(description="The code of a one-time login URL (`/login#code=<code>`).")


class SessionUser(Strict):
    id: uuid.UUID
    name: str
    is_admin: bool


class SessionOut(Strict):
    user: SessionUser
    csrf_token: str = Field(
        description="Send it as X-CSRF-Token with every cookie-authenticated request that"
        " changes state (POST, PUT, PATCH, DELETE)."
    )
    expires_at: datetime


# --------------------------------------------------------------------------------------------
# The Vercel AI SDK (docs/api.md, "Vercel AI SDK").


class Loose(BaseModel):
    """Unknown fields are ignored: the AI SDK's clients send fields of their own (extras of the
    transport's `body`, a part's `state`, provider metadata)."""

    model_config = ConfigDict(extra="ignore", frozen=True, protected_namespaces=())


class UIMessagePartIn(Loose):
    type: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    # Read only on the text parts of the last user message, and checked there.
    text: Any = None


_UI_TEXT_PART: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"const": "text"},
        "text": {"type": "string", "maxLength": MAX_TEXT_CHARS},
    },
    "required": ["type", "text"],
}
_UI_OTHER_PART: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {
            "type": "string",
            "pattern": "^(?!(text|file)$).+$",
            "maxLength": 200,
            "description": "step-start, reasoning, data-*, source-*, tool parts: ignored",
        }
    },
    "required": ["type"],
}
# What chatd takes from `messages`, as JSON Schema can say it: the last user message must have a
# text part with a character that is not blank, and no file part (JSON Schema cannot name the
# last item of a list, so the document asks it of every user message; the server checks only
# the last one, and ignores every other message).
UI_MESSAGES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "description": "The AI SDK's UI messages. chatd owns the history: it reads only the last"
    " user message (its text parts; other parts are ignored, file parts refused).",
    "items": {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "role": {"const": "user"},
                    "parts": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": MAX_PARTS,
                        "items": {"anyOf": [_UI_TEXT_PART, _UI_OTHER_PART]},
                        "contains": {
                            "type": "object",
                            "properties": {
                                "type": {"type": "string", "pattern": "^text$"},
                                "text": {"type": "string", "pattern": NON_BLANK_PATTERN},
                            },
                            "required": ["type", "text"],
                        },
                    },
                },
                "required": ["role", "parts"],
            },
            {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "role": {"enum": ["assistant", "system"]},
                    "parts": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "type": {"type": "string", "minLength": 1, "maxLength": 200}
                            },
                            "required": ["type"],
                        },
                    },
                },
                "required": ["role", "parts"],
            },
        ]
    },
    "contains": {
        "type": "object",
        "properties": {"role": {"type": "string", "pattern": "^user$"}},
        "required": ["role"],
    },
}


class UIMessageIn(Loose):
    id: Annotated[StrictStr, Field(max_length=1000)] | None = None
    role: Literal["system", "user", "assistant"]
    parts: list[UIMessagePartIn]


class AiSdkChatRequest(Loose):
    """The body the AI SDK's `DefaultChatTransport` posts (unknown fields are ignored)."""

    id: uuid.UUID = Field(description="The chat's id, chosen by the client (a UUID).")
    messages: Annotated[
        list[UIMessageIn],
        Field(min_length=1),
        WithJsonSchema(UI_MESSAGES_SCHEMA, mode="validation"),
    ]
    trigger: Literal["submit-message", "regenerate-message"] = Field(
        description="submit-message sends the last user message; regenerate-message answers"
        " chatd's last user message again (an edit of it with its own content)."
    )
    message_id: StrictStr | None = Field(
        None, alias="messageId", description="Sent by the AI SDK; chatd does not use it."
    )
    model_config_id: uuid.UUID | None = Field(
        None, description="The model of a chat this request creates (else the default model)."
    )


class UIMessageChunk(BaseModel):
    """One `data:` line of the UI message stream (protocol v1); the stream ends with
    `data: [DONE]`. The fields besides `type` depend on it (docs/api.md, "Vercel AI SDK")."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal[
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "reasoning-start",
        "reasoning-delta",
        "reasoning-end",
        "tool-input-available",
        "tool-output-available",
        "tool-output-error",
        "data-chatd-retry",
        "finish-step",
        "finish",
        "abort",
        "error",
    ]
