"""Prometheus metrics of the realtime server, served at ``GET /metrics``.

Defined once here so every module counts into the same series. The default registry also
carries the process collector (resident memory, CPU seconds, open files).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

CONNECTIONS = Gauge("excel_pos_realtime_connections", "Connected clients", ["site"])
CONNECTS = Counter("excel_pos_realtime_connects", "Connection attempts by result", ["result"])
DELIVERIES = Counter("excel_pos_realtime_deliveries", "Events emitted to local clients (one per namespace and event)")
REDIS_MESSAGES = Counter("excel_pos_realtime_redis_messages", "Redis messages read", ["channel", "result"])
REDIS_RECONNECTS = Counter("excel_pos_realtime_redis_reconnects", "Redis connections re-established after an outage")
SLOW_CLIENT_DISCONNECTS = Counter("excel_pos_realtime_slow_client_disconnects", "Clients cut off at the transport: stalled with data waiting, or the process over its unsent budget")
CLIENT_EVENTS = Counter("excel_pos_realtime_client_events", "Events received from clients by result", ["result"])
RECOVERIES = Counter("excel_pos_realtime_recoveries", "Reconnects that asked to recover a session, by result", ["result"])
REPLAYED_EVENTS = Counter("excel_pos_realtime_replayed_events", "Events sent again to clients that recovered their session")
QUEUE_BYTES = Gauge("excel_pos_realtime_queued_bytes", "Bytes waiting to be sent to clients, each broadcast counted once")
AUTH_SECONDS = Histogram(
	"excel_pos_realtime_auth_seconds",
	"Time to verify a token at connect",
	["mode"],
	buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def render() -> tuple[bytes, str]:
	"""The metrics page body and its content type."""
	return generate_latest(), CONTENT_TYPE_LATEST
