"""Publish events to realtime clients from Python: Frappe requests, jobs and scripts.

Each helper appends the event to its site's log in Redis (see
:mod:`~excel_restaurant_pos.realtime.log`) and announces it on the channel
``excel_restaurant_pos_events``; every running realtime server delivers it to its own
clients in the message's namespace, and a client that was away gets it when it recovers,
even when no server ran at the time it was published::

	from excel_restaurant_pos.realtime.utils import publish_to_room
	publish_to_room("kitchen", "order:new", {"order_id": "ORD-001"})

Inside Frappe the site and Redis come from the running site; elsewhere from the same
configuration loader the server uses. Publishing never breaks the caller: a Redis failure
is logged and the helper returns 0.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import json
import logging
import sys
import uuid
from typing import Any

from excel_restaurant_pos.realtime import log, rooms
from excel_restaurant_pos.realtime.config import APP_NAME

APP_CHANNEL = "excel_restaurant_pos_events"
#: How the helpers' announcements end: the event is in the log already (they put it last).
LOGGED = ',"logged":true}'
logger = logging.getLogger(__name__)


def json_default(obj: Any) -> Any:
	"""Frappe's JSON conventions: dates and times as their ``str()``, durations as
	``H:MM:SS`` in total hours, decimals as floats, sets as lists, documents as their dict."""
	if isinstance(obj, (datetime.date, datetime.time, uuid.UUID)):
		return str(obj)
	if isinstance(obj, datetime.timedelta):
		return _format_timedelta(obj)
	if isinstance(obj, decimal.Decimal):
		return float(obj)
	if isinstance(obj, (set, frozenset)):
		return list(obj)
	if callable(getattr(obj, "as_dict", None)):
		return obj.as_dict()
	raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _format_timedelta(value: datetime.timedelta) -> str:
	"""As Frappe's ``format_timedelta``: 1 day 2:03:04 is ``26:03:04``."""
	hours, remainder = divmod(value.total_seconds(), 3600)
	minutes, seconds = divmod(remainder, 60)
	seconds = round(seconds, 6)
	return f"{int(hours):01}:{int(minutes):02}:{int(seconds) if seconds == int(seconds) else seconds:02}"


def encode_json(event: str, value: Any) -> str:
	"""``value`` as JSON by Frappe's conventions; a ``TypeError`` naming the event when it
	cannot be encoded, so nothing half-built is ever sent."""
	try:
		return json.dumps(value, default=json_default, separators=(",", ":"))
	except (TypeError, ValueError) as exc:
		raise TypeError(f"cannot publish event {event!r}: {exc}") from exc


def encode_message(event: str, namespace: str, room: str | None, message: Any) -> str:
	"""The app channel's wire format, as code outside this package may publish it."""
	return encode_json(event, {"namespace": namespace, "room": room, "event": event, "message": message})


def announcement(event: str, room: str | None) -> str:
	"""What the server announces on the app channel for an event it appended itself (a
	client's room event): the event is in the log, and the message is not repeated."""
	return encode_json(event, {"event": event, "room": room, "logged": True})


def _running_frappe() -> Any | None:
	"""The ``frappe`` module when this code runs inside a Frappe site, else ``None``.

	Looked up in ``sys.modules`` so that code outside Frappe never imports it.
	"""
	frappe = sys.modules.get("frappe")
	if frappe is None:
		return None
	try:
		return frappe if getattr(frappe.local, "site", None) else None
	except RuntimeError:  # a werkzeug LocalProxy outside any context
		return None


@functools.lru_cache(maxsize=8)
def _redis_client(url: str) -> Any:
	import redis

	return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)


#: The configuration a program gave with :func:`configure`, else ``None`` (load it).
_configured: Any = None


def configure(config: Any) -> None:
	"""Publish with this :class:`~excel_restaurant_pos.realtime.config.Config` instead of
	loading one: for programs that have read theirs already (the ``excel-pos`` commands)."""
	global _configured
	_configured = config
	_standalone_config.cache_clear()


