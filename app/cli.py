"""The `chatd` command: serve, migrate, status, token create, chat."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Iterator, Sequence

import asyncpg

from app.config import Settings
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
    commands.add_parser("status", help="print chat and replica counts from the database")

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
    configure_logging(settings.log_level)
    if getattr(args, "host", None):
        settings.host = args.host
    if getattr(args, "port", None):
        settings.port = args.port

    if args.command == "chat":
        # A client of the HTTP API: no database here.
        return run_chat(args.text, chat_id=args.chat_id, url=args.url, token=args.token)

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
        elif args.command == "status":
            asyncio.run(_status(dsn))
    return 0


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


async def _status(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for row in await conn.fetch("SELECT * FROM chat_status_summary ORDER BY status"):
            print(f"chats status={row['status']} archived={row['archived']} count={row['chats']}")
        for row in await conn.fetch("SELECT * FROM chat_replica_health ORDER BY started_at"):
            print(
                f"replica id={row['id']} host={row['hostname']} pid={row['pid']}"
                f" heartbeat_age={row['heartbeat_age']} running={row['running_chats']}"
            )
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
