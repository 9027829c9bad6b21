"""Client events: the registry, the :class:`Client` a handler receives, and Frappe's events.

A handler is a plain function ``handler(client, *args)``; what it returns answers the
client's acknowledgement callback when the client passed one. Handlers are registered with
:func:`on`; Frappe's own subscribe events are here, the app's events in ``handlers.py``.

Importing this module has no side effects beyond filling :data:`HANDLERS`; the server wires
the registry to Socket.IO at start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from excel_restaurant_pos.realtime import rooms
from excel_restaurant_pos.realtime.log import Delivery

if TYPE_CHECKING:
	from excel_restaurant_pos.realtime.connect import Identity
	from excel_restaurant_pos.realtime.server import RealtimeServer

logger = logging.getLogger(__name__)
Handler = Callable[..., Any]
#: Every client event the server answers, by name: built-ins below, then the app's own.
HANDLERS: dict[str, Handler] = {}


def on(event: str) -> Callable[[Handler], Handler]:
	"""Register ``handler`` for the client event ``event`` (each name once)."""

	def register(handler: Handler) -> Handler:
		if event in HANDLERS and HANDLERS[event] is not handler:
			raise ValueError(f"client event {event!r} already has a handler ({HANDLERS[event].__qualname__})")
		HANDLERS[event] = handler
		return handler

	return register


class TokenBucket:
	"""``rate`` events per second with bursts of ``2 × rate``: cheap enough for every event."""

	__slots__ = ("rate", "capacity", "tokens", "stamp")

	def __init__(self, rate: float):
		self.rate = rate
		self.capacity = max(1.0, 2 * rate)
		self.tokens = self.capacity
		self.stamp = time.monotonic()

	def take(self) -> bool:
		now = time.monotonic()
		self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
		self.stamp = now
		if self.tokens < 1:
			return False
		self.tokens -= 1
		return True


class Client:
	"""One connected socket, as handlers see it."""

	def __init__(self, server: RealtimeServer, sid: str, namespace: str, identity: Identity):
		self.server = server
		self.sid = sid
		self.namespace = namespace
		self.identity = identity
		#: Rooms the client joined itself (auto-joined rooms do not count against the limit).
		self.joined: set[str] = set()
		self.bucket = TokenBucket(server.config.events_per_second)
		self.warned_exp: float | None = None

	@property
	def user(self) -> str:
		return self.identity.user

	@property
	def site(self) -> str:
		return self.identity.site

	@property
	def user_type(self) -> str:
		return self.identity.user_type

	@property
	def is_system_user(self) -> bool:
		return self.identity.user_type == rooms.SYSTEM_USER

	def emit(self, event: str, data: Any = None) -> None:
		"""Send an event to this client only."""
		self.server.sio.emit(event, data, to=self.sid, namespace=self.namespace)

	def emit_to_room(self, room: str, event: str, data: Any = None, *, include_self: bool = False) -> None:
		"""Send an event to a room of this client's site, in each of its namespaces and on
		every server process. It goes through the event log, so a member who is away gets it
		when it recovers."""
		skip = None if include_self else self.sid
		self.server.publish(Delivery(self.site, "site", room, event, data, skip=skip))

	@property
	def gone(self) -> bool:
		"""Whether this socket has disconnected: a handler that waited on Frappe may outlive it."""
		return self.server.clients.get(self.sid) is not self

	def in_room(self, room: str) -> bool:
		return room in self.server.sio.rooms(self.sid, namespace=self.namespace)

	def join(self, room: Any) -> str | None:
		"""Join ``room`` if the room policy (and Frappe, for document rooms) allows it.

		Returns ``None`` on success, else the reason for the refusal.
		"""
		identity = self.identity
		decision = rooms.check_join(
			identity.user,
			identity.user_type,
			room,
			public_rooms=self.server.config.public_rooms,
			can_ask_frappe=self.server.frappe_api is not None,
		)
		if decision.verdict == "deny":
			return decision.reason
		if room in self.joined:
			return None
		if len(self.joined) >= self.server.config.rooms_per_socket:
			return f"Room limit reached ({self.server.config.rooms_per_socket} rooms)"
		if decision.verdict == "ask_frappe":
			allowed, reason = self.server.frappe_api.can_join(identity.site, identity.token, decision.doctype, decision.docname)
			if not allowed:
				return reason
			if self.gone:  # its rooms went with it: python-socketio has no room left to enter
				logger.info("join of %r dropped: site=%s user=%s sid=%s left while Frappe answered", room, self.site, self.user, self.sid)
				return "Disconnected"
		self.server.sio.enter_room(self.sid, room, namespace=self.namespace)
		self.joined.add(room)
		# Counted as a viewer before its session is stored, which waits on Redis: a client
		# that drops meanwhile is counted out by its disconnect, not counted in after it.
		self.viewing(room, True)
		self.server.recovery.rooms_changed(self.sid)
		return None

	def leave(self, room: Any) -> str | None:
		"""Leave a room this client joined itself; returns the reason when it cannot."""
		error = rooms.room_error(room)
		if error:
			return error
		self.server.sio.leave_room(self.sid, room, namespace=self.namespace)
		self.joined.discard(room)
		self.server.recovery.rooms_changed(self.sid)
		self.viewing(room, False)
		return None

	def viewing(self, room: str, is_open: bool) -> None:
		"""Count this client in or out of a document's viewers, across processes."""
		if room.startswith("open_doc:"):
			presence = self.server.presence
			self.server.shared("count a viewer", presence.opened if is_open else presence.closed, self.site, room, self.sid, self.user)

	def viewers(self, room: str) -> list[str]:
		"""The distinct users in a room of this site, on every process, in the order they
		joined (on this process only while Redis cannot be reached)."""
		shared = self.server.shared("list viewers", self.server.presence.viewers, self.site, room)
		if shared is not None:
			return shared
		users: dict[str, None] = {}
		for namespace in self.server.scopes[(self.site, "site")]:
			for sid, _ in self.server.sio.manager.get_participants(namespace, room):
				other = self.server.clients.get(sid)
				if other is not None:
					users[other.user] = None
		return list(users)


