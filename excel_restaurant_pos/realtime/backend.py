"""The green-thread libraries the server runs on: eventlet (the default) and gevent.

The server, its handlers, the bridge and the transport are written once, against what
python-socketio and Engine.IO give every backend (background tasks, sleeps, events, the
driver's queue and thread). What differs between the two is here (or reached from here),
and nowhere else:

* patching the standard library, once, at the entry point and before anything else;
* the HTTP server that accepts connections, and how it bounds their number and their
  silence before a request is complete (the eventlet backend's, on httptools, with
  websockets that leave it once upgraded, is :mod:`~excel_restaurant_pos.realtime.httpserver`);
* how a websocket leaves the HTTP server once upgraded
  (:mod:`~excel_restaurant_pos.realtime.detached`);
* the websocket. eventlet's has the send lock and frame packer the transport's direct writes
  use (:mod:`~excel_restaurant_pos.realtime.transport`). gevent's is gevent-websocket's, the
  handler Engine.IO's gevent driver takes and Frappe's own Python realtime server runs: it
  has neither, so they are added around it here;
* where a connection's TCP socket is found in the WSGI environ (the stall rule reads what its
  peer acknowledged; a cut shuts it).

Why two: eventlet's maintainers discourage new use and Frappe's next release runs its
realtime server on gevent, while eventlet is what the benches of today run and what the
direct writes are built on. Importing this module imports neither library, nor anything
either patches but ``socket`` (patched in place), so the entry point can import it first.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from excel_restaurant_pos.realtime.config import Config, ConfigError

#: Seconds the kernel holds a new TCP connection that has sent nothing yet (see :func:`listen`).
DEFER_ACCEPT_S = 1


class Backend:
	"""What the server needs from a green-thread library. ``name`` is Engine.IO's async mode."""

	name: str

	def monkey_patch(self) -> None:
		"""Patch the standard library: sockets, locks, sleeps and signals turn green."""
		raise NotImplementedError

	def wsgi_server(self, sock: socket.socket, app: Callable, config: Config, accepting: Callable[[], bool]) -> Callable[[], None]:
		"""A function that serves ``app`` on ``sock`` until the process ends. ``accepting``
		says whether new clients are taken: while it is false ``app`` answers every
		handshake 503, and no websocket may be upgraded before it has (a load balancer
		then sends the client to another process)."""
		raise NotImplementedError

	def direct_websocket(self, websocket: Any) -> Any | None:
		"""The websocket Engine.IO hands its handler, as one whose frames the transport may
		write itself (a send lock every writer takes, a frame packer, the raw socket; see
		:func:`~excel_restaurant_pos.realtime.transport.direct_writes_possible`), or ``None``
		when it cannot be: then Engine.IO's writer sends every packet."""
		return None

	def tcp_socket(self, environ: dict) -> Any:
		"""The client's TCP socket behind a websocket request; ``None`` when not found."""
		return None


class Eventlet(Backend):
	name = "eventlet"

	def monkey_patch(self) -> None:
		import warnings

		# Eventlet announces its maintenance mode on import; operators cannot act on that.
		warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
		import eventlet

		eventlet.monkey_patch()

	def wsgi_server(self, sock: socket.socket, app: Callable, config: Config, accepting: Callable[[], bool]) -> Callable[[], None]:
		from excel_restaurant_pos.realtime.httpserver import HttpServer

		return HttpServer(sock, app, config).serve_forever

	def direct_websocket(self, websocket: Any) -> Any | None:
		from eventlet.websocket import RFC6455WebSocket

		from excel_restaurant_pos.realtime.transport import direct_writes_possible

		return websocket if isinstance(websocket, RFC6455WebSocket) and direct_writes_possible(websocket) else None

	def tcp_socket(self, environ: dict) -> Any:
		wsgi_input = environ.get("eventlet.input")
		return wsgi_input.get_socket() if wsgi_input is not None else None


