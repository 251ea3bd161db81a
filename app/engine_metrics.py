"""The replica engine's counters as `/metrics` samples: an adapter between the engine
(app/replica.py, which knows nothing of HTTP) and the metrics endpoint (app/http/metrics.py).
The service passes `engine_metrics(replica)` to `build_app(metrics=...)`."""

from __future__ import annotations

from collections.abc import Iterable

from app.http.metrics import Collector, Metric
from app.replica import Replica
from app.runner import RunEnd


def engine_metrics(replica: Replica) -> Collector:
    def collect() -> Iterable[Metric]:
        stats = replica.stats
        flush = replica.flusher.stats
        samples = [
            Metric(
                "chatd_runs_running",
                "gauge",
                "Runs in progress on this replica.",
                len(replica.runs),
            ),
            Metric(
                "chatd_runs_acquired_total",
                "counter",
                "Chats acquired by this replica.",
                stats.acquired,
            ),
            Metric(
                "chatd_run_crashes_total",
                "counter",
                "Runs that ended on an unexpected exception.",
                stats.run_crashes,
            ),
            Metric(
                "chatd_part_flushes_total",
                "counter",
                "Part flush statements: one commit (and notification) per window for all chats.",
                flush.transactions,
            ),
            Metric(
                "chatd_parts_written_total", "counter", "Live parts written.", flush.parts_written
            ),
            Metric(
                "chatd_parts_merged_total",
                "counter",
                "Deltas merged into the previous part of the same window.",
                flush.parts_merged,
            ),
            Metric(
                "chatd_parts_fenced_total",
                "counter",
                "Parts not written because their run had lost its chat.",
                flush.parts_fenced,
            ),
            Metric(
                "chatd_part_flush_failures_total",
                "counter",
                "Flushes that failed and were retried.",
                flush.failures,
            ),
            Metric(
                "chatd_replica_registered",
                "gauge",
                "1 while this replica holds its liveness lock.",
                1 if replica.registered else 0,
            ),
            Metric(
                "chatd_replica_liveness_losses_total",
                "counter",
                "Times this replica lost its liveness and registered again.",
                stats.liveness_losses,
            ),
            Metric(
                "chatd_replicas_swept_total",
                "counter",
                "Gone replicas whose chats this replica requeued.",
                stats.replicas_swept,
            ),
            Metric(
                "chatd_chats_requeued_for_others_total",
                "counter",
                "Running chats of gone replicas handed on by this replica.",
                stats.requeued_for_others,
            ),
        ]
        samples += [
            Metric(
                "chatd_run_ends_total",
                "counter",
                "Runs ended, by how they ended.",
                stats.run_ends[end.value],
                {"end": end.value},
            )
            for end in RunEnd
        ]
        return samples

    return collect