def arg(args: tuple, index: int) -> Any:
	return args[index] if len(args) > index else None


def room_reply(client: Client, room: Any, error: str | None, ok_event: str) -> dict[str, Any]:
	"""Answer a join or leave with the reply event and the same value for the ack."""
	if error:
		client.emit("room:error", {"room": room, "message": error})
		return {"ok": False, "room": room, "error": error}
	client.emit(ok_event, {"room": room})
	return {"ok": True, "room": room}


def join_reply(client: Client, room: Any) -> dict[str, Any]:
	"""Join and answer: ``room:joined`` or ``room:error``, and the same as the ack."""
	return room_reply(client, room, client.join(room), "room:joined")


def leave_reply(client: Client, room: Any) -> dict[str, Any]:
	"""Leave and answer: ``room:left`` or ``room:error``, and the same as the ack."""
	return room_reply(client, room, client.leave(room), "room:left")


def _names(args: tuple, count: int) -> tuple[str, ...] | None:
	"""The first ``count`` arguments as non-empty names (numbers allowed), else ``None``."""
	names = tuple(str(value) for value in args[:count] if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value))
	return names if len(names) == count else None


def announce_viewers(client: Client, doctype: str, docname: str) -> None:
	"""Tell a document's viewers who is looking at it now (Frappe's ``doc_viewers``)."""
	room = rooms.open_doc_room(doctype, docname)
	payload = {"doctype": doctype, "docname": docname, "users": client.viewers(room)}
	client.emit_to_room(room, "doc_viewers", payload, include_self=True)


def _subscription(event: str, count: int, room_of: Callable[..., str], reply: Callable[[Client, Any], dict], announce: bool) -> Handler:
	"""A Frappe (un)subscribe event: names in, one room joined or left, and for open
	documents the new list of viewers."""

	def handler(client: Client, *args: Any) -> dict[str, Any]:
		names = _names(args, count)
		if names is None:
			return room_reply(client, None, f"{event} expects {count} name{'s' if count > 1 else ''}", "room:joined")
		answer = reply(client, room_of(*names))
		if announce and answer["ok"]:
			announce_viewers(client, *names)
		return answer

	return handler


#: Frappe's events: (subscribe, unsubscribe, how many names, the room they name, announce viewers).
FRAPPE_SUBSCRIPTIONS = (
	("doctype_subscribe", "doctype_unsubscribe", 1, rooms.doctype_room, False),
	("doc_subscribe", "doc_unsubscribe", 2, rooms.doc_room, False),
	("doc_open", "doc_close", 2, rooms.open_doc_room, True),
	("task_subscribe", "task_unsubscribe", 1, rooms.task_room, False),
)
for _subscribe, _unsubscribe, _count, _room_of, _announce in FRAPPE_SUBSCRIPTIONS:
	on(_subscribe)(_subscription(_subscribe, _count, _room_of, join_reply, _announce))
	on(_unsubscribe)(_subscription(_unsubscribe, _count, _room_of, leave_reply, _announce))
on("progress_subscribe")(HANDLERS["task_subscribe"])


@on("auth:refresh")
def auth_refresh(client: Client, *args: Any) -> dict[str, Any]:
	"""Swap a live connection's token for a fresh one of the same user and site."""
	# Imported here, not at the top: handlers.py imports this module, and newer Frappe imports
	# handlers.py into its own process, where the connect pipeline (and its metrics) has no place.
	from excel_restaurant_pos.realtime.connect import Refused, token_from

	data = arg(args, 0)
	try:
		token = token_from({}, data if isinstance(data, dict) else {"token": data})
		identity = client.server.auth.verify(client.site, token)
	except Refused as exc:
		return {"ok": False, "error": str(exc)}
	if identity.user != client.user:
		return {"ok": False, "error": "Token belongs to another user"}
	client.identity = identity
	client.server.expires(identity.exp)
	return {"ok": True, "exp": identity.exp}
