"""The realtime server: python-socketio on eventlet or gevent, its HTTP endpoints and its lifecycle.

:class:`RealtimeServer` knows sockets and nothing about Redis formats: the bridge hands it
:class:`~excel_restaurant_pos.realtime.bridge.Delivery` values and it emits them to its own
clients. :func:`serve` runs it until SIGTERM or SIGINT, then drains:

1. new handshakes are answered 503 at once (clients retry elsewhere or later);
2. the Redis bridge stops;
3. each client's transport is closed with an Engine.IO ``close`` packet, which the standard
   clients report as ``transport close`` and answer by reconnecting (a Socket.IO-level
   disconnect would switch their reconnection off); a long-polling client with packets
   still waiting gets them without it and reconnects when its next poll is refused;
4. the process exits 0 within ``shutdown_grace`` seconds.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import os
import resource
import secrets
import signal
import socket
import time
import types
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import socketio
from engineio import payload
from socketio import packet

from excel_restaurant_pos.auth import token_fingerprint
from excel_restaurant_pos.realtime import backend, events, log, metrics, packets, rooms, transport, utils
from excel_restaurant_pos.realtime.bridge import Bridge
from excel_restaurant_pos.realtime.collector import Collector, freeze_start_up_heap
from excel_restaurant_pos.realtime.config import Config
from excel_restaurant_pos.realtime.connect import TOO_MANY_CONNECTIONS, Authenticator, Refused, site_for, token_from
from excel_restaurant_pos.realtime.frappe_api import FrappeAPI
from excel_restaurant_pos.realtime.log import Delivery
from excel_restaurant_pos.realtime.manager import IndexedManager
from excel_restaurant_pos.realtime.presence import Presence
from excel_restaurant_pos.realtime.recovery import Recovery

logger = logging.getLogger("excel_restaurant_pos.realtime")
SWEEP_INTERVAL = 1.0
#: Connections of the process's command client to Redis (the readers have their own).
REDIS_CONNECTIONS = 128


#: A client's events waiting to be handled, past which the server stops reading it.
MAX_WAITING_EVENTS = 64


class WaitingEvents(collections.deque):
	"""One client's events waiting to be handled, oldest first, and the event its reader
	waits on while there are too many (``None`` when it is not waiting)."""

	__slots__ = ("room",)

	def __init__(self, events: Iterable[tuple] = ()) -> None:
		super().__init__(events)
		self.room: Any = None


class SocketServer(socketio.Server):
	"""python-socketio's server with the recovery protocol's ``pid`` in the CONNECT reply
	to a recovering socket, the existing sid as the answer to a repeated CONNECT, and a
	connection closed, as the reference server closes it, when its client sends a malformed
	packet. Without the private methods these override (a python-socketio release that
	renamed them), the reply simply has no ``pid`` (clients then start a new session at
	every reconnect), a malformed packet is logged with its traceback and dropped, as
	python-socketio does, and a client's events are handled in order by the green thread
	that reads it, which then reads nothing else until each is done; nothing else changes."""

	#: The recovering sockets' sessions by sid; the server sets its own (empty and read-only until then).
	sessions: Mapping[str, Any] = types.MappingProxyType({})

	def __init__(self, **kwargs: Any):
		super().__init__(**kwargs)
		#: eio_sid → the events of that client waiting for the green thread handling its events.
		self.waiting_events: dict[str, WaitingEvents] = {}

	def _handle_event(self, eio_sid: str, *event: Any) -> None:
		"""Queue a client's event behind those it sent before, for one green thread per busy
		client to handle in order. Handled by the green thread that reads the client, an
		event waiting on Frappe would leave the client's pongs unread, and the client would
		be dropped for not answering; in a green thread each, as python-socketio runs them,
		an event that waits on Redis is overtaken by the next. A client with
		:data:`MAX_WAITING_EVENTS` waiting is read no further until half of them are
		handled: sending faster than its events are handled fills no memory. (No other green
		thread runs between the look-up here and the append, nor between the handler's last
		look at the queue and its removal, so no event is left in a queue no one handles.)"""
		waiting = self.waiting_events.get(eio_sid)
		if waiting is None:
			waiting = self.waiting_events[eio_sid] = WaitingEvents([event])
			self.start_background_task(self._handle_in_order, eio_sid, waiting)
			return
		waiting.append(event)
		if len(waiting) > MAX_WAITING_EVENTS:
			waiting.room = self.eio.create_event()
			waiting.room.wait()

	def _handle_in_order(self, eio_sid: str, waiting: WaitingEvents) -> None:
		try:
			while waiting:
				event = waiting.popleft()
				if waiting.room is not None and len(waiting) <= MAX_WAITING_EVENTS // 2:
					waiting.room.set()
					waiting.room = None
				try:
					super()._handle_event(eio_sid, *event)
				except Exception:  # the client's next events are still handled
					logger.exception("event handler failed")
		finally:
			del self.waiting_events[eio_sid]
			if waiting.room is not None:
				waiting.room.set()

	def _handle_eio_message(self, eio_sid: str, data: str | bytes) -> None:
		"""Without this, each malformed packet is an error with a traceback in the log (and in
		``/health``) and the connection stays: a client could fill the log at will."""
		try:
			super()._handle_eio_message(eio_sid, data)
		except ValueError as exc:
			if not packets.from_client(exc):
				raise
			packets.report(eio_sid, exc)
			eio_socket = self.eio.sockets.get(eio_sid)
			if eio_socket is not None:  # without waiting: a long-poll's POST would wait for the next GET
				eio_socket.close(wait=False, abort=False)

	def _send_packet(self, eio_sid: str, pkt: Any) -> None:
		if pkt.packet_type == packet.CONNECT and isinstance(pkt.data, dict):
			session = self.sessions.get(pkt.data.get("sid"))
			if session is not None:
				pkt.data = {**pkt.data, "pid": session.pid}
		super()._send_packet(eio_sid, pkt)

	def _handle_connect(self, eio_sid: str, namespace: str, data: Any) -> None:
		"""A second CONNECT for a namespace this Engine.IO session has joined already is
		answered with that socket's sid, as Frappe's own server does: clients send it again
		after a transport blip, and python-socketio would answer ``Unable to connect``. (A
		python-socketio release without this private method gives that answer again.)"""
		namespace = namespace or "/"
		sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
		if sid is not None and self.manager.is_connected(sid, namespace):
			self._send_packet(eio_sid, self.packet_class(packet.CONNECT, {"sid": sid}, namespace=namespace))
			return
		super()._handle_connect(eio_sid, namespace, data)
#: A sweep this many seconds late means nothing else ran either: the process was blocked.
LOOP_BLOCKED = 0.5


class RealtimeServer:
	"""One process's Socket.IO server, its clients and its bridge."""

	def __init__(self, config: Config):
		from excel_restaurant_pos.realtime import handlers  # noqa: F401 -- registers the app's events

		self.config = config
		self.backend = backend.load(config.async_mode)
		self.frappe_api = FrappeAPI(config) if config.auth_mode == "frappe" else None
		self.auth = Authenticator(config, self.frappe_api)
		self.sio = SocketServer(
			async_mode=self.backend.name,
			client_manager=IndexedManager(),
			namespaces="*",
			cors_allowed_origins="*",  # origins are checked at connect, with a clear refusal
			logger=False,
			engineio_logger=False,
			serializer=packets.ClientPacket,
			max_http_buffer_size=config.max_payload,
			ping_interval=config.ping_interval,
			ping_timeout=config.ping_timeout,
			# A client's events are handled one after another, in the order it sent them, as
			# Node's server does (see SocketServer._handle_event): with a green thread each, two
			# status updates for one order reached the room the wrong way round whenever the
			# first waited on Redis.
			async_handlers=False,
		)
		# The official client sends everything it queued during a long-poll in one POST
		# (dozens of emits after a Wi-Fi drop); python-engineio refuses a body of more than
		# 16 packets. The body's size bounds it instead, as it bounds Node's server and a
		# websocket, where every packet is a frame of its own: a packet takes two bytes at least.
		payload.Payload.max_decode_packets = max(payload.Payload.max_decode_packets, config.max_payload // 2)
		self.unsent = transport.UnsentData(config.max_unsent_bytes, self._on_over_budget)
		self.budget_cut_pending = False
		#: When the sweep last found the process blocked (see :meth:`sweep_slow_clients`).
		self.loop_blocked_until = 0.0
		#: When a token may next need a warning or a cut (see :meth:`sweep_expiry`).
		self.next_expiry = 0.0
		#: Direct writes held while the log reader delivers one read's events (one send per client).
		self.writes = transport.WriteBatch()
		self.sio.eio._async = transport.engineio_overrides(self.sio.eio._async, self.unsent, self.backend, self.writes)
		self.heartbeat = transport.Heartbeat(self.sio.eio)
		self.sio.eio.sockets = transport.WatchedSockets(self.heartbeat, self.sio.eio.sockets)
		self.sio_app = socketio.WSGIApp(self.sio)
		self.clients: dict[str, events.Client] = {}
		self.user_connections: collections.Counter[tuple[str, str]] = collections.Counter()
		self.redis = _redis_client(config.redis_queue)
		#: This process, among those that share the Redis.
		self.process = secrets.token_hex(4)
		self.bridge = Bridge(config, self.redis, self.process, self.deliver, batch=self.writes.batch)
		self.recovery = Recovery(config, self.process, self.redis, self.bridge.positions, self.abort)
		self.presence = Presence(self.redis, self.process, {"url": config.local_url, "host": socket.gethostname(), "pid": os.getpid()})
		#: The last warnings and errors, listed by ``/health``.
		self.errors = metrics.RecentErrors()
		#: Sockets whose connection is counted in Redis (see ``_take_connection``).
		self.counted: set[str] = set()
		self.sio.sessions = self.sio.manager.sessions = self.recovery.live
		self.bridge.on_control = self.on_control
		self.sio.manager.on_connected = self.on_connected
		#: (site, scope) → the namespaces an event of that scope reaches.
		self.scopes = {
			(site, scope): rooms.namespaces_of_site(site, config.default_site, frappe_events=scope == "site")
			for site in config.sites
			for scope in log.SCOPES
		}
		self.draining = False
		self.stop_requested = False
		self.sio.on("connect", self.on_connect, namespace="*")
		self.sio.on("disconnect", self.on_disconnect, namespace="*")
		for event, handler in events.HANDLERS.items():
			self.sio.on(event, self._dispatcher(event, handler), namespace="*")
		self.sio.on("*", self.on_unknown_event, namespace="*")

	# -- connect flow ---------------------------------------------------------------------

	def on_connect(self, namespace: str, sid: str, environ: dict, auth: Any = None) -> bool | None:
		session = None
		try:
			site = site_for(namespace, self.config)
			if self.recovery.wants(auth, site):
				session = self.recovery.hold(sid, namespace, site)
			identity = self.auth.identify(namespace, environ, auth)
			key = (identity.site, identity.user)
			if not self._take_connection(sid, key):
				raise Refused(TOO_MANY_CONNECTIONS, "too_many_connections")
		except Refused as exc:
			self.recovery.drop(sid)
			metrics.CONNECTS.labels(exc.label).inc()
			logger.info("refused namespace=%r reason=%r%s", namespace, str(exc), _fingerprint(environ, auth))
			raise socketio.exceptions.ConnectionRefusedError(str(exc)) from None
		restored = False
		if session is not None:
			session, restored = self.recovery.restore(sid, identity.user, auth)
		client = events.Client(self, sid, namespace, identity)
		self.clients[sid] = client
		self.expires(identity.exp)
		self.user_connections[key] += 1
		auto_rooms = rooms.auto_rooms(identity.user, identity.user_type)
		if session is not None:
			client.joined = session.joined
		for room in (*auto_rooms, *client.joined):
			self.sio.enter_room(sid, room, namespace=namespace)
		if restored:
			try:
				self.recovery.replay(session, lambda scope: self.scopes[(identity.site, scope)], auto_rooms)
			except Exception as exc:
				logger.warning("replay unavailable site=%s user=%s (%s); starting a new session", identity.site, identity.user, exc)
				session, restored = self.recovery.start_over(sid), False
			for room in [room for room in client.joined if room.startswith("open_doc:")]:
				client.viewing(room, True)
				events.announce_viewers(client, *rooms.document_of(room))
		if session is not None:
			self.recovery.save(session)
		metrics.CONNECTS.labels("ok").inc()
		metrics.CONNECTIONS.labels(identity.site).inc()
		logger.info(
			"connected site=%s user=%s type=%s namespace=%s sid=%s token=%s%s",
			identity.site, identity.user, identity.user_type, namespace, sid, token_fingerprint(identity.token),
			(" recovered" if restored else " recoverable") if session is not None else "",
		)
		if self._closed_while_connecting(sid, namespace):
			# Socket.IO runs no disconnect handler for a socket that closed while its connect
			# handler waited (on Frappe, on Redis): run it here, or the socket would stay
			# counted, in its rooms and holding its session, with no client behind it.
			self.on_disconnect(namespace, sid, "closed while connecting")
			return False
		return None

	def _closed_while_connecting(self, sid: str, namespace: str) -> bool:
		eio_socket = self.sio.manager.eio_socket(sid, namespace)
		return eio_socket is None or eio_socket.closed or eio_socket.closing

	def on_connected(self, sid: str) -> None:
		"""The CONNECT reply is out: a recovering socket gets what it missed, then live events."""
		client = self.clients.get(sid)
		if client is None:
			return
		replayed = self.recovery.connected(sid, lambda delivery: self.sio.manager.send(sid, client.namespace, delivery))
		if replayed:
			metrics.REPLAYED_EVENTS.inc(replayed)
			logger.info("replayed %d events site=%s user=%s sid=%s", replayed, client.site, client.user, sid)

	def on_disconnect(self, namespace: str, sid: str, reason: Any = None) -> None:
		client = self.clients.pop(sid, None)
		if client is None:
			self.recovery.drop(sid)
			return
		self.recovery.close(sid)
		key = (client.site, client.user)
		self.user_connections[key] -= 1
		if self.user_connections[key] <= 0:
			del self.user_connections[key]
		if sid in self.counted:
			self.counted.discard(sid)
			self.shared("give back a connection", self.presence.give_back_connection, *key)
		metrics.CONNECTIONS.labels(client.site).dec()
		open_docs = [room for room in client.joined if room.startswith("open_doc:")]
		for room in open_docs:
			client.leave(room)
			events.announce_viewers(client, *rooms.document_of(room))
		logger.info("disconnected site=%s user=%s sid=%s reason=%s", client.site, client.user, sid, reason)
		self.recovery.drop(sid)  # last: until the handler returns, its socket still takes packets

	def _take_connection(self, sid: str, key: tuple[str, str]) -> bool:
		"""Whether the user may have one more connection, counted across every process on
		the Redis (by this process alone while Redis cannot be reached)."""
		try:
			taken = self.presence.take_connection(*key, self.config.connections_per_user)
		except Exception as exc:
			logger.warning("connections of other processes unknown (%s); counting this one's", exc)
			return self.user_connections[key] < self.config.connections_per_user
		if taken:
			self.counted.add(sid)
		return taken

	def shared(self, what: str, call: Callable[..., Any], *args: Any) -> Any:
		"""A call on what the processes share; a Redis failure is logged, not raised."""
		try:
			return call(*args)
		except Exception as exc:
			logger.warning("could not %s across processes: %s", what, exc)
			return None

	def on_control(self, message: dict) -> None:
		"""A message from another process on the same Redis."""
		moved = self.recovery.moved(message)
		if moved is not None:
			self.abort(*moved)

	def abort(self, sid: str, namespace: str) -> None:
		"""Close a socket's transport now, running its disconnect (its client is back on
		another connection; the old one only looked open)."""
		eio_socket = self.sio.manager.eio_socket(sid, namespace)
		if eio_socket is not None:
			eio_socket.close(wait=False, abort=True)

	# -- client events --------------------------------------------------------------------

	def _dispatcher(self, event: str, handler: events.Handler):
		"""Wrap a handler with the per-socket rate limit and a guard that turns a handler's
		failure into an error reply instead of a dead connection."""

		def dispatch(namespace: str, sid: str, *args: Any) -> Any:
			client = self.clients.get(sid)
			if client is None:
				return None
			if not client.bucket.take():
				metrics.CLIENT_EVENTS.labels("rate_limited").inc()
				return {"ok": False, "error": "Rate limit exceeded"}
			metrics.CLIENT_EVENTS.labels("ok").inc()
			try:
				return handler(client, *args)
			except Exception:
				logger.exception("handler of %r failed for site=%s user=%s", event, client.site, client.user)
				return {"ok": False, "error": "Internal error"}

		return dispatch

	def on_unknown_event(self, event: str, namespace: str, sid: str, *args: Any) -> None:
		"""Events nobody handles still count against the client's rate limit."""
		client = self.clients.get(sid)
		if client is not None and not client.bucket.take():
			metrics.CLIENT_EVENTS.labels("rate_limited").inc()
		else:
			metrics.CLIENT_EVENTS.labels("unknown").inc()

	# -- publish flow ---------------------------------------------------------------------

	def append(self, delivery: Delivery) -> str:
		"""Append an event to its site's log; every server process delivers it from there."""
		announcement = utils.announcement(delivery.event, delivery.room)
		return log.append(self.redis, delivery.site, delivery.fields(), self.config.recovery_max_events, utils.APP_CHANNEL, announcement)[0]

	def publish(self, delivery: Delivery) -> None:
		"""An event a client sent to a room: logged like every other, or, while the log
		cannot be reached, delivered by this process alone rather than lost."""
		try:
			self.append(delivery)
		except Exception as exc:
			logger.warning("event log unavailable (%s); %r delivered here only", exc, delivery.event)
			self.deliver(delivery)

	def deliver(self, delivery: Delivery) -> None:
		"""Emit one event to the local clients of each namespace its scope reaches.

		Over the unsent budget, the cuts run before the next event is read: the log reader
		reads a Redis backlog without blocking, so a cut left for later would wait for the
		whole backlog to be held in memory first."""
		namespaces = self.scopes[(delivery.site, delivery.scope)]
		for namespace in namespaces:
			self.sio.manager.deliver(namespace, delivery)
		metrics.DELIVERIES.inc(len(namespaces))
		if self.budget_cut_pending:
			self.sio.sleep(0)

	# -- back-pressure --------------------------------------------------------------------

	def _on_over_budget(self) -> None:
		"""Called inside an emit, for every packet while the process is over its budget: the
		cuts run once, on their own, after the emit returns."""
		if not self.budget_cut_pending:
			self.budget_cut_pending = True
			self.sio.start_background_task(self.enforce_budget)

	def enforce_budget(self) -> None:
		"""Cut clients holding unsent data until the process is back under
		``max_unsent_bytes``, those that have taken nothing for longest first: a client that
		stopped reading goes before any client that is merely behind."""
		self.budget_cut_pending = False
		if self.unsent.total <= self.unsent.budget:
			return
		sockets = self._sockets_by_queue()
		for queue in sorted(self.unsent.queues, key=lambda queue: queue.idle_since()):
			if self.unsent.total <= self.unsent.budget:
				break
			self.cut_off(sockets.get(queue), queue, "over budget")

	def sweep_slow_clients(self) -> None:
		"""Cut the clients that took nothing for ``slow_client_seconds`` while data waited
		for them (no packet taken, no byte acknowledged), drop what waits for sockets
		Engine.IO has let go, and check the budget.

		Time the process itself could not run its writers (a burst read from Redis in one go,
		a starved machine) says nothing about the clients, so no clock runs from before
		``loop_blocked_until``: a client then has ``slow_client_seconds`` again to take
		something. Nothing waiting (idle websockets) costs no look at every client."""
		queues = list(self.unsent.queues)
		sockets = self._sockets_by_queue() if queues else {}
		now = time.monotonic()
		for queue in queues:
			eio_socket = sockets.get(queue)
			if eio_socket is not None and not eio_socket.upgraded and not eio_socket.closed:
				# A long-poll takes everything waiting at once, and writing that response
				# shows no progress here: a poller that stops polling is closed by the ping
				# check instead, and what waits for it counts against the budget.
				continue
			queue.look_at_peer()
			if eio_socket is None or now - max(queue.idle_since(), self.loop_blocked_until) >= self.config.slow_client_seconds:
				self.cut_off(eio_socket, queue, "stalled")
		self.enforce_budget()

	def cut_off(self, eio_socket: Any, queue: Any, reason: str) -> None:
		"""Disconnect a client at the transport and drop what waits for it. ``reason`` is
		``stalled`` or ``over budget``. A socket that is already closed (or gone) is not a
		client any more: its leftovers are dropped without counting it."""
		if queue.discarded:
			return  # cut already: closing a socket runs its disconnect handler, which lets others run
		stalled_for, unsent_bytes, unsent_packets = queue.stalled_for(time.monotonic()), queue.unsent_bytes, queue.unsent_packets
		if eio_socket is None or eio_socket.closed:
			queue.discard()
			if eio_socket is not None:
				_shut_down(eio_socket)  # a writer may still be stuck sending its last frames
			logger.debug("dropped %d bytes in %d packets left for a closed socket", unsent_bytes, unsent_packets)
			return
		client = self._client_of(eio_socket.sid)
		queue.discard()
		eio_socket.close(wait=False, abort=True)
		_shut_down(eio_socket)
		metrics.SLOW_CLIENT_DISCONNECTS.inc()
		logger.warning(
			"slow client cut off (%s): %d bytes in %d packets unsent, nothing taken for %.1f s; "
			"%d bytes left unsent in the process (budget %d) site=%s user=%s",
			reason, unsent_bytes, unsent_packets, stalled_for, self.unsent.total, self.unsent.budget,
			client.site if client else "-", client.user if client else "-",
		)

	def _sockets_by_queue(self) -> dict[Any, Any]:
		return {eio_socket.queue: eio_socket for eio_socket in list(self.sio.eio.sockets.values())}

	def _client_of(self, eio_sid: str) -> events.Client | None:
		for namespace in list(self.sio.manager.get_namespaces()):
			client = self.clients.get(self.sio.manager.sid_from_eio_sid(eio_sid, namespace))
			if client is not None:
				return client
		return None

	# -- token expiry ---------------------------------------------------------------------

	def expires(self, exp: float | None) -> None:
		"""A client's token expires at ``exp`` (it connected, or refreshed its token)."""
		if exp is not None:
			self.next_expiry = min(self.next_expiry, exp - self.config.expiry_warning)

	def sweep_expiry(self, now: float | None = None) -> None:
		"""Warn sockets whose token is about to expire; cut off those past ``exp`` + grace.

		Only once something is due: each pass notes when the next warning or cut is, and
		:meth:`expires` brings that forward, so a server whose tokens are hours from expiry
		does not look at every client every second."""
		now = time.time() if now is None else now
		if now < self.next_expiry:
			return
		warning, grace = self.config.expiry_warning, self.config.expiry_grace
		self.next_expiry, due = math.inf, math.inf  # what connects meanwhile brings it forward
		try:
			for client in list(self.clients.values()):
				exp = client.identity.exp
				if exp is None:
					continue
				if now >= exp + grace:
					logger.info("token expired site=%s user=%s sid=%s", client.site, client.user, client.sid)
					self.sio.disconnect(client.sid, namespace=client.namespace)
					continue
				if now >= exp - warning and client.warned_exp != exp:
					client.warned_exp = exp
					client.emit("auth:expired", {"exp": int(exp)})
				due = min(due, exp + grace if client.warned_exp == exp else exp - warning)
		except BaseException:
			self.next_expiry = 0.0  # the clients not looked at: at the next sweep
			raise
		self.next_expiry = min(self.next_expiry, due)

	def _sweep_forever(self) -> None:
		while not self.stop_requested:
			asleep = time.monotonic()
			self.sio.sleep(SWEEP_INTERVAL)
			now = time.monotonic()
			if now - asleep > SWEEP_INTERVAL + LOOP_BLOCKED:
				self.loop_blocked_until = now
			for sweep in (self.sweep_expiry, self.sweep_slow_clients, self.recovery.snapshot, self.presence.keep_alive):
				try:
					sweep()
				except Exception:
					logger.exception("%s failed", sweep.__name__)

	# -- HTTP -----------------------------------------------------------------------------

	def health(self) -> tuple[int, dict[str, Any]]:
		redis_ok = self.bridge.connected
		status = "ok" if redis_ok and not self.draining else ("draining" if self.draining else "degraded")
		body = {
			"status": status,
			"redis": "up" if redis_ok else "down",
			"clients": len(self.clients),
			"process": self.process,
			"errors": self.errors.recent(),
		}
		return (200 if status == "ok" else 503), body

	def wsgi(self, environ: dict, start_response: Any) -> Any:
		path = environ.get("PATH_INFO", "")
		if path == "/health":
			code, body = self.health()
			return _respond(start_response, code, json.dumps(body).encode(), "application/json")
		if path == "/metrics":
			body, content_type = metrics.render()
			return _respond(start_response, 200, body, content_type)
		if self.draining:
			return _respond(start_response, 503, b"shutting down", "text/plain")
		if not self.config.websocket_compression:
			environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)
		malformed = self._malformed_polling_post(environ) if environ.get("REQUEST_METHOD") == "POST" else None
		answer = self.sio_app(environ, start_response)
		if malformed is not None:  # once answered: Engine.IO fails on a closed session's POST
			malformed.close(wait=False, abort=False)
		return answer

	def _malformed_polling_post(self, environ: dict) -> Any | None:
		"""The Engine.IO socket of a long-poll's POST whose body is not an Engine.IO payload,
		to be closed as for a malformed packet (and as the reference server closes it),
		instead of an error with a traceback in the log and the session kept. Engine.IO gets
		an empty body, and answers the POST as it answers any."""
		sid = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("sid", [""])[0]
		eio_socket = self.sio.eio.sockets.get(sid)
		if eio_socket is None or eio_socket.upgraded or eio_socket.closed:
			return None  # Engine.IO refuses it without reading the body
		exc = packets.polling_body_error(environ, self.sio.eio.max_http_buffer_size)
		if exc is None:
			return None
		packets.report(sid, exc)
		environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(), "0"
		return eio_socket

	# -- lifecycle ------------------------------------------------------------------------

	def start_background(self) -> None:
		logging.getLogger("excel_restaurant_pos").addHandler(self.errors)
		metrics.QUEUE_BYTES.set_function(lambda: self.unsent.total)
		self.presence.keep_alive()
		self.bridge.start(self.sio.start_background_task)
		self.sio.start_background_task(self._sweep_forever)

	def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
		"""Signal handler: only sets a flag; the main loop notices it within 0.2 s."""
		self.stop_requested = True

	def drain(self) -> None:
		"""Stop taking clients and hand every connected one back to its reconnect logic."""
		self.draining = True
		self.bridge.stop()
		self.heartbeat.stop()
		deadline = time.monotonic() + max(0.5, self.config.shutdown_grace - 2)
		sockets = list(self.sio.eio.sockets.values())
		logger.info("shutting down: closing %d client transports", len(sockets))
		for eio_socket in sockets:
			try:
				eio_socket.close(wait=False, abort=_answers_its_poll_with_events(eio_socket))
			except Exception:  # a socket that is already broken needs no goodbye
				pass
		# A closed socket's queue keeps only Engine.IO's end-of-queue sentinel once the
		# ``close`` packet (and whatever was queued before it) has been handed to the client.
		# Clients whose connection is already dead never take theirs, so stop waiting once
		# half a second passes without any queue draining.
		self.shared("say this process has stopped", self.presence.leave)
		unsent, stalled_since = None, time.monotonic()
		while time.monotonic() < deadline:
			now_unsent = sum(1 for s in sockets if s.queue.qsize() > 1)
			if not now_unsent:
				break
			if now_unsent != unsent:
				unsent, stalled_since = now_unsent, time.monotonic()
			elif time.monotonic() - stalled_since > 0.5:
				logger.info("shutting down: %d clients did not take their close packet", unsent)
				break
			self.sio.sleep(0.05)


