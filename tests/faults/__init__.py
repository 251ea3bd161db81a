"""Fault injection: the test layer that breaks what chatd depends on, so tests can check that
every promise holds anyway (issue 9). Reusable by any test; nothing here mocks the database.

- `pg_cluster.PgCluster`: a dedicated PostgreSQL server for one test (never the suite's shared
  one), on TCP 127.0.0.1:<port>, with a migrated `chatd` database: `restart_fast()` (a minor
  upgrade or failover), `crash_restart()` (immediate stop + crash recovery: UNLOGGED tables come
  back empty), `stop()`/`start()`. Fixtures `pg_cluster` (per test) and `pg_cluster_module`.
- `tcp_proxy.TcpProxy`: a TCP proxy in front of it, for in-process pools and replica processes
  alike: `cut()` (reset every connection), `blackhole()` (a half-open network), `heal()`.
- `chat_lock.chat_row_locked`: a transaction holding `FOR UPDATE` on a chat row.
- `sse.ResumingSseClient`: an SSE client that reconnects with `Last-Event-ID` after every
  disconnect and assembles the chat the way docs/api.md tells clients to.

Fixtures live in `tests/faults/fixtures.py` and are imported by tests/conftest.py."""
