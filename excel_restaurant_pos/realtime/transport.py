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

Direct writes: Engine.IO hands every packet to the client's writer green thread through the
queue, which costs a hub timer and two green-thread switches per packet delivered. When the
writer is idle (waiting on an empty queue) and the socket takes the whole frame at once, the
frame is written straight away instead, with the websocket's own send lock held; a frame the
socket takes only part of is finished by a green thread that keeps the lock, so the writer
(which takes the same lock) sends what follows only after it. For a broadcast the frame is
built once and written to every client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: A queue this many times over its limit is cut at once, without waiting for the grace.
HARD_LIMIT_FACTOR = 4


def packet_size(packet: Any) -> int:
	"""What a queued Engine.IO packet will cost on the wire, near enough."""
	data = getattr(packet, "data", None)
	return 8 + (len(data) if isinstance(data, (str, bytes)) else 0)


def engineio_overrides(async_drivers: dict, max_bytes: int, max_packets: int, on_overflow: Callable[[Any], None]) -> dict:
	"""A copy of Engine.IO's eventlet driver table with the bounded queue and the websocket
	wrapper in place; Engine.IO builds each client's queue and websocket from this table."""
	import eventlet
	from eventlet.websocket import RFC6455WebSocket

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
			#: The Engine.IO socket and websocket, once a websocket writer drains this queue.
			self.owner: Any = None
			self.websocket: Any = None

		def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
			if item is not None:  # None is Engine.IO's end-of-stream mark: always let it through
				if self.overflowed:
					return
				if self.websocket is not None and not self.queue and self.getters and self.write_now(item):
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
			# Engine.IO's websocket writer gives up after a ping interval and a ping timeout
			# with no packet through its queue; with direct writes that is every idle moment.
			# A peer that went silent is closed by the ping check and the reader's socket
			# timeout instead, both of which wake the writer with the end mark.
			item = super().get(block, None if self.websocket is not None else timeout)
			if item is not None:
				self.queued_bytes -= packet_size(item)
				if self.over_since is not None and self.queued_bytes <= max_bytes and self.qsize() < max_packets:
					self.over_since = None
			return item

		def write_now(self, item: Any) -> bool:
			"""Write ``item`` without the writer, when that keeps the order; ``False`` when
			it must go through the queue."""
			owner, websocket = self.owner, self.websocket
			if not owner.upgraded or owner.upgrading or owner.closed or not websocket._sendlock.acquire(blocking=False):
				return False
			try:
				frame = websocket_frame(websocket, item)
				try:
					sent = websocket.socket.fd.send(frame)
				except BlockingIOError:
					sent = 0
			except Exception:
				websocket._sendlock.release()
				return False  # the writer meets the same error and ends the connection
			if sent == len(frame):
				websocket._sendlock.release()
			else:
				eventlet.spawn(finish_frame, websocket, memoryview(frame)[sent:])
			return True

		def overflow(self) -> None:
			"""Take no more packets and have the server cut this client."""
			if not self.overflowed:
				self.overflowed = True
				on_overflow(self)

	class TrackedWebSocket(websocket_class):
		"""Remembers the client's TCP socket on its Engine.IO socket, and the websocket on its
		queue for direct writes."""

		def __init__(self, handler: Any, server: Any):
			owner = getattr(handler, "__self__", None)

			def run(websocket: Any) -> Any:
				if isinstance(websocket, RFC6455WebSocket):
					owner.queue.owner, owner.queue.websocket = owner, websocket
				try:
					return handler(websocket)
				finally:  # the connection is over, or its upgrade failed and polling goes on
					owner.queue.websocket = None

			super().__init__(run if owner is not None else handler, server)
			self.owner = owner

		def __call__(self, environ: dict, start_response: Any) -> Any:
			if self.owner is not None and "eventlet.input" in environ:
				self.owner.transport_socket = environ["eventlet.input"].get_socket()
			return super().__call__(environ, start_response)

	return {**async_drivers, "queue": BoundedQueue, "websocket": TrackedWebSocket}


def websocket_frame(websocket: Any, packet: Any) -> bytes:
	"""The frame Engine.IO's writer would send for ``packet``. Without compression it is the
	same for every client, so a broadcast's packet keeps it for the next client."""
	if websocket.extensions:
		return websocket._pack_message(packet.encode())
	frame = getattr(packet, "websocket_frame", None)
	if frame is None:
		frame = packet.websocket_frame = websocket._pack_message(packet.encode())
	return frame


def finish_frame(websocket: Any, rest: memoryview) -> None:
	"""Send the rest of a frame the socket took only part of, then let the writer go on."""
	try:
		websocket.socket.sendall(rest)
	except OSError as exc:
		logger.debug("websocket write failed: %s", exc)  # the reader sees the closed socket
	finally:
		websocket._sendlock.release()

