"""The indexed client manager keeps exactly the rooms python-socketio's own manager keeps."""

from __future__ import annotations

import socketio
from hypothesis import given, settings
from hypothesis import strategies as st

from excel_restaurant_pos.realtime.manager import IndexedManager

SIDS = ["a", "b", "c"]
NAMESPACES = ["/site1", "/excel_restaurant_pos/site1"]
operations = st.lists(
	st.tuples(st.sampled_from(["connect", "enter", "leave", "disconnect", "close"]), st.sampled_from(SIDS), st.sampled_from(NAMESPACES), st.sampled_from(["kitchen", "bar", "all"])),
	max_size=40,
)


def apply(manager: socketio.Manager, steps) -> socketio.Manager:
	connected: set[tuple[str, str]] = set()
	for operation, sid, namespace, room in steps:
		key = (namespace, sid)
		if operation == "connect" and key not in connected:
			manager.basic_enter_room(sid, namespace, None, eio_sid="eio-" + sid)
			manager.basic_enter_room(sid, namespace, sid)
			connected.add(key)
		elif operation == "enter" and key in connected:
			manager.basic_enter_room(sid, namespace, room)
		elif operation == "leave" and key in connected:
			manager.basic_leave_room(sid, namespace, room)
		elif operation == "disconnect" and key in connected:
			manager.pending_disconnect[namespace] = [sid]
			manager.basic_disconnect(sid, namespace)
			connected.discard(key)
		elif operation == "close":
			manager.basic_close_room(room, namespace)
	return manager


def snapshot(manager: socketio.Manager) -> dict:
	rooms = {ns: {room: dict(members) for room, members in by_room.items()} for ns, by_room in manager.rooms.items()}
	client_rooms = {(ns, sid): sorted(manager.get_rooms(sid, ns)) for ns in NAMESPACES for sid in SIDS}
	return {"rooms": rooms, "client_rooms": client_rooms, "pending": {ns: sorted(s) for ns, s in manager.pending_disconnect.items()}}


@settings(max_examples=300, deadline=None)
@given(steps=operations)
def test_same_rooms_as_python_socketio(steps):
	assert snapshot(apply(IndexedManager(), steps)) == snapshot(apply(socketio.Manager(), steps))


def test_disconnect_leaves_only_the_clients_rooms():
	manager = IndexedManager()
	for n in range(1000):
		sid = f"s{n}"
		manager.basic_enter_room(sid, "/site1", None, eio_sid=f"e{n}")
		manager.basic_enter_room(sid, "/site1", sid)
		manager.basic_enter_room(sid, "/site1", f"user:{n}")
	manager.basic_disconnect("s7", "/site1")
	assert manager.get_rooms("s7", "/site1") == []
	assert "user:7" not in manager.rooms["/site1"] and "s7" not in manager.rooms["/site1"][None]
	assert sorted(manager.get_rooms("s8", "/site1")) == ["s8", "user:8"]
	assert len(manager.client_rooms) == 999


def queued_after_emits(manager: socketio.Manager, emits, closed: set[str]) -> dict[str, list]:
	"""Emit through ``manager`` on a server with real Engine.IO sockets; return, per client,
	the encoded packets put on its queue."""
	import engineio.socket

	server = socketio.Server(client_manager=manager, async_mode="threading")
	sockets = {}
	for n, sid in enumerate(SIDS):
		eio_sid = "eio-" + sid
		server.eio.sockets[eio_sid] = sockets[eio_sid] = eio_socket = engineio.socket.Socket(server.eio, eio_sid)
		eio_socket.closed = eio_sid in closed
		for namespace in NAMESPACES:
			manager.basic_enter_room(sid + namespace, namespace, None, eio_sid=eio_sid)
			manager.basic_enter_room(sid + namespace, namespace, ["kitchen", "bar"][n % 2])
	for event, data, namespace, room in emits:
		server.emit(event, data, to=room, namespace=namespace)
	queued = {}
	for eio_sid, eio_socket in sockets.items():
		packets = []
		while not eio_socket.queue.empty():
			packets.append(eio_socket.queue.get_nowait().encode())
		queued[eio_sid] = packets
	return queued


@settings(max_examples=100, deadline=None)
@given(
	emits=st.lists(
		st.tuples(
			st.sampled_from(["order:new", "list_update"]),
			st.one_of(st.none(), st.text(max_size=5), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.lists(st.integers(), max_size=2)),
			st.sampled_from(NAMESPACES + ["/nobody"]),
			st.sampled_from([None, "kitchen", "bar", "nowhere", ["kitchen", "bar"]]),
		),
		max_size=8,
	),
	closed=st.sets(st.sampled_from(["eio-" + sid for sid in SIDS])),
)
def test_emit_puts_what_python_socketio_puts(emits, closed):
	"""The short emit path hands each open client the packets python-socketio's own manager
	would, in the same order, and nothing to a closed one."""
	assert queued_after_emits(IndexedManager(), emits, closed) == queued_after_emits(socketio.Manager(), emits, closed)
