"""A python-socketio client manager whose per-client bookkeeping does not grow with the
number of clients.

python-socketio's in-memory manager finds a client's rooms by scanning every room of the
namespace, and keeps clients that are connecting or disconnecting in lists. Every user has a
room of its own (``user:<user>``) and every socket one named by its sid, so with 10,000
clients a single disconnect scanned some 20,000 rooms: 10,000 clients dropping at once (a
Wi-Fi outage in a food court) kept the process at full CPU for most of a minute. This
manager keeps an index from client to rooms and keeps those lists as sets.
"""

from __future__ import annotations

from typing import Any

import socketio


class _SidSet(set):
	"""A set that python-socketio can use where it expects a list of sids."""

	append = set.add


class _SidSets(dict):
	"""namespace → sids; what python-socketio stores here as lists becomes a set."""

	def __setitem__(self, namespace: str, sids: Any) -> None:
		super().__setitem__(namespace, sids if isinstance(sids, _SidSet) else _SidSet(sids))


class IndexedManager(socketio.Manager):
	def __init__(self) -> None:
		super().__init__()
		self.pending_connect = _SidSets()
		self.pending_disconnect = _SidSets()
		#: (namespace, sid) → the rooms that client is in (``None``, its sid room, the rest).
		self.client_rooms: dict[tuple[str, str], set[Any]] = {}

	def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: str | None = None) -> None:
		super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
		self.client_rooms.setdefault((namespace, sid), set()).add(room)

	def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
		super().basic_leave_room(sid, namespace, room)
		rooms = self.client_rooms.get((namespace, sid))
		if rooms is not None:
			rooms.discard(room)
			if not rooms:
				del self.client_rooms[(namespace, sid)]

	def get_rooms(self, sid: str, namespace: str) -> list[Any]:
		return [room for room in self.client_rooms.get((namespace, sid), ()) if room is not None]

	def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
		"""As python-socketio's, but leaving only the rooms this client is in."""
		for room in list(self.client_rooms.get((namespace, sid), ())):
			self.basic_leave_room(sid, namespace, room)
		self.callbacks.pop(sid, None)
		for pending in (self.pending_connect, self.pending_disconnect):
			sids = pending.get(namespace)
			if sids is not None and sid in sids:
				sids.discard(sid)
				if not sids:
					del pending[namespace]
