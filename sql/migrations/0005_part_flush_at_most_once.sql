-- 0005: a live part is written at most once. A part flush that fails with an outage may have
-- committed (the connection died after the commit, before the answer); the flusher sends the
-- same parts again, each with its key within its run (seq), and parts_flush skips the ones
-- already there. Control parts (retry notices) carry no seq and never conflict (NULLs are
-- distinct).
ALTER TABLE chat_stream_parts ADD COLUMN seq bigint;
CREATE UNIQUE INDEX chat_stream_parts_run_seq_idx ON chat_stream_parts (chat_id, generation, seq);
