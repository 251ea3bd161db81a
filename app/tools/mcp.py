"""This replica's connections to MCP servers, through the official `mcp` SDK as the client
(docs/tools.md, "MCP servers").

One `McpConnection` per server and replica, made on first use. Its supervisor task owns the
SDK's `Client` (whose transport and session are anyio task groups, so they must be entered and
left by one task), connects, then waits until the connection is lost or closed; calls and
listings come from the runs' own tasks. A stdio server is a child process of the replica; a
crash (its stdout ends) or a broken HTTP transport is noticed at once, and the supervisor
connects again with a growing pause (`Backoff`) for as long as the server is in use. Every wait
has a deadline: connecting (`connect_timeout_s`), each call (`call_timeout_s`), closing.

What a run sees of a server that is down, crashed or slow is a `McpCallFailed` with a clear
message, which becomes the tool's error result: never a stuck or failed run. Exception text is
logged, not shown to the model (it may name hosts, paths or credentials).

The tool list of a server is cached on its connection: listed again after `tools_ttl_s`, when
the server's config version changed, after a reconnect, or when the server says its list
changed. A changed transport (command, env, url, headers) replaces the connection. At most
`max_servers` connections live on a replica (the least recently used idle one is closed first),
and a connection unused for `idle_close_s` is closed by the sweep of `McpClients.run()`."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from app.aio import Backoff, wait_event
from app.log import get_logger
from app.state.mcp_servers import McpServer, Transport

if TYPE_CHECKING:  # the SDK itself is imported late, by what connects (see mcp_sdk.py)
    import mcp_types
    from mcp import Client
    from mcp.client.session import IncomingMessage

log = get_logger(__name__)

DEFAULT_CALL_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 20.0
DEFAULT_TOOLS_TTL_S = 300.0
DEFAULT_MAX_SERVERS = 32
DEFAULT_IDLE_CLOSE_S = 900.0
RESTART_BACKOFF_INITIAL_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A connection that lived this long was healthy: its next failure starts the backoff afresh.
STABLE_CONNECTION_S = 60.0
# After a failed listing, steps use what is cached (or nothing) for this long before trying again:
# a server that accepts connections but never lists must not cost every step a timeout.
LIST_RETRY_S = 10.0
# Bound of closing all connections at replica shutdown (the SDK bounds each stdio stop itself:
# stdin closed, a grace period, then the process group killed).
CLOSE_TIMEOUT_S = 10.0
SWEEP_INTERVAL_S = 60.0


class McpCallFailed(Exception):
    """A call or a listing could not be done: down, crashed, too slow, or an error answer. The
    message is for the model."""


class McpConnection:
    """One MCP server on this replica: its supervised connection and its cached tool list."""

    def __init__(self, server: McpServer, clients: McpClients) -> None:
        self.server_id = server.id
        self.name = server.name
        self.transport: Transport = server.transport
        self._clients = clients
        loop = asyncio.get_running_loop()
        self.last_used = loop.time()
        self.in_flight = 0
        self._task: asyncio.Task[None] | None = None
        self._client: Client | None = None
        self._close_requested = asyncio.Event()
        self._wake = asyncio.Event()  # this connection lost, or closing: stop serving
        self._connected_at: float | None = None
        self._connecting = False  # an attempt to connect is under way
        self._changed = asyncio.Event()  # replaced after every state change (a pulse)
        self._failure: str | None = None  # why the last attempt failed; None once connected
        self._retry_at = 0.0  # loop time of the next attempt after a failure
        self._listing: list[mcp_types.Tool] | None = None
        self._listing_version = 0
        self._listed_at = 0.0
        self._listing_stale = False
        self._list_failed_at: float | None = None
        self._list_lock = asyncio.Lock()

    # --- what runs use ------------------------------------------------------------------------

    async def tools(self, version: int) -> list[mcp_types.Tool]:
        """The server's tools: the cached list while it is fresh, else listed again (bounded by
        connect_timeout_s). When the server cannot list them, the last list (tools whose calls
        will then report the server's trouble), or none if it never listed."""
        self.last_used = asyncio.get_running_loop().time()
        if self._fresh(version):
            assert self._listing is not None
            return self._listing
        async with self._list_lock:
            if self._fresh(version):
                assert self._listing is not None
                return self._listing
            loop = asyncio.get_running_loop()
            if (
                self._list_failed_at is not None
                and loop.time() - self._list_failed_at < LIST_RETRY_S
            ):
                return self._listing or []
            try:
                deadline = loop.time() + self._clients.connect_timeout_s
                client = await self._client_within(deadline)
                from app.tools import mcp_sdk  # noqa: PLC0415 (late: see mcp_sdk.py)

                async with asyncio.timeout_at(deadline):
                    listing = await mcp_sdk.list_tools(client)
            except Exception as exc:  # unavailable, too slow, an error answer, a bad listing
                self._list_failed_at = loop.time()
                log.warning("mcp.list_failed", server=self.name, error=_describe(exc))
                return self._listing or []
            self._list_failed_at = None
            self._listing, self._listing_version = listing, version
            self._listed_at, self._listing_stale = loop.time(), False
            log.info("mcp.tools_listed", server=self.name, tools=len(listing), version=version)
            return listing

    def _fresh(self, version: int) -> bool:
        return (
            self._listing is not None
            and not self._listing_stale
            and self._listing_version >= version
            and asyncio.get_running_loop().time() - self._listed_at < self._clients.tools_ttl_s
        )

    async def call(self, tool: str, args: dict[str, Any], *, timeout_s: float) -> tuple[Any, bool]:
        """Call `tool`: its result as the model reads it and whether it is an error. The whole
        of it (waiting for a connection included) within timeout_s; McpCallFailed otherwise."""
        loop = asyncio.get_running_loop()
        self.last_used = loop.time()
        self.in_flight += 1
        try:
            return await self._call(tool, args, timeout_s, deadline=loop.time() + timeout_s)
        except McpCallFailed as exc:
            log.info("mcp.call_failed", server=self.name, tool=tool, error=str(exc))
            raise
        finally:
            self.in_flight -= 1

    async def _call(
        self, tool: str, args: dict[str, Any], timeout_s: float, *, deadline: float
    ) -> tuple[Any, bool]:
        client = await self._client_within(deadline)
        from app.tools import mcp_sdk  # noqa: PLC0415 (late: see mcp_sdk.py)

        try:
            async with asyncio.timeout_at(deadline):
                outcome = await mcp_sdk.call_tool(client, tool, args)
        except TimeoutError:
            raise McpCallFailed(
                f"MCP server {self.name!r} did not answer within {timeout_s:g} s"
            ) from None
        if not isinstance(outcome, mcp_sdk.CallFailure):
            return outcome
        if outcome.closed:
            self._lost(client)
            raise McpCallFailed(
                f"MCP server {self.name!r} closed the connection during the call (it crashed"
                " or exited); it is being restarted"
            )
        raise McpCallFailed(f"MCP server {self.name!r} answered with an error: {outcome.message}")

    # --- the connection -------------------------------------------------------------------

    async def _client_within(self, deadline: float) -> Client:
        """The connected client, started on first use. While an attempt to connect is under
        way it is waited for (until `deadline`); a server that failed and waits out its backoff
        fails at once, with McpCallFailed: a server that is down costs a step nothing."""
        loop = asyncio.get_running_loop()
        while True:
            if self._close_requested.is_set():
                raise McpCallFailed(f"MCP server {self.name!r} is being closed on this replica")
            self._start()
            client = self._client
            if client is not None:
                return client
            if self._failure is not None and not self._connecting:
                raise McpCallFailed(
                    f"MCP server {self.name!r} is unavailable ({self._failure}); the next"
                    f" attempt is in {max(self._retry_at - loop.time(), 0):.0f} s"
                )
            changed = self._changed
            if not await wait_event(changed, deadline - loop.time()):
                raise McpCallFailed(
                    f"MCP server {self.name!r} is unavailable"
                    + (f" ({self._failure})" if self._failure else " (still connecting)")
                )

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = self._clients.spawn(self._supervise(), name=f"mcp:{self.name}")
            self._failure = None  # a fresh start: wait for its first attempt

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _lost(self, client: Client) -> None:
        """A call found the connection of `client` closed: serve no more on it (a call that
        failed on an older connection changes nothing)."""
        if self._client is client:
            self._wake.set()

    def close(self) -> None:
        """Ask the supervisor to disconnect (a stdio server is stopped) and end."""
        self._wake.set()
        self._close_requested.set()
        self._notify()

    async def _supervise(self) -> None:
        """Connect, serve until lost or closed, and again after a pause that grows while the
        server keeps failing. Ends when closed, or when a failed server is no longer in use
        (the next use starts it again). Never raises but for cancellation."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(initial_s=RESTART_BACKOFF_INITIAL_S, max_s=RESTART_BACKOFF_MAX_S)
        while not self._close_requested.is_set():
            self._connected_at = None
            try:
                await self._serve()
                self._failure = "the server closed the connection: it crashed or exited"
            except Exception as exc:  # what the SDK's transports raise: OS, HTTP, MCP errors
                self._failure = (
                    "its connection broke"
                    if self._was_connected()
                    else "it could not be reached or started"
                )
                log.warning("mcp.server_failed", server=self.name, error=_describe(exc))
            if self._close_requested.is_set():
                break
            if self._client_was_stable(loop.time()):
                backoff.reset()
            backoff.grow()
            log.warning("mcp.server_down", server=self.name, retry_in_s=backoff.delay_s)
            self._retry_at = loop.time() + backoff.delay_s
            self._notify()
            if self.in_flight == 0 and loop.time() - self.last_used > self._clients.idle_close_s:
                break  # failed and unused: the next use starts it again
            if await wait_event(self._close_requested, backoff.delay_s):
                break
        self._notify()
        log.info("mcp.server_stopped", server=self.name)

    def _was_connected(self) -> bool:
        """Whether the attempt that just ended had connected (a method: it changes across the
        awaits of an attempt, which the type checker cannot see)."""
        return self._connected_at is not None

    def _client_was_stable(self, now: float) -> bool:
        """Whether the connection that just ended had lived long enough to count as healthy."""
        connected_at = self._connected_at
        return connected_at is not None and now - connected_at >= STABLE_CONNECTION_S

    async def _serve(self) -> None:
        """Connect (bounded by connect_timeout_s), then serve until the connection is lost or
        closed; the transport is left (a stdio server stopped) before this returns."""
        wake = self._wake = asyncio.Event()
        if self._close_requested.is_set():
            return
        async with contextlib.AsyncExitStack() as stack:
            self._connecting = True
            self._notify()
            try:
                from app.tools import mcp_sdk  # noqa: PLC0415 (late: see mcp_sdk.py)

                async with asyncio.timeout(self._clients.connect_timeout_s):
                    client = await mcp_sdk.connect(
                        stack,
                        self.transport,
                        connect_timeout_s=self._clients.connect_timeout_s,
                        on_end=wake.set,
                        on_message=self._on_message,
                    )
            finally:
                self._connecting = False
            self._client = client
            self._connected_at = asyncio.get_running_loop().time()
            self._failure = None
            self._listing_stale = True  # a new process (or session) may offer other tools
            self._notify()
            log.info("mcp.server_connected", server=self.name, protocol=client.protocol_version)
            try:
                await wake.wait()
            finally:
                self._client = None

    async def _on_message(self, message: IncomingMessage) -> None:
        from app.tools import mcp_sdk  # noqa: PLC0415 (loaded already: a client is connected)

        if mcp_sdk.lists_changed(message):
            self._listing_stale = True
        elif isinstance(message, Exception):
            log.info("mcp.transport_error", server=self.name, error=_describe(message))


def _describe(exc: BaseException) -> str:
    """One line for the log: an exception group's leaves, not its wrapper."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(leaf) for leaf in exc.exceptions)
    return repr(exc)[:500]


class McpClients:
    """Every MCP connection of this replica. `run()` hosts their supervisors in one TaskGroup
    (a long-lived task of the replica) and closes idle ones; `close()` disconnects them all,
    bounded, at shutdown."""

    def __init__(
        self,
        *,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        tools_ttl_s: float = DEFAULT_TOOLS_TTL_S,
        max_servers: int = DEFAULT_MAX_SERVERS,
        idle_close_s: float = DEFAULT_IDLE_CLOSE_S,
    ) -> None:
        self.call_timeout_s = call_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.tools_ttl_s = tools_ttl_s
        self.max_servers = max_servers
        self.idle_close_s = idle_close_s
        self._connections: dict[uuid.UUID, McpConnection] = {}
        self._group: asyncio.TaskGroup | None = None
        self._closed = asyncio.Event()
        self._stopped = asyncio.Event()

    async def run(self) -> None:
        """Host the supervisors until close(); every SWEEP_INTERVAL_S close idle connections."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                while not await wait_event(self._closed, SWEEP_INTERVAL_S):
                    self._close_idle()
                for connection in list(self._connections.values()):
                    connection.close()
                self._connections.clear()
        finally:
            self._group = None
            self._stopped.set()

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Disconnect every server (stdio servers are stopped); returns when done or at the
        deadline (the replica then cancels what is left)."""
        self._closed.set()
        if self._group is not None:
            await wait_event(self._stopped, timeout_s)

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        group = self._group
        if group is None or self._closed.is_set():
            coro.close()
            raise McpCallFailed("MCP servers are not available on this replica right now")
        return group.create_task(coro, name=name)

    def connection(self, server: McpServer) -> McpConnection:
        """The connection of `server`; a new one when its transport changed (the old one is
        closed: a stdio server is restarted with its new command and environment)."""
        current = self._connections.get(server.id)
        if current is not None and current.transport == server.transport:
            current.name = server.name
            return current
        if current is not None:
            log.info("mcp.server_changed", server=server.name)
            current.close()
        elif len(self._connections) >= self.max_servers:
            self._evict()
        connection = McpConnection(server, self)
        self._connections[server.id] = connection
        return connection

    def _evict(self) -> None:
        idle = [c for c in self._connections.values() if c.in_flight == 0]
        if idle:
            oldest = min(idle, key=lambda c: c.last_used)
            log.info("mcp.server_evicted", server=oldest.name, bound=self.max_servers)
            self._drop(oldest)

    def _close_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        for connection in list(self._connections.values()):
            if connection.in_flight == 0 and now - connection.last_used > self.idle_close_s:
                log.info("mcp.server_idle_closed", server=connection.name)
                self._drop(connection)

    def _drop(self, connection: McpConnection) -> None:
        connection.close()
        if self._connections.get(connection.server_id) is connection:
            del self._connections[connection.server_id]
