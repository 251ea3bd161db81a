"""What `/metrics` shows (docs/operations.md, "Metrics"): the instruments rooms record events
into (app/instruments.py: histograms and counters), and snapshot samples read at scrape time
from the stream hubs, the listener, the pool and the replica engine. prometheus_client renders
both. The engine and the streams know nothing of HTTP; the service hands
`engine_metrics(replica)` to `build_app(metrics=...)`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import asyncpg
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as Metric_
from prometheus_client.registry import Collector as RegistryCollector

from app.db.listener import Listener
from app.engine.chatloop import RunEnd
from app.engine.replica import Replica
from app.stream.hub import StreamHubs


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Literal["counter", "gauge"]
    help: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


Collector = Callable[[], Iterable[Metric]]


def stream_metrics(hubs: StreamHubs) -> Collector:
    def collect() -> Iterable[Metric]:
        stats = hubs.stats()
        return [
            Metric("chatd_stream_hubs", "gauge", "Chats with local stream watchers.", stats.hubs),
            Metric("chatd_stream_clients", "gauge", "Connected stream clients.", stats.clients),
            Metric(
                "chatd_stream_hub_reads_total",
                "counter",
                "Database reads made by stream hubs (one per batch of notifications).",
                stats.reads,
            ),
            Metric(
                "chatd_stream_hub_notifications_total",
                "counter",
                "Notifications received by stream hubs.",
                stats.notifications,
            ),
            Metric(
                "chatd_stream_hub_resyncs_total",
                "counter",
                "Listener resyncs handled by stream hubs (full re-reads).",
                stats.resyncs,
            ),
            Metric(
                "chatd_stream_client_overflows_total",
                "counter",
                "Clients told to resync and disconnected because they fell behind.",
                stats.overflows,
            ),
            Metric(
                "chatd_stream_hub_read_failures_total",
                "counter",
                "Stream hub reads that failed (database outage, contention or deadline) and"
                " were retried.",
                stats.read_failures,
            ),
        ]

    return collect


def listener_metrics(listener: Listener) -> Collector:
    def collect() -> Iterable[Metric]:
        stats = listener.stats
        return [
            Metric(
                "chatd_listener_notifications_total",
                "counter",
                "Notifications received on the LISTEN connection.",
                stats.notifications,
            ),
            Metric(
                "chatd_listener_connects_total",
                "counter",
                "Connections of the LISTEN connection (the first one included).",
                stats.connects,
            ),
            Metric(
                "chatd_listener_reconnects_total",
                "counter",
                "Losses of the LISTEN connection (each followed by a reconnect).",
                stats.connection_losses,
            ),
            Metric(
                "chatd_listener_connected",
                "gauge",
                "1 while the LISTEN connection is up.",
                1 if listener.connected else 0,
            ),
        ]

    return collect


def render(collectors: Iterable[Collector]) -> bytes:
    """The Prometheus text exposition of the process's instruments (app/instruments.py, with
    prometheus_client's process and GC collectors) followed by this application's snapshot
    samples, both produced by prometheus_client."""
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(list(collectors)))
    return generate_latest(REGISTRY) + generate_latest(snapshot)


class _Snapshot(RegistryCollector):
    """The samples of the collectors, read at scrape time, as metric families."""

    def __init__(self, collectors: list[Collector]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric_]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for collector in self._collectors:
            for metric in collector():
                family = families.get(metric.name)
                if family is None:
                    labels = sorted(metric.labels)
                    family = (
                        CounterMetricFamily(metric.name, metric.help, labels=labels)
                        if metric.kind == "counter"
                        else GaugeMetricFamily(metric.name, metric.help, labels=labels)
                    )
                    families[metric.name] = family
                family.add_metric(
                    [metric.labels[key] for key in sorted(metric.labels)], metric.value
                )
        yield from families.values()


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


def pool_metrics(pool: asyncpg.Pool) -> Collector:
    def collect() -> Iterable[Metric]:
        size = pool.get_size()
        return [
            Metric("chatd_db_pool_connections", "gauge", "Connections the pool holds.", size),
            Metric(
                "chatd_db_pool_in_use",
                "gauge",
                "Pool connections in use (a statement or a transaction).",
                size - pool.get_idle_size(),
            ),
            Metric("chatd_db_pool_max", "gauge", "The pool's maximum size.", pool.get_max_size()),
        ]

    return collect


def requires_action_metrics(waiting: int) -> Collector:
    """A count read from the database by the scrape (app/http/ops_endpoints.py)."""

    def collect() -> Iterable[Metric]:
        return [
            Metric(
                "chatd_chats_requires_action",
                "gauge",
                "Chats waiting for their clients' tool results (all replicas).",
                waiting,
            )
        ]

    return collect
