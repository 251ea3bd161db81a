"""`/metrics` in the Prometheus text format (version 0.0.4). Collectors are plain functions
returning samples; the service can pass more (engine counters) to `build_app`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from app.listener import Listener
from app.streams import StreamHubs


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


def render(collectors: Iterable[Collector]) -> str:
    lines: list[str] = []
    described: set[str] = set()
    for collector in collectors:
        for metric in collector():
            if metric.name not in described:
                described.add(metric.name)
                lines.append(f"# HELP {metric.name} {_escape_help(metric.help)}")
                lines.append(f"# TYPE {metric.name} {metric.kind}")
            labels = ",".join(
                f'{key}="{_escape_label(value)}"' for key, value in sorted(metric.labels.items())
            )
            value = int(metric.value) if float(metric.value).is_integer() else metric.value
            lines.append(
                f"{metric.name}{{{labels}}} {value}" if labels else f"{metric.name} {value}"
            )
    return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
