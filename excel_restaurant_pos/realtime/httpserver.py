"""The eventlet backend's HTTP server: HTTP/1.1 on httptools, websockets that leave it.

Why not eventlet's own WSGI server: a long-polling client makes an HTTP request for every
event it receives, and eventlet's server spends most of that request's CPU in pure Python
(``http.server``'s request line and the e-mail parser that reads the headers, its environ,
its response writer). Here llhttp, the C parser Node's HTTP server uses (through
``httptools``, as uvicorn does), reads the request, and the response goes out in one
``sendall``.

What it does, as eventlet's server did for this app: one green thread per connection, at
most ``max_connections`` of them (the accept loop waits for a free slot); a connection silent
for ``http_timeout`` before its request is complete, or between kept-alive requests, is
closed; bodies are held whole, up to the largest client message, and answered 413 beyond
it; headers are bounded (:data:`MAX_HEADER_BYTES`, 431 beyond); a request the parser
refuses is answered 400 and the connection closed. The environ is PEP 3333's, with
eventlet's ``eventlet.input``, whose ``get_socket()`` eventlet's and Engine.IO's websockets
take the connection with; eventlet's websocket then marks the request handled
(``eventlet.wsgi.WSGI_LOCAL``), as it does for eventlet's own server, and no response is
written.

A websocket leaves the server once upgraded (``environ[DETACH]``, see
:mod:`~excel_restaurant_pos.realtime.detached`): its connection's green thread ends and it
keeps its slot until it closes.
"""

from __future__ import annotations

import io
import logging
import socket
import sys
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools

from excel_restaurant_pos.realtime.config import Config
from excel_restaurant_pos.realtime.detached import DETACH, EventletDetached

#: The request line and headers of one request, at most: room for an oversized Bearer
#: header, so that it is refused with a reason rather than a 431.
MAX_HEADER_BYTES = 65536

#: How much one read takes from a connection.
READ_SIZE = 65536

#: Seconds a refused request's connection waits for more of what its client sends.
LINGER = 1.0

#: Header names (as clients spell them) whose environ key is kept, and the longest kept: a
#: client sends the same few names on every request, a hostile one cannot grow the table.
KNOWN_NAMES, KNOWN_NAME_BYTES = 1024, 64
_environ_keys: dict[bytes, str] = {}

log = logging.getLogger("excel_restaurant_pos.realtime.http")


def environ_key(name: bytes) -> str:
	"""A request header's key in the environ (``HTTP_USER_AGENT``, ``CONTENT_TYPE``), or
	``""`` for a name with an underscore: it would pass for its dashed twin (``X_User``
	for ``X-User``), so it is dropped. Worked out once per name a client spells."""
	key = _environ_keys.get(name)
	if key is None:
		key = name.decode("latin-1").upper()
		key = "" if "_" in key else key.replace("-", "_")
		if key and key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
			key = "HTTP_" + key
		if len(name) <= KNOWN_NAME_BYTES and len(_environ_keys) < KNOWN_NAMES:
			_environ_keys[name] = key
	return key


class Input(io.BytesIO):
	"""A request's body (``wsgi.input``) and the connection's socket (``eventlet.input``):
	eventlet's websocket, once it calls :meth:`get_socket`, owns the connection, so the
	server writes no response of its own."""

	def __init__(self, body: bytes, sock: Any):
		super().__init__(body)
		self.sock = sock
		self.taken = False

	def get_socket(self) -> Any:
		self.taken = True
		return self.sock


class Request:
	"""One request as the parser read it; its headers are (environ key, value) pairs, the
	keys as :func:`environ_key` names them."""

	__slots__ = ("method", "url", "headers", "body", "version", "keep_alive")

	def __init__(self, method: bytes, url: bytes, headers: list, body: bytes, version: str, keep_alive: bool):
		self.method, self.url, self.headers, self.body = method, url, headers, body
		self.version, self.keep_alive = version, keep_alive