class Gevent(Backend):
	name = "gevent"

	def monkey_patch(self) -> None:
		from gevent import monkey

		monkey.patch_all()

	def wsgi_server(self, sock: socket.socket, app: Callable, config: Config, accepting: Callable[[], bool]) -> Callable[[], None]:
		import logging

		import gevent
		from gevent.pool import Pool
		from geventwebsocket.handler import WebSocketHandler
		from geventwebsocket.server import WebSocketServer

		from excel_restaurant_pos.realtime.detached import DETACH, GeventDetached

		detachable = GeventDetached.possible()

		class Handler(WebSocketHandler):
			"""gevent-websocket's handler, with the silence before a complete request bounded
			as eventlet's ``socket_timeout`` does (the websocket sets its own once upgraded),
			and a websocket that may leave the server once upgraded (see
			:mod:`~excel_restaurant_pos.realtime.detached`)."""

			detached: GeventDetached | None = None

			def handle(self) -> None:
				self.socket.settimeout(config.http_timeout)
				super().handle()
				if self.detached is not None:
					# What the request kept that a detached websocket never reads again:
					# gevent-websocket reads only the server from its handler. (The environ
					# stays: Engine.IO keeps it for the session's connect handlers.)
					server = self.server
					vars(self).clear()
					self.server = server

			def detach(self) -> GeventDetached:
				"""Let the websocket outlive this green thread: its slot in the pool passes to a
				placeholder that the connection's close discards, and the server leaves its
				socket open."""
				pool, placeholder = self.server.pool, gevent.Greenlet()
				pool.discard(gevent.getcurrent())
				pool.add(placeholder, blocking=False)  # takes the slot just given back: never waits
				self.server.kept_open.add(id(self.socket))
				self.detached = GeventDetached(self.socket, self.rfile, lambda: pool.discard(placeholder))
				return self.detached

			def run_websocket(self) -> None:
				# gevent-websocket's, without its table of clients (nothing here reads it),
				# offering the websocket a way out of the server, and leaving it open once
				# it has taken it.
				if detachable:
					self.environ[DETACH] = self.detach
				try:
					list(self.application(self.environ, lambda status, headers, exc_info=None: []))
				finally:
					if self.detached is not None:
						self.socket = None  # gevent's handler would drain and close it
					elif not self.websocket.closed:
						self.websocket.close()
					self.environ["wsgi.websocket"] = self.websocket = None

			def log_request(self) -> None:
				pass  # one line per poll is noise; /metrics counts what matters

			def _handle_client_error(self, ex: Exception) -> Any:
				# gevent's hook for a request it could not read answers 400 and prints a
				# traceback; a peer that went silent or away mid-request gets neither, as on
				# eventlet: the connection is closed. (Without the hook, gevent's answer stands.)
				if isinstance(ex, OSError):
					return None
				return super()._handle_client_error(ex)

		class Server(WebSocketServer):
			"""gevent-websocket's server, leaving the sockets of detached websockets open."""

			def __init__(self, *args: Any, **kwargs: Any):
				super().__init__(*args, **kwargs)
				#: The sockets of detached websockets, by ``id``, until their request ends.
				self.kept_open: set[int] = set()

			def do_close(self, sock: Any, *args: Any) -> None:
				if id(sock) in self.kept_open:
					self.kept_open.discard(id(sock))
				else:
					super().do_close(sock, *args)

		class Application:
			"""The app, as gevent-websocket looks for it when a websocket closes: with a
			``current_app`` whose ``on_close`` it calls. Without one it builds a class for
			every such call, each in reference cycles that only the cyclic collector frees."""

			def __init__(self, app: Callable):
				self.app = app

			def __call__(self, environ: dict, start_response: Callable) -> Any:
				return self.app(environ, start_response)

			@property
			def current_app(self) -> Application:
				return self

			def on_close(self, *reason: Any) -> None:
				pass

		server = Server(
			sock,
			Application(app),
			spawn=Pool(config.max_connections),
			handler_class=Handler,
			log=None,
			error_log=logging.getLogger("excel_restaurant_pos.realtime.http"),
			# gevent-websocket upgrades a websocket before it calls the app, and then
			# ignores the app's answer: a shutting-down process would take the client only
			# to drop it. The hook lets the app answer such a request as plain HTTP.
			pre_start_hook=lambda handler: not accepting(),
		)
		return server.serve_forever

	def tcp_socket(self, environ: dict) -> Any:
		websocket = environ.get("wsgi.websocket")
		handler = getattr(websocket, "handler", None)
		return getattr(handler, "socket", None)

	def direct_websocket(self, websocket: Any) -> Any | None:
		# Engine.IO's gevent wrapper keeps gevent-websocket's socket as ``_sock``; gevent's
		# socket keeps the raw one, non-blocking, as ``_sock``. Without either (another
		# release), Engine.IO's writer sends every packet.
		frames = getattr(websocket, "_sock", None)
		green = getattr(getattr(frames, "handler", None), "socket", None)
		if getattr(green, "_sock", None) is None or not hasattr(frames, "raw_write"):
			return None
		return _GeventWebSocket(websocket, frames, green)


