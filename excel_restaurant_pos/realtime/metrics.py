"""What the realtime server tells operators about itself: Prometheus metrics, served at
``GET /metrics``, and its recent errors, listed by ``GET /health``.

Defined once here so every module counts into the same series. The default registry also
carries the process collector (resident memory, CPU seconds, open files).
"""

from __future__ import annotations

import collections
import logging
import time

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


class RecentErrors(logging.Handler):
	"""The last warnings and errors the server logged, for ``/health`` and ``excel-pos
	status``: an operator asking why a server is unhealthy sees why without its log file."""

	def __init__(self, size: int = 10):
		super().__init__(logging.WARNING)
		self.records: collections.deque[dict[str, object]] = collections.deque(maxlen=size)

	def emit(self, record: logging.LogRecord) -> None:
		try:
			message = record.getMessage()
		except Exception:  # a bad format string must not take the server down
			message = str(record.msg)
		when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
		self.records.append({"time": when, "level": record.levelname, "logger": record.name, "message": message})

	def recent(self) -> list[dict[str, object]]:
		return list(self.records)
