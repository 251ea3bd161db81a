"""Settings of one replica, from flags and the environment. Every duration carries its unit."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    return raw.strip().lower() not in ("0", "false", "no", "off") if raw else default


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


@dataclass
class Settings:
    # Empty means: start the embedded PostgreSQL in data_dir.
    database_url: str = ""
    # Set when DATABASE_URL goes through a transaction pooler (PgBouncer in transaction mode):
    # the LISTEN connection, the liveness lock and migrations need a session of their own and
    # connect here, directly; the pool goes through the pooler (docs/operations.md, "PgBouncer").
    direct_database_url: str = ""
    data_dir: Path = Path(".chatd")
    host: str = "127.0.0.1"
    port: int = 8080
    # Empty: INFO with DATABASE_URL (a deployment), WARNING with the embedded database (a
    # developer's `make run`: a few lines to read, not the engine's events). See `log_level_of`.
    log_level: str = ""
    # "text" (event key=value) or "json" (one object per line, for log shippers).
    log_format: str = "text"

    # Replica engine.
    max_concurrent_runs: int = 50
    acquire_poll_interval_s: float = 2.0
    # Acquire on chat_wake notifications (off: the fallback poll alone, a benchmark baseline).
    acquire_listen: bool = True
    heartbeat_interval_s: float = 10.0
    stale_threshold_s: float = 30.0
    liveness_check_interval_s: float = 0.5
    shutdown_grace_s: float = 10.0
    part_flush_interval_ms: float = 15.0
    max_steps_per_turn: int = 25
    queue_limit: int = 20
    # The poison-chat guard: runs of one chat in a row that may crash (or die with their
    # replica) without progress before the chat ends in `error` (kind "poison").
    max_failed_runs: int = 5
    # How long a chat waits in requires_action for its client's tool results before the
    # replicas answer the pending calls with an error and end the turn (docs/requires_action.md).
    requires_action_timeout_s: float = 300.0

    # Per-user limits: no user can slow down or starve another (docs/reliability.md,
    # "Fairness"). Reaching one answers 429 with a JSON body naming the limit.
    max_chats_per_user: int = 10_000  # chats that are not archived
    max_pending_chats_per_user: int = 100  # chats waiting for a replica (pending)
    max_running_chats_per_user: int = 25  # chats running at once, over all replicas
    max_streams_per_user: int = 50  # open stream connections per user, per replica
    max_children_per_chat: int = 8  # sub-agents a chat may have at once (not closed)

    # MCP servers (docs/tools.md): the bound of one tool call (a server's call_timeout_s wins),
    # of connecting (a stdio server's start included), how long a tool list is kept, and how
    # many servers one replica keeps connected.
    mcp_call_timeout_s: float = 30.0
    mcp_connect_timeout_s: float = 20.0
    mcp_tools_ttl_s: float = 300.0
    mcp_max_servers: int = 32

    # HTTP.
    max_body_bytes: int = 1_000_000
    keepalive_interval_s: float = 15.0
    max_queued_events_per_client: int = 1000
    # Browser sessions (docs/web.md): the cookie's lifetime, the one-time login code's, and the
    # public address of the service (its scheme decides the cookie's Secure flag behind a proxy
    # that terminates TLS; it is also the base of the printed login URL).
    session_ttl_s: float = 7 * 24 * 3600.0
    login_code_ttl_s: float = 300.0
    public_url: str = ""

    anthropic_api_key: str = field(default_factory=lambda: os.environ.get("ANTHROPIC_API_KEY", ""))
    openai_api_key: str = field(default_factory=lambda: os.environ.get("OPENAI_API_KEY", ""))
    anthropic_base_url: str = field(
        default_factory=lambda: os.environ.get("ANTHROPIC_BASE_URL", "")
    )
    openai_base_url: str = field(default_factory=lambda: os.environ.get("OPENAI_BASE_URL", ""))

    @classmethod
    def from_env(cls) -> Settings:
        defaults = cls()
        return cls(
            database_url=os.environ.get("DATABASE_URL", ""),
            direct_database_url=os.environ.get("CHATD_DIRECT_DATABASE_URL", ""),
            data_dir=Path(os.environ.get("CHATD_DATA_DIR", str(defaults.data_dir))),
            host=os.environ.get("CHATD_HOST", defaults.host),
            port=_env_int("CHATD_PORT", defaults.port),
            log_level=os.environ.get("CHATD_LOG_LEVEL", defaults.log_level),
            log_format=os.environ.get("CHATD_LOG_FORMAT", defaults.log_format).strip().lower(),
            max_concurrent_runs=_env_int("CHATD_MAX_CONCURRENT_RUNS", defaults.max_concurrent_runs),
            acquire_poll_interval_s=_env_float(
                "CHATD_ACQUIRE_POLL_INTERVAL_S", defaults.acquire_poll_interval_s
            ),
            acquire_listen=_env_bool("CHATD_ACQUIRE_LISTEN", defaults.acquire_listen),
            heartbeat_interval_s=_env_float(
                "CHATD_HEARTBEAT_INTERVAL_S", defaults.heartbeat_interval_s
            ),
            stale_threshold_s=_env_float("CHATD_STALE_THRESHOLD_S", defaults.stale_threshold_s),
            liveness_check_interval_s=_env_float(
                "CHATD_LIVENESS_CHECK_INTERVAL_S", defaults.liveness_check_interval_s
            ),
            shutdown_grace_s=_env_float("CHATD_SHUTDOWN_GRACE_S", defaults.shutdown_grace_s),
            part_flush_interval_ms=_env_float(
                "CHATD_PART_FLUSH_INTERVAL_MS", defaults.part_flush_interval_ms
            ),
            max_steps_per_turn=_env_int("CHATD_MAX_STEPS_PER_TURN", defaults.max_steps_per_turn),
            queue_limit=_env_int("CHATD_QUEUE_LIMIT", defaults.queue_limit),
            max_failed_runs=_env_int("CHATD_MAX_FAILED_RUNS", defaults.max_failed_runs),
            requires_action_timeout_s=_env_float(
                "CHATD_REQUIRES_ACTION_TIMEOUT_S", defaults.requires_action_timeout_s
            ),
            max_chats_per_user=_env_int("CHATD_MAX_CHATS_PER_USER", defaults.max_chats_per_user),
            max_pending_chats_per_user=_env_int(
                "CHATD_MAX_PENDING_CHATS_PER_USER", defaults.max_pending_chats_per_user
            ),
            max_running_chats_per_user=_env_int(
                "CHATD_MAX_RUNNING_CHATS_PER_USER", defaults.max_running_chats_per_user
            ),
            max_streams_per_user=_env_int(
                "CHATD_MAX_STREAMS_PER_USER", defaults.max_streams_per_user
            ),
            max_children_per_chat=_env_int(
                "CHATD_MAX_CHILDREN_PER_CHAT", defaults.max_children_per_chat
            ),
            mcp_call_timeout_s=_env_float("CHATD_MCP_CALL_TIMEOUT_S", defaults.mcp_call_timeout_s),
            mcp_connect_timeout_s=_env_float(
                "CHATD_MCP_CONNECT_TIMEOUT_S", defaults.mcp_connect_timeout_s
            ),
            mcp_tools_ttl_s=_env_float("CHATD_MCP_TOOLS_TTL_S", defaults.mcp_tools_ttl_s),
            mcp_max_servers=_env_int("CHATD_MCP_MAX_SERVERS", defaults.mcp_max_servers),
            max_body_bytes=_env_int("CHATD_MAX_BODY_BYTES", defaults.max_body_bytes),
            max_queued_events_per_client=_env_int(
                "CHATD_MAX_QUEUED_EVENTS_PER_CLIENT", defaults.max_queued_events_per_client
            ),
            keepalive_interval_s=_env_float(
                "CHATD_KEEPALIVE_INTERVAL_S", defaults.keepalive_interval_s
            ),
            session_ttl_s=_env_float("CHATD_SESSION_TTL_S", defaults.session_ttl_s),
            login_code_ttl_s=_env_float("CHATD_LOGIN_CODE_TTL_S", defaults.login_code_ttl_s),
            public_url=os.environ.get("CHATD_PUBLIC_URL", defaults.public_url).rstrip("/"),
        )


# The local admin token of an embedded installation lives in the data directory, where
# `chatd serve` writes it and `chatd chat` finds it with no flags (mode 0600).
LOCAL_TOKEN_FILE = "local-token"


def local_token_path(data_dir: Path) -> Path:
    return data_dir / LOCAL_TOKEN_FILE


def read_local_token(data_dir: Path) -> str | None:
    try:
        token = local_token_path(data_dir).read_text().strip()
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return None
    return token or None


def log_level_of(settings: Settings) -> str:
    """The log level to use: CHATD_LOG_LEVEL when set, else INFO for a deployment on its own
    PostgreSQL and WARNING for the embedded one (docs/operations.md, "Running")."""
    if settings.log_level:
        return settings.log_level
    return "INFO" if settings.database_url else "WARNING"
