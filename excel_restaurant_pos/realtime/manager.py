"""A python-socketio client manager whose per-client bookkeeping does not grow with the
number of clients.

python-socketio's in-memory manager finds a client's rooms by scanning every room of the
namespace, and keeps clients that are connecting or disconnecting in lists. Every user has a
room of its own (``user:<user>``) and every socket one named by its sid, so with 10,000
clients a single disconnect scanned some 20,000 rooms: 10,000 clients dropping at once (a
Wi-Fi outage in a food court) kept the process at full CPU for most of a minute. This
manager keeps an index from client to rooms and keeps those lists as sets.

It also gives the bridge's events a shorter way to each client's Engine.IO queue, and puts
the recovery protocol's offsets on them; see :meth:`IndexedManager.deliver`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet

from excel_restaurant_pos.realtime.log import Delivery


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
		#: sid → the session of each recovering socket (the server's :class:`Recovery` sets it).
		self.sessions: dict[str, Any] = {}
		self.on_connected: Callable[[str], None] | None = None

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

	def emit(self, event: str, data: Any, namespace: str, room: Any = None, skip_sid: Any = None, callback: Any = None, to: Any = None, **kwargs: Any) -> None:
		"""As python-socketio's, with a shorter path (:meth:`deliver`) for an event with one
		argument, no acknowledgement and no one skipped."""
		if callback is not None or skip_sid is not None or isinstance(data, tuple) or namespace not in self.rooms:
			return super().emit(event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, to=to, **kwargs)
		self.deliver(namespace, Delivery("", "", to or room, event, data))  # not logged: no site, scope or offset

	def deliver(self, namespace: str, delivery: Delivery) -> None:
		"""Emit ``delivery`` to its room (or everyone) in ``namespace``.

		The packet is built once and put straight on each client's Engine.IO queue, which
		skips per client the three calls between and the arguments of a log call that is off,
		work that was repeated for every client of every event. A logged event (one with an
		offset) reaches a recovering socket with its offset as a trailing argument, or is
		held for it while its session is being restored (see
		:mod:`~excel_restaurant_pos.realtime.recovery`); its sender, ``skip``, is left out.
		"""
		plain = marked = None
		offset, skip, sessions, sockets = delivery.offset, delivery.skip, self.sessions, self.server.eio.sockets
		for sid, eio_sid in self.get_participants(namespace, delivery.room):
			session = sessions.get(sid) if offset is not None else None
			if session is None:
				if sid == skip:
					continue
				packets = plain = plain or self.event_packets(namespace, delivery.event, delivery.message)
			elif session.held is not None:
				session.held.append(delivery)
				continue
			else:
				if sid == skip:
					continue
				packets = marked = marked or self.event_packets(namespace, delivery.event, delivery.message, offset)
				session.last_sent = offset
			eio_socket = sockets.get(eio_sid)
			if eio_socket is None or eio_socket.closed:
				continue
			for eio_pkt in packets:
				eio_socket.queue.put(eio_pkt)

	def eio_socket(self, sid: str, namespace: str) -> Any:
		"""The Engine.IO socket under a Socket.IO socket, or ``None`` once it is gone."""
		return self.server.eio.sockets.get(self.eio_sid_from_sid(sid, namespace))

	def send(self, sid: str, namespace: str, delivery: Delivery) -> None:
		"""Send one logged event to one recovering socket, with its offset (a replay)."""
		eio_socket = self.eio_socket(sid, namespace)
		if eio_socket is not None and not eio_socket.closed:
			for eio_pkt in self.event_packets(namespace, delivery.event, delivery.message, delivery.offset):
				eio_socket.queue.put(eio_pkt)

	def event_packets(self, namespace: str, event: str, data: Any, offset: str | None = None) -> list[Any]:
		"""The Engine.IO packets of an event; the recovery protocol puts the offset last."""
		args = [event] if data is None else [event, data]
		if offset is not None:
			args.append(offset)
		encoded = self.server.packet_class(packet.EVENT, namespace=namespace, data=args).encode()
		return [eio_packet.Packet(eio_packet.MESSAGE, p) for p in (encoded if isinstance(encoded, list) else [encoded])]

	def connect(self, sid: str, namespace: str) -> Any:
		"""As python-socketio's, then ``on_connected(sid)``: the CONNECT reply is out by now."""
		sid = super().connect(sid, namespace)
		if self.on_connected is not None:
			self.on_connected(sid)
		return sid

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
