"""The `chatd` command: serve, migrate, status."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import asyncpg

from app.config import Settings
from app.log import configure_logging
from app.migrate import migrate_dsn
from app.service import database, serve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run a replica: HTTP API, streams and worker")
    serve_cmd.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port to bind (default 8080)")

    commands.add_parser("migrate", help="apply pending schema migrations and exit")
    commands.add_parser("status", help="print chat and replica counts from the database")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    if getattr(args, "host", None):
        settings.host = args.host
    if getattr(args, "port", None):
        settings.port = args.port

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
