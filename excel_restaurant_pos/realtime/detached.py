"""A websocket's connection once it has left its HTTP request.

A blocked reader costs an idle websocket most of its memory: the green thread's saved C
stack, its frames, and the request, headers and buffers those frames keep alive. So once a
websocket is upgraded, its connection leaves the HTTP server: the request's green thread
ends, the socket stays open, the hub watches it, and a green thread runs only while
something the client sent is read and handled
(:class:`~excel_restaurant_pos.realtime.transport.WebSocketReader`). The connection keeps
its slot of ``max_connections`` until :meth:`Detached.close`.

Both backends' HTTP servers offer this in the environ of a websocket request: under
:data:`DETACH`, a callable that returns the :class:`Detached` connection. Each watches the
socket with its hub's readiness watchers (eventlet's ``add``/``remove``, gevent's
``loop.io``); a hub without them (another release) gets no :data:`DETACH`, and the websocket
is read by its request's green thread until it closes, as before. Importing this module
imports neither library.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

#: The environ key under which a websocket request finds how to leave the HTTP server.
DETACH = "excel_restaurant_pos.detach"


class Detached:
	"""A websocket's TCP connection after its HTTP request has ended: nothing reads it until
	the hub sees it readable (:meth:`watch`), and :meth:`close` ends it and frees its slot.
	The backends say how the hub watches a socket (:meth:`watch`, :meth:`unwatch`)."""

	def __init__(self, sock: Any, release: Callable[[], None]):
		self.sock = sock
		self.release = release
		self.closed = False

	def watch(self, function: Callable[[], None]) -> None:
		"""Call ``function`` in a new green thread once the socket is readable (data, the
		peer's end or an error), once."""
		raise NotImplementedError

	def unwatch(self) -> None:
		raise NotImplementedError

	def readable(self) -> bool:
		"""Whether a read would not wait: bytes, the peer's end or an error are there."""
		try:
			self.sock.fd.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
			return True
		except BlockingIOError:
			return False
		except OSError:
			return True

	def close(self, farewell: Callable[[], None] | None = None) -> None:
		"""Close the connection, once, after ``farewell`` (the websocket's own close, which
		sends the closing frame): the hub stops watching it first, so no watcher outlives
		its file descriptor."""
		if self.closed:
			return
		self.closed = True
		self.unwatch()
		try:
			if farewell is not None:
				farewell()
		finally:
			try:
				self.sock.shutdown(socket.SHUT_RDWR)
			except OSError:
				pass
			self.close_socket()
			self.release()

	def close_socket(self) -> None:
		self.sock.close()


class EventletDetached(Detached):
	"""A connection of the eventlet backend's HTTP server; ``sock`` is eventlet's green socket."""

	def __init__(self, sock: Any, release: Callable[[], None]):
		super().__init__(sock, release)
		self.listener: Any = None

	@staticmethod
	def possible(hub: Any = None) -> bool:
		"""Whether the hub (eventlet's, by default) has the readiness listeners used here."""
		if hub is None:
			from eventlet import hubs

			hub = hubs.get_hub()
		return all(hasattr(hub, name) for name in ("add", "remove", "READ"))

	def watch(self, function: Callable[[], None]) -> None:
		from eventlet import hubs, spawn_n

		hub = hubs.get_hub()

		def ready(*_: Any) -> None:  # in the hub: must not block
			self.unwatch()
			spawn_n(function)

		self.listener = hub.add(hub.READ, self.sock.fileno(), ready, ready, lambda *_: None)

	def unwatch(self) -> None:
		if self.listener is not None:
			from eventlet import hubs

			hubs.get_hub().remove(self.listener)
			self.listener = None


class GeventDetached(Detached):
	"""A connection of gevent's WSGI server. gevent-websocket reads frames through the
	request's buffered reader (``rfile``), which may already hold the client's next message:
	that counts as readable, and the reader is closed with the socket."""

	def __init__(self, sock: Any, rfile: Any, release: Callable[[], None]):
		super().__init__(sock, release)
		self.rfile = rfile
		self.watcher: Any = None

	@staticmethod
	def possible(hub: Any = None) -> bool:
		"""Whether gevent's loop (the current hub's, by default) has the io watchers used here."""
		if hub is None:
			import gevent

			hub = gevent.get_hub()
		return hasattr(getattr(hub, "loop", None), "io")

	def watch(self, function: Callable[[], None]) -> None:
		import gevent

		if self.watcher is None:
			self.watcher = gevent.get_hub().loop.io(self.sock.fileno(), 1)

		def ready() -> None:  # in the hub: must not block
			self.watcher.stop()
			gevent.spawn_raw(function)

		self.watcher.start(ready)

	def unwatch(self) -> None:
		if self.watcher is not None:
			self.watcher.stop()
			self.watcher.close()
			self.watcher = None

	def readable(self) -> bool:
		"""Whether the reader holds bytes or the kernel has some. The peer's end reads as
		nothing here; the watcher sees it at once."""
		timeout = self.sock.gettimeout()
		self.sock.settimeout(0)  # the buffered reader then takes what the kernel has, or nothing
		try:
			return bool(self.rfile.peek(1))
		except OSError:
			return True
		finally:
			self.sock.settimeout(timeout)

	def close_socket(self) -> None:
		# The reader holds a reference that keeps the descriptor open past the socket's close.
		self.rfile.close()
		self.sock.close()
