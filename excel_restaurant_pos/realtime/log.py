"""The event log: one Redis stream per site, the path every event takes to the clients.

Every event for a site's clients is appended to the stream ``excel_restaurant_pos:log:<site>``
(``XADD … MAXLEN ~ recovery_max_events``), whatever its source: the publish helpers append
directly, the bridge appends what arrives on the pub/sub channels, and the server appends
the room events its clients send. The helpers and the server announce what they append
on a pub/sub channel (:func:`append`), as what the bridge appends was announced. Each
server process reads the streams of its sites in order
(:class:`~excel_restaurant_pos.realtime.bridge.Bridge`; the process that appends what
arrives on the channels reads in the same call) and delivers every entry to its own
clients.

The stream's entry IDs are the offsets of the recovery protocol: ordered per site, assigned
by Redis, and still valid after a server restarts. A recovering client that comes back
gets the entries after its offset (:func:`read_after`), so the same log serves live
delivery and replay and the two can never disagree about order.

This module knows the entry format and the Redis commands on the log, nothing about
sockets, and imports nothing heavy: the publish helpers use it inside Frappe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

KEY_PREFIX = "excel_restaurant_pos:log:"
#: Where an entry goes: ``app`` reaches the site's app namespaces, ``site`` every namespace
#: of the site (``/<site>`` too), as Frappe's events and client room events do.
SCOPES = ("app", "site")
#: Entries read per call, live and during a replay: few enough that a burst of large
#: events is not held in memory all at once.
BATCH = 100
_OFFSET = re.compile(r"^\d{1,20}-\d{1,20}$")
logger = logging.getLogger(__name__)


def log_key(site: str) -> str:
	return KEY_PREFIX + site


def is_offset(value: Any) -> bool:
	"""Whether ``value`` is a stream entry ID (what a client hands back as its offset)."""
	return isinstance(value, str) and bool(_OFFSET.match(value))


def offset_key(offset: str) -> tuple[int, int]:
	"""An offset as a sortable pair: stream IDs do not sort as strings."""
	ms, _, seq = offset.partition("-")
	return int(ms), int(seq)


def later(a: str | None, b: str | None) -> str | None:
	"""The later of two offsets (``None`` is earliest)."""
	if a is None or b is None:
		return a or b
	return a if offset_key(a) >= offset_key(b) else b


def _after(offset: str) -> str:
	"""The smallest ID after ``offset``: ``XRANGE``'s exclusive bound, on every Redis."""
	ms, seq = offset_key(offset)
	return f"{ms}-{seq + 1}"


@dataclasses.dataclass(frozen=True)
class Delivery:
	"""One event for a site's clients: ``event`` with ``message`` to ``room`` (every client
	of the scope's namespaces when ``None``). ``offset`` is its place in the log (``None``
	before it is appended); ``skip`` is the sid of a sender that must not get its own event."""

	site: str
	scope: str
	room: str | None
	event: str
	message: Any
	offset: str | None = None
	skip: str | None = None

	def fields(self) -> dict[str, str]:
		return entry_fields(self.event, self.scope, self.room, json.dumps(self.message, separators=(",", ":")), self.skip)


def entry_fields(event: str, scope: str, room: str | None, message_json: str, skip: str | None = None) -> dict[str, str]:
	"""A stream entry. The message stays JSON text, decoded once by each reader."""
	fields = {"event": event, "scope": scope, "message": message_json}
	if room is not None:
		fields["room"] = room
	if skip is not None:
		fields["skip"] = skip
	return fields


def text(value: Any) -> Any:
	"""redis-py answers bytes unless asked not to."""
	return value.decode() if isinstance(value, bytes) else value


def decode(site: str, offset: bytes | str, fields: dict) -> Delivery:
	"""A stream entry as a :class:`Delivery`; ``ValueError`` with the reason when malformed."""
	try:
		fields = {text(name): text(value) for name, value in fields.items()}
	except UnicodeDecodeError as exc:
		raise ValueError(f"not UTF-8 ({exc})") from None
	event, scope, raw = fields.get("event"), fields.get("scope"), fields.get("message")
	if not event:
		raise ValueError("no event name")
	if scope not in SCOPES:
		raise ValueError(f"unknown scope {scope!r}")
	try:
		message = json.loads(raw) if raw is not None else None
	except ValueError as exc:
		raise ValueError(f"message is not JSON ({exc})") from None
	return Delivery(site, scope, fields.get("room") or None, event, message, text(offset), fields.get("skip") or None)


def append(client: Any, site: str, fields: dict[str, str], max_events: int, channel: str, announcement: str) -> tuple[str, int]:
	"""Append an entry to a site's log and announce it on the pub/sub ``channel``, both or
	neither; returns its offset and how many subscribers heard. The announcement is how the
	process that logs the channels learns that something else appended (see
	:class:`~excel_restaurant_pos.realtime.bridge.Bridge`), so nothing appends silently."""
	pipe = client.pipeline(transaction=True)
	pipe.xadd(log_key(site), fields, maxlen=max_events, approximate=True)
	pipe.publish(channel, announcement)
	offset, listeners = pipe.execute()
	return text(offset), int(listeners)


def from_script(read: Any) -> list:
	"""What ``XREAD`` answers inside a Lua script (field names and values in one flat list)
	in the shape redis-py gives it: ``[(key, [(offset, {name: value}), …]), …]``."""
	return [(key, [(offset, dict(zip(flat[::2], flat[1::2]))) for offset, flat in entries]) for key, entries in read or ()]


def last_offset(client: Any, site: str) -> str:
	"""The newest offset in a site's log (``0-0`` when the log is empty)."""
	newest = client.xrevrange(log_key(site), count=1)
	if not newest:
		return "0-0"
	return text(newest[0][0])


def was_trimmed_after(client: Any, site: str, offset: str, max_events: int) -> bool:
	"""Whether entries after ``offset`` may have been trimmed away.

	Only ``MAXLEN`` trims the log, and a trimmed log is at least ``max_events`` long, so a
	shorter log has lost nothing; a full one has when its oldest entry is past ``offset``.
	"""
	pipe = client.pipeline(transaction=False)
	pipe.xlen(log_key(site))
	pipe.xrange(log_key(site), count=1)
	length, oldest = pipe.execute()
	if length < max_events or not oldest:
		return False
	return offset_key(text(oldest[0][0])) > offset_key(offset)


def read_after(client: Any, site: str, offset: str) -> Iterator[Delivery]:
	"""Every entry after ``offset``, in order; malformed ones are logged and skipped."""
	key, cursor = log_key(site), offset
	while True:
		batch = client.xrange(key, min=_after(cursor), count=BATCH)
		for entry_id, fields in batch:
			cursor = text(entry_id)
			try:
				yield decode(site, cursor, fields)
			except ValueError as exc:
				logger.warning("skipped log entry %s of %s: %s", cursor, site, exc)
		if len(batch) < BATCH:
			return