class _GeventWebSocket:
	"""gevent-websocket's socket with what direct writes use, as eventlet's websocket has
	them: one send lock that every write takes (gevent-websocket's own frames, pongs and
	close included, through its ``raw_write``), a frame packer and the raw socket.
	gevent-websocket frames without compression, so ``extensions`` is empty."""

	extensions = None

	def __init__(self, wrapper: Any, frames: Any, green: Any):
		from gevent.lock import Semaphore
		from geventwebsocket.websocket import Header

		self.wrapper = wrapper
		self.encode_header = Header.encode_header
		self._sendlock = Semaphore()
		self.socket = _RawSocket(green)
		sendall = frames.raw_write

		def locked_write(data: bytes) -> None:
			with self._sendlock:
				sendall(data)

		frames.raw_write = locked_write

	def _pack_message(self, message: str | bytes) -> bytes:
		"""A final, unmasked frame as gevent-websocket writes one: text for ``str``, binary
		for ``bytes``."""
		text = isinstance(message, str)
		payload = message.encode() if text else bytes(message)
		return self.encode_header(True, 0x1 if text else 0x2, b"", len(payload), 0) + payload

	def send(self, message: str | bytes) -> None:
		self.wrapper.send(message)

	def wait(self) -> Any:
		return self.wrapper.wait()

	def close(self) -> None:
		self.wrapper.close()


class _RawSocket:
	"""The client's socket for direct writes: ``fd`` sends without waiting (the raw,
	non-blocking socket), ``sendall`` waits as a green thread."""

	def __init__(self, green: Any):
		self.fd = green._sock
		self.sendall = green.sendall
		self.settimeout = green.settimeout


BACKENDS: dict[str, type[Backend]] = {"eventlet": Eventlet, "gevent": Gevent}
#: What each backend needs installed, for the error that says so.
PACKAGES = {"eventlet": "eventlet", "gevent": "gevent gevent-websocket"}


def load(name: str) -> Backend:
	"""The backend called ``name``, or a :class:`ConfigError` when it is not installed."""
	import importlib.util

	for package in PACKAGES[name].split():
		if importlib.util.find_spec(package.replace("-", "")) is None:
			raise ConfigError(
				f"async mode {name} (excel_restaurant_pos_socketio_async_mode) needs {PACKAGES[name]}: "
				f"pip install 'excel_restaurant_pos[{name}]'"
			)
	return BACKENDS[name]()


def listen(config: Config) -> socket.socket:
	"""The listening socket (green once the backend patched ``socket``), or a
	:class:`ConfigError` that names the key at fault.

	Nagle's algorithm is off, as in Node's HTTP server, for every connection it accepts
	(they inherit it, which saves a system call for each). With it on, a second small write
	waits until the client acknowledges the first, and clients delay that acknowledgement by
	40 ms or more: a websocket answer that goes out as two frames (an acknowledgement and an
	event), or a response whose headers and body are two writes (gevent's), then arrives 40
	ms late. Every write here is a whole frame or a whole response, so nothing is gained by
	holding one back.

	On Linux a TCP connection is accepted only once its first bytes have arrived, or after
	``DEFER_ACCEPT_S`` (``TCP_DEFER_ACCEPT``, nginx's ``deferred``): its green thread then
	reads its request at once instead of first waiting for it in the hub, which was a fifth
	of the CPU of a long-poll that opens a connection for each request. A connection that
	sends nothing (a load balancer's TCP check, a port scan) takes no slot and no green
	thread until then, and is closed after ``http_timeout`` as before once it has one."""
	try:
		if config.uds:
			if os.path.exists(config.uds):
				os.unlink(config.uds)
			sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
			where: Any = config.uds
		else:
			family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
			sock = socket.socket(family, socket.SOCK_STREAM)
			sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
			sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
			if hasattr(socket, "TCP_DEFER_ACCEPT"):
				sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT_S)
			where = (config.host, config.port)
		try:
			sock.bind(where)
			sock.listen(4096)
		except OSError:
			sock.close()
			raise
		return sock
	except OSError as exc:
		where = f"unix socket {config.uds} (excel_restaurant_pos_socketio_uds)" if config.uds else (
			f"{config.host}:{config.port} (excel_restaurant_pos_socketio_port)"
		)
		raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
