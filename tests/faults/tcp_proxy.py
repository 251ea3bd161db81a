"""A TCP proxy between database clients (replicas, pools) and PostgreSQL, whose network a test can
break: `cut()` resets every connection, `blackhole()` makes the path silently drop everything (a
half-open network), `heal()` restores it for new connections.

It runs in the test's event loop (`async with TcpProxy(host, port) as proxy:`), so it serves
clients in the same loop and separate processes alike (replicas get `proxy.port` in their
DATABASE_URL). Whatever the test awaits keeps it forwarding; a test must not block its loop.

Choices, as a real network would behave:
- `cut()` aborts both sides of every open connection with SO_LINGER 0 (an RST, not a FIN), like a
  restarted NAT or load balancer. New connections are accepted and forwarded as usual.
- `blackhole()`: every open connection stops forwarding in both directions without being closed;
  each side sees silence. A server-side close (PostgreSQL restarting) is not passed on either.
  New connections are accepted (the kernel completes the handshake) and never forwarded nor
  answered. Only deadlines can detect this; note that TCP keepalive can NOT: the proxy's kernel
  answers the client's keepalive probes, as its socket is alive. (A test of keepalive settings
  needs packet filtering, not a user-space proxy.)
- `heal()`: new connections are forwarded again. Connections that were black-holed stay
  silent for good (as if TCP had given up on them, or a NAT on the path lost their state); only
  the client closing them ends them. When a client closes a black-holed connection, the proxy
  closes the server side once healed (the client's FIN gets through once the network is back),
  so the server's backend, its transaction and its locks end then, not before. This is the
  default because it is the harsher case: every pooled connection must be found dead by a
  deadline.
- `heal(resume=True)`: what TCP does after a short partition: nothing was lost, only delayed.
  Black-holed connections resume and what was sent meanwhile is delivered in order, late
  (queries a client gave up on still run; their answers arrive after its deadline); connections
  accepted during the black hole are forwarded now, their first bytes included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

CONNECT_TIMEOUT_S = 10.0
READ_SIZE = 65536
_ids = itertools.count(1)


@dataclass(eq=False)
class _Connection:
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    upstream_writer: asyncio.StreamWriter | None = None
    blackholed: bool = False
    answers_lost: bool = False  # the server's bytes are dropped on their way to the client
    id: int = field(default_factory=lambda: next(_ids))


def _abort_with_reset(writer: asyncio.StreamWriter | None) -> None:
    """Close now, discarding buffered data, with an RST (SO_LINGER on, timeout 0)."""
    if writer is None:
        return
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.accepted = 0  # connections accepted since start
        self.forwarded = 0  # of those, connected to the target
        self.cut_connections = 0  # connections reset by cut()
        self._server: asyncio.Server | None = None
        self._connections: dict[_Connection, asyncio.Task[None]] = {}
        self._blackholed = False
        self._healed = asyncio.Event()
        self._healed.set()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
        self._healed.set()  # lets black-holed handlers finish
        self.cut()  # every handler ends with its sockets
        tasks = list(self._connections.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:  # e.g. still connecting to a target that does not answer
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- faults ----------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every open connection, both ways. Returns how many were cut."""
        connections = list(self._connections)
        for connection in connections:
            _abort_with_reset(connection.client_writer)
            _abort_with_reset(connection.upstream_writer)
        self.cut_connections += len(connections)
        return len(connections)

    def blackhole(self) -> None:
        """From now on nothing passes: open connections go silent, new ones are never answered."""
        self._blackholed = True
        self._healed.clear()
        for connection in self._connections:
            connection.blackholed = True

    def lose_answers(self) -> None:
        """From now on, on every open connection, what the server sends is dropped while what
        the client sends still arrives: a statement runs and commits, and its client never
        hears of it (the connection died after the commit, before the answer). The connections
        stay broken after `heal()`; new ones are not affected."""
        for connection in self._connections:
            connection.answers_lost = True

    def heal(self, *, resume: bool = False) -> None:
        """New connections are forwarded again; black-holed ones stay silent, or with `resume`
        deliver what was held back and forward again (see the module)."""
        if resume:
            for connection in self._connections:
                connection.blackholed = False
        self._blackholed = False
        self._healed.set()

    # --- state -----------------------------------------------------------------------------

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def forwarding_connections(self) -> int:
        """Open connections that still forward (not black-holed)."""
        return sum(
            1 for c in self._connections if not c.blackholed and c.upstream_writer is not None
        )

    @property
    def dsn_host_port(self) -> str:
        return f"{self.host}:{self.port}"

    # --- forwarding ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(reader, writer, blackholed=self._blackholed)
        self._connections[connection] = task
        self.accepted += 1
        try:
            if connection.blackholed:
                # Read nothing: the client's first bytes wait in the socket for a resume.
                await self._healed.wait()
                if connection.blackholed:
                    await self._swallow(reader)
                    return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    upstream_reader, upstream_writer = await asyncio.open_connection(
                        self.target_host, self.target_port
                    )
            except (OSError, TimeoutError):
                return  # the target is down: the client sees its connection close
            connection.upstream_writer = upstream_writer
            self.forwarded += 1
            await self._forward(connection, upstream_reader, upstream_writer)
        except asyncio.CancelledError:
            # Only close() (or the end of the test's loop) cancels a handler; asyncio's stream
            # server would log a cancelled handler as an error, so end quietly.
            return
        finally:
            del self._connections[connection]
            for side in (connection.client_writer, connection.upstream_writer):
                if side is not None and not side.transport.is_closing():
                    side.transport.abort()

    async def _forward(
        self,
        connection: _Connection,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        to_upstream = asyncio.create_task(
            self._pump(connection, connection.client_reader, upstream_writer)
        )
        to_client = asyncio.create_task(
            self._pump(connection, upstream_reader, connection.client_writer, to_client=True)
        )
        try:
            await asyncio.wait({to_upstream, to_client}, return_when=asyncio.FIRST_COMPLETED)
            if connection.blackholed:
                # Nothing crosses a black hole, not even a close: each side learns of the
                # other's close once healed; a connection not resumed stays silent until its
                # client closes it.
                await self._healed.wait()
                if connection.blackholed:
                    await to_upstream
        finally:
            for pump in (to_upstream, to_client):
                pump.cancel()
            await asyncio.wait({to_upstream, to_client})

    async def _pump(
        self,
        connection: _Connection,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        *,
        to_client: bool = False,
    ) -> None:
        """Copy until end of stream or a socket error. While black-holed, hold the data (the
        rest waits in the socket buffers) until the heal: then deliver it if the connection
        was resumed, else drop it and everything after."""
        with contextlib.suppress(OSError):
            while data := await source.read(READ_SIZE):
                if connection.blackholed:
                    await self._healed.wait()
                    if connection.blackholed:
                        continue
                if to_client and connection.answers_lost:
                    continue
                sink.write(data)
                await sink.drain()

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(READ_SIZE):
                pass
