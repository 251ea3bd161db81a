-- 0003: live part ids that never go backwards. Crash recovery empties UNLOGGED tables and resets
-- the sequences they own (PostgreSQL 15+ makes the sequence of an unlogged table unlogged too),
-- so the ids of chat_stream_parts started again at 1 after a crash, below the part cursors that
-- hubs and clients held: they dropped every live part after recovery. The ids now come from a
-- LOGGED sequence, which crash recovery restores; and every replica moves it far ahead when it
-- registers (replicas_advance_part_ids), which covers the few values whose WAL a crash may lose
-- (the part flush commits asynchronously). docs/reliability.md, "Crash recovery".
CREATE SEQUENCE chat_stream_part_ids;
SELECT setval('chat_stream_part_ids', (SELECT last_value FROM chat_stream_parts_id_seq));
ALTER TABLE chat_stream_parts ALTER COLUMN id SET DEFAULT nextval('chat_stream_part_ids');
DROP SEQUENCE chat_stream_parts_id_seq;