def _answers_its_poll_with_events(eio_socket: Any) -> bool:
	"""Whether a socket's next long-poll answer would hold packets before a close packet.
	socket.io-client hands the events of an answer to the application only after the whole
	answer is read, and events read together with a close packet are kept back until its
	next connection, whose CONNECT names the offset before them: the replay of a recovering
	session then sends them again. Such a socket is closed without the close packet, so the
	poll answers its events alone, and the client's next poll, refused while the process
	stops, sends it to reconnect."""
	return not eio_socket.upgraded and eio_socket.queue.qsize() > 0


def _redis_client(url: str) -> Any:
	"""The process's client for Redis commands. Its pool is bounded and blocking: a storm of
	connects waits a moment for a connection rather than opening hundreds (or failing, as
	redis-py's default pool does past 100)."""
	import redis

	pool = redis.BlockingConnectionPool.from_url(url, max_connections=REDIS_CONNECTIONS, timeout=20, socket_connect_timeout=2, socket_timeout=5, socket_keepalive=True)
	return redis.Redis(connection_pool=pool)


def _shut_down(eio_socket: Any) -> None:
	"""Shut a client's TCP connection, which unblocks a writer stuck on a peer that stopped
	reading (closing the Engine.IO socket alone leaves it waiting)."""
	raw = getattr(eio_socket, "transport_socket", None)
	if raw is not None:
		try:
			raw.shutdown(socket.SHUT_RDWR)
		except OSError:
			pass


