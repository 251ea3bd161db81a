"""The `chatd` command: serve, migrate, status, token create, chat."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from datetime import timedelta

import asyncpg

from app.config import Settings, log_level_of
from app.db.connections import create_pool
from app.db.embedded import start_embedded_postgres
from app.db.migrate import migrate_dsn
from app.errors import ValidationFailed
from app.http.auth import create_token
from app.log import configure_logging
from app.terminal import run_chat


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run a replica: HTTP API, streams and worker")
    serve_cmd.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port to bind (default 8080)")

    commands.add_parser("migrate", help="apply pending schema migrations and exit")
    status_cmd = commands.add_parser(
        "status", help="print chat counts by status and the replicas, from the database"
    )
    status_cmd.add_argument("--json", action="store_true", help="one JSON object instead of tables")

    token_cmd = commands.add_parser("token", help="manage API tokens")
    token_commands = token_cmd.add_subparsers(dest="token_command", required=True)
    create_cmd = token_commands.add_parser(
        "create", help="create a token for USER (and USER if needed); prints only the token"
    )
    create_cmd.add_argument("user", metavar="USER")
    create_cmd.add_argument("--admin", action="store_true", help="make USER an admin")

    chat_cmd = commands.add_parser("chat", help="send a message and stream the answer")
    chat_cmd.add_argument("text", help="the message")
    chat_cmd.add_argument("--chat", dest="chat_id", help="continue this chat (default: a new one)")
    chat_cmd.add_argument("--url", help="the server (default: CHATD_URL or http://127.0.0.1:8080)")
    chat_cmd.add_argument(
        "--token", help="API token (default: CHATD_TOKEN, else the local token of `chatd serve`)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    if (error := _setup_logging(settings)) is not None:
        print(f"chatd: {error}", file=sys.stderr)
        return 2
    if getattr(args, "host", None):
        settings.host = args.host
    if getattr(args, "port", None):
        settings.port = args.port

    if args.command == "chat":
        # A client of the HTTP API: no database here.
        return run_chat(args.text, chat_id=args.chat_id, url=args.url, token=args.token)

    if args.command == "status":
        with _quiet_database(settings) as dsn:
            print(asyncio.run(_status(dsn, as_json=args.json)), flush=True)
        return 0

    if args.command == "token":
        # stdout carries the token and nothing else (scripts capture it).
        with _quiet_database(settings) as dsn:
            try:
                token = asyncio.run(_create_token(dsn, args.user, admin=args.admin))
            except ValidationFailed as exc:
                print(f"chatd token create: {exc.message}", file=sys.stderr)
                return 2
        print(token, flush=True)
        return 0

    # Imported here: the service pulls in the engine and the provider SDKs (seconds of imports)
    # that `chatd chat` and `chatd token` never use.
    from app.service import database, serve  # noqa: PLC0415

    with database(settings) as dsn:
        if args.command == "serve":
            asyncio.run(serve(settings, dsn))
        elif args.command == "migrate":
            applied = asyncio.run(migrate_dsn(dsn))
            print(
                f"applied {len(applied)} migration(s)"
                + (": " + ", ".join(applied) if applied else "")
            )
    return 0


def _setup_logging(settings: Settings) -> str | None:
    """Configure logging from the settings; the error to report when they are invalid."""
    if settings.log_format not in ("text", "json"):
        return f"CHATD_LOG_FORMAT must be text or json, not {settings.log_format!r}"
    try:
        configure_logging(log_level_of(settings), settings.log_format)
    except ValueError:
        return f"CHATD_LOG_LEVEL {settings.log_level!r} is not a log level"
    return None


@contextlib.contextmanager
def _quiet_database(settings: Settings) -> Iterator[str]:
    """Like service.database, without printing to stdout."""
    if settings.database_url:
        yield settings.database_url
        return
    embedded = start_embedded_postgres(settings.data_dir)
    try:
        yield embedded.dsn
    finally:
        embedded.stop()


async def _create_token(dsn: str, user: str, *, admin: bool) -> str:
    await migrate_dsn(dsn)
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        return await create_token(pool, user, admin=admin)
    finally:
        await pool.close()


async def _status(dsn: str, *, as_json: bool) -> str:
    """The chat counts by status and the replicas, as two tables or one JSON object."""
    conn = await asyncpg.connect(dsn)
    try:
        chats = await conn.fetch("SELECT * FROM chat_status_summary ORDER BY status, archived")
        replicas = await conn.fetch("SELECT * FROM chat_replica_health ORDER BY started_at")
    finally:
        await conn.close()
    if as_json:
        return json.dumps(
            {
                "chats": [
                    {
                        "status": row["status"],
                        "archived": row["archived"],
                        "chats": row["chats"],
                        "oldest_change_age_s": _seconds(row["oldest_change_age"]),
                    }
                    for row in chats
                ],
                "replicas": [
                    {
                        "id": str(row["id"]),
                        "hostname": row["hostname"],
                        "pid": row["pid"],
                        "address": row["address"],
                        "started_at": row["started_at"].isoformat(),
                        "heartbeat_age_s": _seconds(row["heartbeat_age"]),
                        "running_chats": row["running_chats"],
                    }
                    for row in replicas
                ],
            },
            indent=2,
        )
    chat_table = _table(
        ["STATUS", "ARCHIVED", "CHATS", "OLDEST CHANGE"],
        [
            [
                row["status"],
                "yes" if row["archived"] else "no",
                str(row["chats"]),
                _age(row["oldest_change_age"]),
            ]
            for row in chats
        ],
        empty="no chats yet",
    )
    replica_table = _table(
        ["REPLICA", "HOST", "PID", "ADDRESS", "HEARTBEAT", "RUNNING"],
        [
            [
                str(row["id"])[:8],
                row["hostname"],
                str(row["pid"]),
                row["address"] or "-",
                _age(row["heartbeat_age"]) + " ago",
                str(row["running_chats"]),
            ]
            for row in replicas
        ],
        empty="no replica is running",
    )
    return f"{chat_table}\n\n{replica_table}"


def _seconds(age: timedelta | None) -> float | None:
    return None if age is None else round(age.total_seconds(), 3)


def _age(age: timedelta | None) -> str:
    """A duration as people read it: 850ms, 5.8s, 3m12s, 2h05m, 3d04h."""
    if age is None:
        return "-"
    seconds = max(age.total_seconds(), 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _table(header: list[str], rows: list[list[str]], *, empty: str) -> str:
    if not rows:
        return f"{'  '.join(header)}\n({empty})"
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    )


if __name__ == "__main__":
    sys.exit(main())
