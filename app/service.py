"""One replica process: the database, the listener, the HTTP API (and, from the engine on, the
worker), composed in one TaskGroup so that a crash of any long-lived part stops the process
loudly instead of leaving it half alive."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

from aiohttp import web

from app.config import Settings
from app.db import create_pool
from app.embedded_pg import EmbeddedPostgres, start_embedded_postgres
from app.http.server import build_app
from app.listener import Listener
from app.log import get_logger
from app.migrate import migrate_dsn

log = get_logger(__name__)


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """Yield a DSN: DATABASE_URL when set, else an embedded PostgreSQL in settings.data_dir."""
    if settings.database_url:
        yield settings.database_url
        return
    embedded: EmbeddedPostgres = start_embedded_postgres(settings.data_dir)
    print(f"chatd: embedded PostgreSQL in {embedded.data_dir.resolve()}", flush=True)
    print(f"chatd: connect with: {embedded.psql_command()}", flush=True)
    try:
        yield embedded.dsn
    finally:
        embedded.stop()


async def serve(settings: Settings, dsn: str) -> None:
    await migrate_dsn(dsn)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)

    pool = await create_pool(dsn)
    try:
        listener = Listener(dsn)
        async with asyncio.TaskGroup() as tasks:
            listener_task = tasks.create_task(listener.run(), name="listener")
            runner = web.AppRunner(
                build_app(settings=settings, pool=pool, listener=listener), shutdown_timeout=2.0
            )
            await runner.setup()
            try:
                site = web.TCPSite(runner, settings.host, settings.port)
                await site.start()
                log.info("service.listening", url=f"http://{settings.host}:{settings.port}")
                print(f"chatd: serving on http://{settings.host}:{settings.port}", flush=True)
                await stop_requested.wait()
                log.info("service.stopping")
            finally:
                await runner.cleanup()
                listener_task.cancel()
    finally:
        await pool.close()