class HttpServer:
	"""Serves ``app`` on the listening ``sock`` (see the module's docstring)."""

	def __init__(self, sock: socket.socket, app: Callable, config: Config):
		import eventlet.semaphore
		import eventlet.wsgi

		self.sock, self.app, self.config = sock, app, config
		self.slots = eventlet.semaphore.Semaphore(config.max_connections)
		self.detachable = EventletDetached.possible()
		#: Where eventlet's websocket says it had the connection, so that the response Engine.IO
		#: makes of its return value is not written (eventlet's own server reads it there).
		self.handled = eventlet.wsgi.WSGI_LOCAL
		name = sock.getsockname()
		host, port = (name[0], str(name[1])) if isinstance(name, tuple) else ("localhost", "")
		#: What every request's environ holds.
		self.environ = {
			"SCRIPT_NAME": "",
			"SERVER_NAME": host,
			"SERVER_PORT": port,
			"wsgi.version": (1, 0),
			"wsgi.url_scheme": "http",
			"wsgi.errors": sys.stderr,
			"wsgi.multithread": True,
			"wsgi.multiprocess": False,
			"wsgi.run_once": False,
		}
		self._date = (0, b"")

	def serve_forever(self) -> None:
		"""Accept connections, each in a green thread of its own, while a slot is free."""
		import eventlet

		while True:
			self.slots.acquire()
			try:
				client, address = self.sock.accept()
			except OSError as exc:
				self.slots.release()
				if self.sock.fileno() < 0:
					return  # the listening socket was closed
				log.warning("cannot accept a connection: %s", exc)
				eventlet.sleep(0.1)  # out of file descriptors, say: let some close
				continue
			eventlet.spawn_n(Connection(self, client, address).run)

	def date(self) -> bytes:
		"""The ``Date`` header's value, formatted once a second."""
		now = int(time.time())
		if self._date[0] != now:
			self._date = (now, formatdate(now, usegmt=True).encode())
		return self._date[1]


