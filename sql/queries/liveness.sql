-- Queries of replica liveness (app/engine/liveness.py). A replica proves it is alive by holding a
-- session advisory lock on its own dedicated connection; its heartbeat_at is the backstop for a
-- replica that is connected but stuck.
--
-- Advisory lock key scheme (two-int4 form, pg_advisory_lock(int4, int4)):
--   classid = 1667785076 (0x63686174, "chat"): the namespace of chatd replica locks;
--   objid   = the first 32 bits of the replica's uuid, as a signed int4.
-- In pg_locks such a lock shows as locktype 'advisory', classid 1667785076, objid = the same 32
-- bits read unsigned (oid), objsubid 2. Two replicas whose ids share their first 32 bits would
-- share a key: registration takes the lock with pg_try_advisory_lock and picks another id when
-- it is taken, so a live replica's key is always its own. The migration lock uses the bigint
-- form (objsubid 1) and never collides with these.
-- The expression ('x' || left(replace(id::text, '-', ''), 8))::bit(32)::int is the objid; it is
-- written out in both queries that need it (liveness_try_lock, liveness_find_gone).

-- name: liveness_try_lock :one
-- On the replica's dedicated liveness connection, BEFORE its row is inserted: a row that others
-- can see always has its lock held, unless its session is gone.
SELECT pg_try_advisory_lock($2::int, ('x' || left(replace($1::uuid::text, '-', ''), 8))::bit(32)::int);

-- name: liveness_insert :exec
INSERT INTO chat_replicas (id, hostname, pid, address)
VALUES ($1, $2, $3, $4);

-- name: liveness_heartbeat :one
-- No row means another replica declared this one dead (stale heartbeat) and requeued its chats:
-- the replica stops its runs and registers again under a new id.
UPDATE chat_replicas SET heartbeat_at = clock_timestamp() WHERE id = $1 RETURNING id;

-- name: liveness_find_gone :many
-- Other replicas that are gone: their advisory lock is free (their session ended: crash,
-- SIGKILL, lost connection) or their heartbeat is older than $3 seconds (connected but stuck).
-- pg_locks is read live, not from a snapshot, so a free lock is free now. Reading pg_locks takes
-- the lock manager's partition locks briefly; once per liveness interval per replica is cheap.
SELECT r.id,
       l.pid IS NULL AS lock_free,
       r.heartbeat_at < clock_timestamp() - make_interval(secs => $3) AS stale
FROM chat_replicas r
LEFT JOIN pg_locks l
       ON l.locktype = 'advisory'
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid = $2::int::oid
      AND l.objid = ('x' || left(replace(r.id::text, '-', ''), 8))::bit(32)::int::oid
      AND l.objsubid = 2
      AND l.granted
WHERE r.id <> $1
  AND (l.pid IS NULL OR r.heartbeat_at < clock_timestamp() - make_interval(secs => $3));

-- name: liveness_delete_gone :many
-- Delete the rows of replicas found gone, re-checking the heartbeat under the row lock: a stuck
-- replica that resumed and heartbeated meanwhile keeps its row (its UPDATE and this DELETE
-- serialize on the row, and the DELETE re-evaluates its condition on the newest version). A
-- replica whose lock was free stays deleted whatever its heartbeat says: its session is gone.
DELETE FROM chat_replicas
WHERE id = ANY($1::uuid[])
  AND (id = ANY($2::uuid[]) OR heartbeat_at < clock_timestamp() - make_interval(secs => $3))
RETURNING id;

-- name: liveness_delete :exec
-- Graceful unregister, on the liveness connection just before it closes.
DELETE FROM chat_replicas WHERE id = $1;

-- name: liveness_keepalive :one
SELECT 1;

-- name: liveness_sweep_lock_timeout :exec
-- SET LOCAL lock_timeout for the sweep's transaction ($1 like '1000ms').
SELECT set_config('lock_timeout', $1, true);

-- name: liveness_advance_part_ids :exec
-- At registration, on the liveness connection: move the live-part id sequence 2^24 past any
-- value it handed out. The sequence is logged, but the part flush commits asynchronously, so a
-- server crash may lose the WAL of its last few advances; a replica registers after every crash
-- (its sessions died with the server), and the jump it makes here is committed synchronously,
-- before any of its runs can flush a part. 2^24 ids per registration keeps ids below 2^53
-- (exact in JavaScript clients) for hundreds of millions of registrations.
SELECT set_config('synchronous_commit', 'on', true),
       setval('chat_stream_part_ids', nextval('chat_stream_part_ids') + 16777216);
