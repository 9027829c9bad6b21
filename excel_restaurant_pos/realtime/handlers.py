"""The app's own client events. Add yours here.

A handler receives the :class:`~excel_restaurant_pos.realtime.events.Client` that sent the
event and the event's arguments; it should accept missing or extra arguments. What it
returns answers the client's acknowledgement callback::

	@on("table:call_waiter")
	def call_waiter(client, *args):
		table = arg(args, 0)
		if not isinstance(table, str):
			return {"ok": False, "error": "table:call_waiter expects a table name"}
		client.emit_to_room("waiters", "table:waiter_called", {"table": table, "by": client.user})
		return {"ok": True}

Importing this module must stay free of side effects (no network, no monkey-patching):
newer Frappe imports ``<app>.realtime.handlers`` into its own realtime process too, and
these handlers register only in this app's registry, never in Frappe's.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from excel_restaurant_pos.realtime import rooms
from excel_restaurant_pos.realtime.events import Client, arg, join_reply, leave_reply, on


@on("room:join")
def room_join(client: Client, *args: Any) -> dict[str, Any]:
	return join_reply(client, arg(args, 0))


@on("room:leave")
def room_leave(client: Client, *args: Any) -> dict[str, Any]:
	return leave_reply(client, arg(args, 0))


@on("ping")
def ping(client: Client, *args: Any) -> dict[str, int]:
	reply = {"timestamp": int(time.time() * 1000)}
	client.emit("pong", reply)
	return reply


@on("order:update")
def order_update(client: Client, *args: Any) -> dict[str, Any]:
	"""A System User tells the others in a room about an order's new status."""
	data = arg(args, 0)
	if not isinstance(data, dict):
		return _order_error(client, None, "order:update expects {room, order_id, status}")
	room, order_id = data.get("room"), data.get("order_id")
	if not client.is_system_user:
		return _order_error(client, order_id, "Only System Users may update orders")
	if rooms.room_error(room) or not client.in_room(room):
		return _order_error(client, order_id, "Join the room before sending updates to it")
	update = {
		"order_id": order_id,
		"status": data.get("status"),
		"updated_by": client.user,
		"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
	}
	client.emit_to_room(room, "order:updated", update)
	return {"ok": True, "room": room}


def _order_error(client: Client, order_id: Any, message: str) -> dict[str, Any]:
	client.emit("order:error", {"order_id": order_id, "message": message})
	return {"ok": False, "error": message}