@functools.lru_cache(maxsize=1)
def _standalone_config() -> Any:
	if _configured is not None:
		return _configured
	from excel_restaurant_pos.realtime.config import load_config

	return load_config()


def _redis_url(frappe: Any | None) -> str:
	if frappe is not None:
		return frappe.conf.get("redis_queue") or _standalone_config().redis_queue
	return _standalone_config().redis_queue


def _default_site(frappe: Any | None) -> str:
	if frappe is not None:
		return frappe.local.site
	return _standalone_config().default_site or "default"


def _setting(frappe: Any | None, field: str) -> Any:
	"""A server setting, read as the server reads it: the site's config inside Frappe."""
	if frappe is not None:
		value = frappe.conf.get(f"{APP_NAME}_socketio_{field}")
		if value is not None:
			return value
	return getattr(_standalone_config(), field)


def site_of(namespace: str, frappe: Any | None) -> str:
	"""The site whose log an app namespace's events go to (``default`` is the default site)."""
	name = namespace[len(rooms.APP_PREFIX) :] if namespace.startswith(rooms.APP_PREFIX) else ""
	if not name:
		raise ValueError(f"cannot publish to {namespace!r}: not a namespace of this app ({rooms.APP_PREFIX}<site>)")
	if name != rooms.DEFAULT_ALIAS:
		return name
	if frappe is not None:
		return frappe.conf.get("default_site") or frappe.local.site
	return _standalone_config().default_site or rooms.DEFAULT_ALIAS


def _send(url: str, site: str, entry: dict[str, str], payload: str, event: str, max_events: int) -> int:
	"""Append to the site's log and announce on the app channel, both or neither."""
	try:
		return log.append(_redis_client(url), site, entry, max_events, APP_CHANNEL, payload)[1]
	except Exception as exc:
		frappe = _running_frappe()
		if frappe is not None:
			frappe.log_error(title=f"Realtime publish of {event!r} failed", message=repr(exc))
		else:
			logger.warning("realtime publish of %r failed: %s", event, exc)
		return 0


def publish_event(
	event: str,
	message: Any,
	room: str | None = None,
	*,
	site: str | None = None,
	namespace: str | None = None,
	after_commit: bool = False,
) -> int:
	"""Send ``event`` with ``message`` to every client in ``room`` (all of the namespace's
	clients when ``room`` is ``None``).

	The namespace is ``namespace`` when given, else ``/excel_restaurant_pos/<site>`` where
	the site is ``site``, else the running Frappe site, else the configured default site.
	With ``after_commit`` inside Frappe the message is sent when the transaction commits and
	dropped on rollback. Returns how many realtime servers were listening (0 when deferred,
	when none runs, or when Redis failed; without a server the event still waits in the log
	for clients that recover). A namespace that is not the app's raises ``ValueError``.
	"""
	frappe = _running_frappe()
	namespace = namespace or rooms.app_namespace(site or _default_site(frappe))
	message_json = encode_json(event, message)
	entry = log.entry_fields(event, "app", room, message_json)
	# Servers deliver from the log; "logged" tells them not to append this message again.
	payload = encode_json(event, {"namespace": namespace, "room": room, "event": event, "message": message, "logged": True})
	args = (_redis_url(frappe), site_of(namespace, frappe), entry, payload, event, int(_setting(frappe, "recovery_max_events")))
	if after_commit and frappe is not None:
		frappe.db.after_commit.add(lambda: _send(*args))
		return 0
	return _send(*args)


def publish_to_room(room: str, event: str, message: Any, **options: Any) -> int:
	"""Send to one room (``kitchen``, ``table:12``, …); options as :func:`publish_event`."""
	return publish_event(event, message, room, **options)


def publish_to_user(user: str, event: str, message: Any, **options: Any) -> int:
	"""Send to every connection of one user (room ``user:<user>``)."""
	return publish_event(event, message, rooms.user_room(user), **options)
