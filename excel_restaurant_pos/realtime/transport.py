"""Back-pressure at the Engine.IO transport: a bounded outgoing queue per client.

Engine.IO keeps one unbounded queue of packets per client, drained by that client's writer.
A client that stops reading (a tablet on a dying Wi-Fi, a hostile peer) would let its queue
grow with every broadcast until the server runs out of memory. Here the queue counts the
bytes and packets waiting; past the limit it stops taking packets and reports the client,
whose transport the server then cuts (see :meth:`RealtimeServer.cut_off`).

Two limits, so that a burst a healthy client drains never trips it: a queue over the limit
starts a clock (``over_since``) that the server's sweep reads, and a client still over it
after the grace period is cut; a queue over four times the limit is cut at once, which
bounds the memory a client that never reads can hold.

The websocket wrapper remembers each client's TCP socket, so a cut can also unblock a writer
stuck in ``send()`` to a peer that no longer reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: A queue this many times over its limit is cut at once, without waiting for the grace.
HARD_LIMIT_FACTOR = 4


def packet_size(packet: Any) -> int:
	"""What a queued Engine.IO packet will cost on the wire, near enough."""
	data = getattr(packet, "data", None)
	return 8 + (len(data) if isinstance(data, (str, bytes)) else 0)


def engineio_overrides(async_drivers: dict, max_bytes: int, max_packets: int, on_overflow: Callable[[Any], None]) -> dict:
	"""A copy of Engine.IO's eventlet driver table with the bounded queue and the websocket
	wrapper in place; Engine.IO builds each client's queue and websocket from this table."""
	queue_class = async_drivers["queue"]
	websocket_class = async_drivers["websocket"]
	hard_bytes, hard_packets = HARD_LIMIT_FACTOR * max_bytes, HARD_LIMIT_FACTOR * max_packets

	class BoundedQueue(queue_class):
		"""Counts what waits, starts ``over_since`` past the limit, and past the hard limit
		drops new packets and calls ``on_overflow`` once."""

		def __init__(self, *args: Any, **kwargs: Any):
			super().__init__(*args, **kwargs)
			self.queued_bytes = 0
			self.over_since: float | None = None
			self.overflowed = False

		def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
			if item is not None:  # None is Engine.IO's end-of-stream mark: always let it through
				if self.overflowed:
					return
				size = packet_size(item)
				if self.queued_bytes + size > hard_bytes or self.qsize() >= hard_packets:
					self.overflow()
					return
				self.queued_bytes += size
				if self.over_since is None and (self.queued_bytes > max_bytes or self.qsize() >= max_packets):
					self.over_since = time.monotonic()
			super().put(item, block, timeout)

		def get(self, block: bool = True, timeout: float | None = None) -> Any:
			item = super().get(block, timeout)
			if item is not None:
				self.queued_bytes -= packet_size(item)
				if self.over_since is not None and self.queued_bytes <= max_bytes and self.qsize() < max_packets:
					self.over_since = None
			return item

		def overflow(self) -> None:
			"""Take no more packets and have the server cut this client."""
			if not self.overflowed:
				self.overflowed = True
				on_overflow(self)

	class TrackedWebSocket(websocket_class):
		"""Remembers the client's TCP socket on its Engine.IO socket."""

		def __call__(self, environ: dict, start_response: Any) -> Any:
			owner = getattr(self.handler, "__self__", None)
			if owner is not None and "eventlet.input" in environ:
				owner.transport_socket = environ["eventlet.input"].get_socket()
			return super().__call__(environ, start_response)

	return {**async_drivers, "queue": BoundedQueue, "websocket": TrackedWebSocket}
