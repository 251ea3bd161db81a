"""One replica process: the database, the listener, the HTTP API and the worker (the Replica
engine), composed so that a crash of any long-lived part stops the process loudly instead of
leaving it half alive.

Shutdown order (SIGTERM/SIGINT): the Replica stops first (no more acquires; its runs give their
chats back to pending within `shutdown_grace_s` and it unregisters), then HTTP (so clients see
the chats move on), then the listener and the pool."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Iterator

from aiohttp import web

from app.aio import Backoff
from app.config import Settings
from app.db.connections import create_pool
from app.db.embedded import EmbeddedPostgres, start_embedded_postgres
from app.db.failures import is_outage
from app.db.listener import Listener
from app.db.migrate import migrate_dsn
from app.engine.replica import ENGINE_SERVER_SETTINGS, Replica
from app.http.auth import ensure_local_token
from app.http.server import build_app
from app.http.sessions import local_login_url
from app.log import get_logger
from app.metrics import engine_metrics
from app.providers import retry
from app.providers.catalog import close_providers

log = get_logger(__name__)

POOL_MAX_SIZE = 20


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[str]:
    """Yield a DSN: DATABASE_URL when set, else an embedded PostgreSQL in settings.data_dir."""
    if settings.database_url:
        yield settings.database_url
        return
    embedded: EmbeddedPostgres = start_embedded_postgres(settings.data_dir)
    print(
        f"chatd: data in {embedded.data_dir.resolve()} (embedded PostgreSQL;"
        f" psql: {embedded.psql_command()})",
        flush=True,
    )
    try:
        yield embedded.dsn
    finally:
        embedded.stop()


# Backoff of the start-up wait for the database.
STARTUP_BACKOFF_INITIAL_S = 0.2
STARTUP_BACKOFF_MAX_S = 5.0


async def wait_for_database(dsn: str) -> None:
    """Migrate, waiting with backoff while the database is unreachable (a replica started
    before its database, or during a restart or failover, waits rather than exits)."""
    backoff = Backoff(initial_s=STARTUP_BACKOFF_INITIAL_S, max_s=STARTUP_BACKOFF_MAX_S)
    while True:
        try:
            await migrate_dsn(dsn)
        except Exception as exc:
            if not is_outage(exc):
                raise
            backoff.grow()
            log.warning("service.database_unavailable", error=repr(exc), retry_in_s=backoff.delay_s)
            await asyncio.sleep(backoff.delay_s)
        else:
            return


async def serve(settings: Settings, dsn: str) -> None:
    # Sessions of their own (LISTEN, the liveness lock, the migration lock) connect directly;
    # the pool may go through a transaction pooler (Settings.direct_database_url).
    direct_dsn = settings.direct_database_url or dsn
    through_pooler = direct_dsn != dsn
    await wait_for_database(direct_dsn)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)

    # The engine needs a server-side bound on idle transactions (see ENGINE_SERVER_SETTINGS)
    # and room for its runs next to the HTTP handlers.
    pool = await create_pool(
        dsn,
        min_size=1,
        max_size=POOL_MAX_SIZE,
        server_settings=ENGINE_SERVER_SETTINGS,
        transaction_pooler=through_pooler,
    )
    try:
        # `make run`: a local admin user and its token, written to the data directory where
        # `chatd chat` finds it. Only for the embedded database.
        local_token = (
            await ensure_local_token(pool, settings.data_dir) if not settings.database_url else None
        )
        # And a one-time URL that logs a browser in as that user (docs/web.md).
        login_url = (
            await local_login_url(pool, settings, local_token) if local_token is not None else None
        )
        listener = Listener(direct_dsn)
        replica = Replica(
            settings=settings,
            pool=pool,
            listener=listener,
            dsn=direct_dsn,
            address=f"http://{settings.host}:{settings.port}",
            stream_step=retry.stream_step,
        )
        async with asyncio.TaskGroup() as tasks:
            listener_task = tasks.create_task(listener.run(), name="listener")
            runner = web.AppRunner(
                build_app(
                    settings=settings,
                    pool=pool,
                    listener=listener,
                    metrics=[engine_metrics(replica)],
                    server_tool_names=replica.server_tool_names,
                ),
                shutdown_timeout=2.0,
            )
            await runner.setup()
            try:
                # The engine first, then HTTP: once /readyz answers, this replica also works,
                # and nothing awaits between the site starting and the lines a user reads.
                await replica.start()
                # Everything loaded so far (modules, the provider SDKs' models: hundreds of
                # thousands of objects) lives as long as the process: out of the collector's
                # sight, a collection scans only what serving allocates. Without it the
                # periodic full collections were a third of a streamer's CPU
                # (docs/benchmarks.md, fan-out).
                gc.freeze()
                site = web.TCPSite(runner, settings.host, settings.port)
                await site.start()
                log.info("service.listening", url=f"http://{settings.host}:{settings.port}")
                print(f"chatd: serving on http://{settings.host}:{settings.port}", flush=True)
                if login_url is not None:
                    print(f"chatd: open in a browser (one-time link): {login_url}", flush=True)
                if local_token is not None:
                    print(f"chatd: local admin token: {local_token}", flush=True)
                    print('chatd: try it: chatd chat "hello"', flush=True)
                stop_wait = tasks.create_task(stop_requested.wait(), name="stop-signal")
                await asyncio.wait(
                    {stop_wait, replica.main_task}, return_when=asyncio.FIRST_COMPLETED
                )
                stop_wait.cancel()
                log.info("service.stopping")
            finally:
                await replica.stop()
                await runner.cleanup()
                await close_providers()
                listener_task.cancel()
            if not replica.main_task.cancelled() and replica.main_task.exception() is not None:
                raise RuntimeError("the replica engine crashed") from replica.main_task.exception()
    finally:
        await pool.close()