class Connection:
	"""One client's connection: its green thread reads requests with the parser (whose
	callbacks are the ``on_*`` methods) and answers them in order, until the connection
	closes, or a websocket takes it (:meth:`detach`)."""

	def __init__(self, server: HttpServer, sock: Any, address: Any):
		self.server, self.sock = server, sock
		self.remote = (str(address[0]), str(address[1])) if isinstance(address, tuple) else ("", "")
		self.parser = httptools.HttpRequestParser(self)
		#: Complete requests not yet answered (a client may send several at once).
		self.requests: list[Request] = []
		#: The status line of an answer that refuses the request and ends the connection.
		self.refusal: str | None = None
		self.detached: EventletDetached | None = None
		self.continue_expected = False
		self.on_message_begin()

	# -- the parser's callbacks -------------------------------------------------------------

	def on_message_begin(self) -> None:
		self.url, self.headers, self.body = b"", [], []
		self.header_bytes = self.body_bytes = 0

	def on_url(self, url: bytes) -> None:
		self.url += url
		self._count_header(len(url))

	def on_header(self, name: bytes, value: bytes) -> None:
		key = environ_key(name)
		self.headers.append((key, value))
		self._count_header(len(name) + len(value))
		if key == "HTTP_EXPECT" and value.lower() == b"100-continue":
			self.continue_expected = True
		elif key == "CONTENT_LENGTH" and value.isdigit() and int(value) > self.server.config.max_payload:
			self.refusal = "413 Content Too Large"  # before the client sends it

	def _count_header(self, size: int) -> None:
		self.header_bytes += size
		if self.header_bytes > MAX_HEADER_BYTES:
			self.refusal = "431 Request Header Fields Too Large"

	def on_body(self, body: bytes) -> None:
		self.body_bytes += len(body)
		if self.body_bytes > self.server.config.max_payload:
			self.refusal = "413 Content Too Large"
		elif self.refusal is None:
			self.body.append(body)

	def on_message_complete(self) -> None:
		parser = self.parser
		self.continue_expected = False
		self.requests.append(Request(
			parser.get_method(), self.url, self.headers, b"".join(self.body), parser.get_http_version(), parser.should_keep_alive()
		))

	# -- the connection ---------------------------------------------------------------------

	def run(self) -> None:
		sock = self.sock
		try:
			sock.settimeout(self.server.config.http_timeout)
			open_ = True
			while open_:
				try:
					data = sock.recv(READ_SIZE)
				except OSError:  # silent for http_timeout, or reset
					break
				if not data:
					break
				upgrade = False
				try:
					self.parser.feed_data(data)
				except httptools.HttpParserUpgrade:
					upgrade = True
				except httptools.HttpParserError:
					self.refusal = self.refusal or "400 Bad Request"
				if self.refusal is not None:
					self.refuse(self.refusal)
					break
				if self.continue_expected:  # the client waits for this before it sends the body
					self.continue_expected = False
					sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
				while open_ and self.requests:
					open_ = self.answer(self.requests.pop(0))
				# After an upgrade the parser reads no more: a websocket took the connection,
				# or the request was answered as plain HTTP, and the connection ends.
				open_ = open_ and not upgrade
		except (ConnectionResetError, BrokenPipeError) as exc:
			# A client that left (a lost network, a closed tab): nothing went wrong here.
			log.debug("connection from %s lost: %s", self.remote[0], exc)
		except Exception:
			log.exception("error on an HTTP connection")
		finally:
			self.parser = None  # it holds this connection (its callbacks): no cycle left for the GC
			if self.detached is None:
				self.close()

	def close(self) -> None:
		try:
			self.sock.close()
		finally:
			self.server.slots.release()

	def detach(self) -> EventletDetached:
		"""Let the websocket outlive this green thread: the connection keeps its socket and
		its slot until :meth:`~excel_restaurant_pos.realtime.detached.Detached.close`."""
		self.detached = EventletDetached(self.sock, self.server.slots.release)
		return self.detached

	def environ(self, request: Request, wsgi_input: Input) -> dict:
		url = request.url
		if not url.startswith(b"/"):  # absolute form (a proxy's), or "*"
			try:
				parsed = httptools.parse_url(url)
				url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
			except httptools.HttpParserInvalidURLError:
				url = b"/"
		path, _, query = url.partition(b"#")[0].partition(b"?")
		environ = dict(self.server.environ)
		environ["REQUEST_METHOD"] = request.method.decode("ascii")
		environ["PATH_INFO"] = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
		environ["QUERY_STRING"] = query.decode("latin-1")
		environ["SERVER_PROTOCOL"] = "HTTP/" + request.version
		environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = self.remote
		environ["wsgi.input"] = environ["eventlet.input"] = wsgi_input
		for key, value in request.headers:
			if key:
				value = value.decode("latin-1")
				environ[key] = f"{environ[key]},{value}" if key in environ else value
		if request.body or "CONTENT_LENGTH" in environ:  # a chunked body is whole by now
			environ["CONTENT_LENGTH"] = str(len(request.body))
		if self.server.detachable:
			environ[DETACH] = self.detach
		return environ

	def answer(self, request: Request) -> bool:
		"""Run the app for ``request`` and send its response; whether the connection stays
		open for another request."""
		wsgi_input = Input(request.body, self.sock)
		environ = self.environ(request, wsgi_input)
		response: list = []

		def start_response(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
			if exc_info is not None and response:
				raise exc_info[1].with_traceback(exc_info[2])
			response[:] = [status, headers]
			return chunks.append

		chunks: list[bytes] = []
		try:
			result = self.server.app(environ, start_response)
			try:
				chunks.extend(result)
			finally:
				if hasattr(result, "close"):
					result.close()
		except Exception:
			log.exception("error answering %s %s", environ["REQUEST_METHOD"], environ["PATH_INFO"])
			if wsgi_input.taken:
				return False
			response.clear()  # whatever was started, the answer is a 500
		else:
			# (A connection's green thread answers no request after a websocket had it, so
			# the flag, kept per green thread, needs no reset.)
			if wsgi_input.taken and (getattr(self.server.handled, "already_handled", False) or not response):
				return False  # a websocket had the connection: it has ended, or lives on detached
			if not response:
				log.error("%s %s: the app gave no response", environ["REQUEST_METHOD"], environ["PATH_INFO"])
		if not response:
			request.keep_alive = False
			response[:] = ["500 Internal Server Error", [("Content-Type", "text/plain")]]
			chunks = [b"Internal Server Error"]
		status, headers = response
		self.sock.sendall(self.response(request, status, headers, b"".join(chunks)))
		return request.keep_alive

	def response(self, request: Request, status: str, headers: list, body: bytes) -> bytes:
		"""The response's bytes: status line, headers (``Content-Length``, ``Date`` and
		``Connection`` added where the app left them out) and body. Clears
		``request.keep_alive`` when the app asked to close."""
		out = [b"HTTP/1.1 ", status.encode("latin-1"), b"\r\n"]
		length = False
		for name, value in headers:
			lower = name.lower()
			if lower == "content-length":
				length = True
			elif lower == "connection" and value.lower() == "close":
				request.keep_alive = False
			out += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
		code = status[:3]
		if not length and code not in ("204", "304") and not code.startswith("1"):
			out += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
		if not request.keep_alive:
			out.append(b"Connection: close\r\n")
		elif request.version == "1.0":
			out.append(b"Connection: keep-alive\r\n")
		out += (b"Date: ", self.server.date(), b"\r\n\r\n")
		if request.method != b"HEAD":
			out.append(body)
		return b"".join(out)

	def refuse(self, status: str) -> None:
		"""Answer a request that will not be read to its end, and let the connection go.

		What the client is still sending is read and dropped for a moment (as nginx's
		lingering close does): closed with unread bytes, the socket would be reset, and the
		reset can reach the client before the answer does."""
		sock = self.sock
		request = Request(b"GET", b"", [], b"", "1.1", keep_alive=False)
		try:
			sock.sendall(self.response(request, status, [("Content-Type", "text/plain")], status.encode()))
			sock.shutdown(socket.SHUT_WR)
			sock.settimeout(LINGER)
			dropped = 0
			while dropped < self.server.config.max_payload + MAX_HEADER_BYTES and (data := sock.recv(READ_SIZE)):
				dropped += len(data)
		except OSError:
			pass
