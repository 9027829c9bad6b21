"""Namespaces, room names and the room policy: pure functions, no I/O.

The policy answers one question, "may this identity join this room?", the same way for
``room:join`` and for Frappe's own subscribe events, so a room cannot be reached through one
door that another keeps shut.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Literal

APP_PREFIX = "/excel_restaurant_pos/"
DEFAULT_ALIAS = "default"
MAX_ROOM_LENGTH = 256
SYSTEM_USER = "System User"
WEBSITE_USER = "Website User"

#: Rooms that only Frappe can open, by prefix: the Frappe method that says yes or no.
PERMISSION_ROOMS = ("doctype:", "doc:", "open_doc:")


def app_namespace(site: str) -> str:
	"""The app's namespace of a site: ``/excel_restaurant_pos/<site>``."""
	return APP_PREFIX + site


def site_of_namespace(namespace: str, sites: tuple[str, ...] | frozenset[str], default_site: str | None) -> str | None:
	"""The known site a client namespace names, or ``None`` (``/``, unknown sites, junk)."""
	if not namespace.startswith("/"):
		return None
	name = namespace[len(APP_PREFIX) :] if namespace.startswith(APP_PREFIX) else namespace[1:]
	if namespace.startswith(APP_PREFIX) and name == DEFAULT_ALIAS and default_site:
		return default_site
	return name if name and name in sites else None


def namespaces_of_site(site: str, default_site: str | None, *, frappe_events: bool) -> tuple[str, ...]:
	"""Where an event for ``site`` goes: Frappe events also reach ``/<site>``; app events
	only the app namespaces. The ``default`` alias is added for the default site; a site
	literally named ``default`` has no app namespace while the alias names another site."""
	names = [app_namespace(site)] if site != DEFAULT_ALIAS or default_site in (None, site) else []
	if site == default_site and site != DEFAULT_ALIAS:
		names.append(app_namespace(DEFAULT_ALIAS))
	if frappe_events:
		names.insert(0, "/" + site)
	return tuple(names)


def user_room(user: str) -> str:
	return f"user:{user}"


def doctype_room(doctype: str) -> str:
	return f"doctype:{doctype}"


def doc_room(doctype: str, docname: str) -> str:
	return f"doc:{doctype}/{docname}"


def open_doc_room(doctype: str, docname: str) -> str:
	return f"open_doc:{doctype}/{docname}"


def document_of(room: str) -> tuple[str, str]:
	"""``(doctype, docname)`` of a ``doc:`` or ``open_doc:`` room (empty where it names none)."""
	doctype, _, docname = room.partition(":")[2].partition("/")
	return doctype, docname


def task_room(task_id: str) -> str:
	return f"task_progress:{task_id}"


def auto_rooms(user: str, user_type: str) -> tuple[str, ...]:
	"""Rooms a session joins on connect, by Frappe's rules."""
	rooms = [user_room(user), "website"]
	if user_type == SYSTEM_USER:
		rooms.append("all")
	return tuple(rooms)


def room_error(room: object) -> str | None:
	"""Why ``room`` is not a room name, or ``None`` when it is one."""
	if not isinstance(room, str) or not room or len(room) > MAX_ROOM_LENGTH:
		return f"Room must be a non-empty string of at most {MAX_ROOM_LENGTH} characters"
	return None


@dataclasses.dataclass(frozen=True)
class Decision:
	"""The policy's answer: ``allow``, ``deny`` with a reason, or ``ask_frappe``."""

	verdict: Literal["allow", "deny", "ask_frappe"]
	reason: str = ""
	doctype: str = ""
	docname: str | None = None

	@property
	def allowed(self) -> bool:
		return self.verdict == "allow"


ALLOW = Decision("allow")


def check_join(user: str, user_type: str, room: object, *, public_rooms: tuple[str, ...], can_ask_frappe: bool) -> Decision:
	"""May ``user`` join ``room``? Frappe's rooms follow Frappe's rules; any other room is
	open to System Users and to others only when it matches ``public_rooms``."""
	error = room_error(room)
	if error:
		return Decision("deny", error)
	assert isinstance(room, str)
	if room.startswith("user:"):
		return ALLOW if room == user_room(user) else Decision("deny", "Cannot join another user's room")
	if room == "all":
		return ALLOW if user_type == SYSTEM_USER else Decision("deny", "Only System Users may join 'all'")
	if room == "website" or room.startswith("task_progress:"):
		return ALLOW
	if room.startswith(PERMISSION_ROOMS):
		return _frappe_room(room, can_ask_frappe)
	if user_type == SYSTEM_USER or any(fnmatch.fnmatchcase(room, pattern) for pattern in public_rooms):
		return ALLOW
	return Decision("deny", f"Not allowed to join room '{room}'")


def _frappe_room(room: str, can_ask_frappe: bool) -> Decision:
	"""A ``doctype:``/``doc:``/``open_doc:`` room: only Frappe can say yes."""
	kind, _, rest = room.partition(":")
	if kind == "doctype":
		doctype, docname = rest, None
	else:
		doctype, docname = document_of(room)
		if not docname:
			return Decision("deny", f"Room '{room}' must name a document as {kind}:<doctype>/<name>")
	if not doctype:
		return Decision("deny", f"Room '{room}' names no doctype")
	if not can_ask_frappe:
		return Decision("deny", "Document rooms need Frappe to check permissions (auth mode 'frappe')")
	return Decision("ask_frappe", doctype=doctype, docname=docname)
