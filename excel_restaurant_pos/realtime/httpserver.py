"""eventlet's HTTP server as the eventlet backend runs it.

eventlet's WSGI server gives each connection a green thread from a bounded pool, keeps it
for as long as the connection's requests last, and shuts the socket when that green thread
ends. For an upgraded websocket that is the connection's whole life: some 15 KiB of green
thread, HTTP request and buffers that an idle websocket keeps only to wait for its next
message. So a websocket is detached once upgraded (:meth:`HttpProtocol.detach`): its
request ends, its green thread and HTTP state go, and the socket stays open, watched by
the hub, which starts a green thread only when the client sends something
(:class:`Detached`). The connection keeps its slot of ``max_connections`` until it closes
(:class:`ConnectionSlots`).

What this uses of eventlet beyond its documented API: the protocol's ``conn_state`` (the
server shuts and closes the socket it holds when the request's green thread ends) and the
hub's ``add``/``remove`` of readiness listeners. Without them (another release) nothing is
detached and the websocket is read by its request's green thread, as before.
"""

from __future__ import annotations

import io
import socket
import socketserver
from collections.abc import Callable
from typing import Any

#: The environ key under which a request that may be detached finds how to do it.
DETACH = "excel_restaurant_pos.detach"


class SocketWriter:
	"""A connection's response writer with no buffer of its own: eventlet's HTTP protocol
	hands it a whole response (or chunk) at a time with ``writelines``, sent here in one
	``sendall``, so a buffer kept between responses saves nothing and costs 16 KiB for the
	life of every websocket."""

	closed = False

	def __init__(self, sock: Any):
		self.sock = sock

	def write(self, data: bytes) -> int:
		self.sock.sendall(data)
		return len(data)

	def writelines(self, lines: Any) -> None:
		self.sock.sendall(b"".join(lines))

	def flush(self) -> None:
		pass

	def close(self) -> None:
		self.closed = True


class ConnectionSlots:
	"""The pool eventlet's WSGI server spawns each connection's green thread from (its
	``custom_pool``): at most ``size`` connections at once, the accept loop waiting for a
	free slot as with eventlet's own pool. A detached connection keeps its slot after its
	green thread ends, until it closes."""

	def __init__(self, size: int):
		import eventlet.semaphore

		self.free = eventlet.semaphore.Semaphore(size)
		self.threads: set[Any] = set()
		#: Green threads whose slot passed to their detached connection.
		self.kept: set[Any] = set()

	def spawn(self, function: Callable, *args: Any) -> Any:
		import eventlet

		self.free.acquire()
		thread = eventlet.spawn(function, *args)
		self.threads.add(thread)
		thread.link(self._ended)
		return thread

	def _ended(self, thread: Any) -> None:
		self.threads.discard(thread)
		if thread in self.kept:
			self.kept.discard(thread)
		else:
			self.free.release()

	def keep(self) -> Callable[[], None]:
		"""Keep the calling green thread's slot after it ends; the function returned frees
		it, to be called once (:meth:`Detached.close` is)."""
		import eventlet

		self.kept.add(eventlet.getcurrent())
		return self.free.release

	def waitall(self) -> None:
		"""Wait for every request green thread (eventlet's server does as it stops)."""
		for thread in list(self.threads):
			try:
				thread.wait()
			except Exception:
				pass


class Detached:
	"""A websocket's TCP connection after its HTTP request has ended: nothing reads it until
	the hub sees it readable (:meth:`watch`), and :meth:`close` ends it and frees its slot."""

	def __init__(self, sock: Any, release: Callable[[], None]):
		self.sock = sock
		self.release = release
		self.listener: Any = None
		self.closed = False

	def watch(self, function: Callable[[], None]) -> None:
		"""Call ``function`` in a new green thread once the socket is readable (data, the
		peer's end or an error), once."""
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
		sends the closing frame and closes the socket): the hub stops watching it first,
		so no listener outlives its file descriptor."""
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
			self.sock.close()
			self.release()


def detach_possible(protocol: Any) -> bool:
	"""Whether eventlet's protocol and hub have what detaching uses (see the module's
	docstring)."""
	from eventlet import hubs

	hub = hubs.get_hub()
	conn_state = getattr(protocol, "conn_state", None)
	return (
		isinstance(conn_state, list)
		and len(conn_state) == 3
		and conn_state[1] is protocol.connection
		and hasattr(protocol.connection, "fd")
		and all(hasattr(hub, name) for name in ("add", "remove", "READ"))
	)


class _Released:
	"""What eventlet's server shuts and closes when a detached request's green thread ends,
	instead of the socket, which lives on."""

	def shutdown(self, *_: Any) -> None:
		pass

	def close(self) -> None:
		pass


def http_protocol(slots: ConnectionSlots | None = None) -> type:
	"""eventlet's HTTP protocol, with Nagle's algorithm off (see ``backend.no_delay``),
	writing with :class:`SocketWriter`, reading through a smaller buffer, and, given the
	server's ``slots``, offering its websockets a way out of the request (``environ[DETACH]``)
	(for the ``protocol`` argument of ``eventlet.wsgi.server``). A connection whose writer is
	not the buffered file eventlet makes today (TLS, a future eventlet) keeps eventlet's own."""
	import eventlet.wsgi

	from excel_restaurant_pos.realtime.backend import no_delay

	class HttpProtocol(eventlet.wsgi.HttpProtocol):
		#: The read buffer: 2 KiB holds a typical request's headers; longer ones take
		#: another read, not more memory on every connection.
		rbufsize = 2048
		detached: Detached | None = None

		def setup(self) -> None:
			super().setup()
			no_delay(self.connection)
			if isinstance(self.wfile, io.BufferedWriter) and hasattr(self.connection, "sendall"):
				self.wfile.close()  # the raw socket stays open: the protocol closes it at the end
				self.wfile = SocketWriter(self.connection)

		def get_environ(self) -> dict:
			environ = super().get_environ()
			if slots is not None:
				environ[DETACH] = self.detach
			return environ

		def detach(self) -> Detached | None:
			"""Let the connection outlive this request: when the request ends, its socket
			stays open and keeps its slot, and the HTTP state goes (the environ lets go of
			this protocol). Called by the websocket handler once the upgrade is done;
			``None`` where eventlet lacks what it takes (the connection stays in the request)."""
			if not detach_possible(self):
				return None
			self.detached = Detached(self.connection, slots.keep())
			self.conn_state[1] = _Released()
			for key in ("eventlet.set_idle", DETACH):
				self.environ.pop(key, None)
			self.close_connection = True
			return self.detached

		def finish(self) -> None:
			if self.detached is None:
				super().finish()
				return
			try:  # the files go (with the read buffer); the socket stays
				socketserver.StreamRequestHandler.finish(self)
			except OSError:
				pass

	return HttpProtocol