def _respond(start_response: Any, code: int, body: bytes, content_type: str) -> list[bytes]:
	reason = {200: "OK", 503: "Service Unavailable"}.get(code, "")
	start_response(f"{code} {reason}", [("Content-Type", content_type), ("Content-Length", str(len(body)))])
	return [body]


def _fingerprint(environ: dict, auth: Any) -> str:
	"""A token's fingerprint for a refusal log line, when there is a token at all."""
	try:
		return f" token={token_fingerprint(token_from(environ, auth))}"
	except Refused:
		return ""


def raise_open_file_limit() -> int:
	"""Raise the soft open-file limit to the hard one: every client is a socket."""
	soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
	if hard == resource.RLIM_INFINITY or hard > soft:
		target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
		try:
			resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
			soft = target
		except (ValueError, OSError):
			pass
	return soft


def serve(config: Config) -> int:
	"""Run until SIGTERM/SIGINT, drain, and return the exit status. The backend has
	patched the standard library already (see ``__main__``)."""
	files = raise_open_file_limit()
	sock = backend.listen(config)
	server = RealtimeServer(config)
	signal.signal(signal.SIGTERM, server.request_stop)
	signal.signal(signal.SIGINT, server.request_stop)
	server.start_background()
	freeze_start_up_heap()
	server.sio.start_background_task(Collector(server.sio.sleep).run)
	server.sio.start_background_task(server.backend.wsgi_server(sock, server.wsgi, config, lambda: not server.draining))
	logger.info("%s; open-file limit %d; process=%s", config.describe(), files, server.process)
	while not server.stop_requested:
		server.sio.sleep(0.2)
	server.drain()
	logger.info("stopped")
	return 0
