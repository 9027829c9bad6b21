"""Logging the pub/sub channels' messages exactly once, however many processes read them.

Frappe publishes on a pub/sub channel, and every server process subscribed to it receives
each message. Each must enter its site's log once, yet two identical messages are two
events, so a message cannot be recognised by its content alone. One process at a time
holds a lease (a Redis key that expires unless renewed) and logs what arrives, the
messages Redis handed over together in one Lua call; with them it records, in the same
call, a *mark*: a fingerprint of the last of them and the two before it on the same Redis
connection. Redis hands every subscriber the same messages in the same order, so every
process computes the same fingerprints.

The other processes keep the last few seconds of messages. When the lease falls free (its
holder stopped, or was killed and the lease expired), one of them takes it, finds the mark
in what it kept and logs everything after it: nothing is lost and nothing is logged twice
across a rolling restart or a crash. The Lua call also checks the lease, so a holder that
lost it (a long pause) cannot log what its successor logs.

Where the mark is not among the kept messages (the new holder subscribed after it), the
messages received after the mark's time are logged. Where identical messages follow each
other, the first match is taken: a takeover may then log one such repeat twice, never lose
one.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from excel_restaurant_pos.realtime import log
from excel_restaurant_pos.realtime.config import APP_NAME
from excel_restaurant_pos.realtime.log import Delivery
from excel_restaurant_pos.realtime.utils import LOGGED

LEASE_MS = 3000
#: How often the holder renews its lease, and the others look whether it is free.
LEASE_CHECK_S = 0.5
#: Messages kept for a takeover: more than a lease's worth at any realistic rate.
KEPT_SECONDS = 4 * LEASE_MS / 1000
KEPT_MESSAGES = 100_000
#: Marks (and the keys of a lease's holder) outlive any takeover by far.
MARK_TTL_S = 3600
logger = logging.getLogger(__name__)

#: KEYS: lease, mark, each entry's log, then the logs to read. ARGV: holder, mark (empty:
#: leave it), max events, the number of entries, for each entry the number of its field
#: names and values and those, then the offset to read each log after. Logs the entries and
#: moves the mark when the caller still holds the lease; returns 0 when it does not, else 1,
#: or with logs to read ``{1, XREAD's answer}``. One call for the messages Redis handed over
#: together: a reader blocked on the log is answered once the call ends, with all of them,
#: so each client gets a commit's events in one write.
_LOG_ONCE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local entries = tonumber(ARGV[4])
local at = 5
for key = 3, 2 + entries do
	local size = tonumber(ARGV[at])
	redis.call('XADD', KEYS[key], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, at + 1, at + size))
	at = at + size + 1
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'EX', %d) end
if #KEYS == 2 + entries then return 1 end
local read = {'XREAD', 'COUNT', %d, 'STREAMS'}
for key = 3 + entries, #KEYS do read[#read + 1] = KEYS[key] end
for offset = at, #ARGV do read[#read + 1] = ARGV[offset] end
return {1, redis.call(unpack(read))}
""" % (MARK_TTL_S, log.BATCH)

#: KEYS: lease. ARGV: holder, milliseconds. Renews the lease of its holder; 0 when it lost it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

#: KEYS: lease. ARGV: holder. Gives the lease up, if it is still the holder's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _already_logged(raw: bytes | str) -> bool:
	"""Whether a message is a publish helper's announcement (see ``utils.LOGGED``)."""
	return raw.endswith(LOGGED.encode() if isinstance(raw, bytes) else LOGGED)


def keys(source_url: str) -> tuple[str, str]:
	"""The lease and the mark of the logging of one Redis's channels."""
	name = hashlib.sha1(source_url.encode()).hexdigest()[:12]
	return f"{APP_NAME}:ingester:{name}", f"{APP_NAME}:ingested:{name}"


class Kept:
	"""One message as received: its fingerprint (with the two before it), when, and what."""

	__slots__ = ("fingerprint", "at", "channel", "raw")

	def __init__(self, fingerprint: str, at: float, channel: str, raw: bytes | str | None):
		self.fingerprint, self.at, self.channel, self.raw = fingerprint, at, channel, raw


class Ingester:
	"""The logging of one Redis's channels (see the module's docstring).

	``parse(channel, raw)`` turns a message into a :class:`Delivery`, ``None`` (nothing to
	log) or raises ``ValueError`` (logged and counted by ``on_bad``); ``redis`` is the log's
	Redis, where the lease and the mark live too.
	"""

	def __init__(self, redis_client: Any, source_url: str, holder: str, max_events: int, parse: Callable[[str, Any], Delivery | None], on_bad: Callable[[str, Any, Exception], None]):
		self.redis = redis_client
		self.holder = holder
		self.max_events = max_events
		self.parse = parse
		self.on_bad = on_bad
		self.lease_key, self.mark_key = keys(source_url)
		self.holding = False
		#: Called whenever ``holding`` changes.
		self.on_change: Callable[[], None] = lambda: None
		self.kept: collections.deque[Kept] = collections.deque(maxlen=KEPT_MESSAGES)
		self._recent = collections.deque(("", ""), maxlen=2)
		self._log_once = redis_client.register_script(_LOG_ONCE)
		self._renew = redis_client.register_script(_RENEW)
		self._release = redis_client.register_script(_RELEASE)

	def receive(self, messages: list[tuple[str, bytes | str]], after: dict[str, str] | None = None) -> list | None:
		"""Keep messages Redis handed over together, each ``(channel, raw)``; log them too,
		in one call, while holding the lease. With ``after`` (site → offset) the same call
		reads every site's log past it and returns what it found, as ``XREAD`` does: the
		holder delivers what it logged without a round trip to read it back."""
		items = [self._keep(channel, raw) for channel, raw in messages]
		if self.holding:
			return self._log(items, after)
		return None

	def _keep(self, channel: str, raw: bytes | str) -> Kept:
		"""Keep one message, with its fingerprint, for a successor's catch-up."""
		digest = hashlib.sha1(channel.encode() + b"\n" + (raw if isinstance(raw, bytes) else raw.encode())).hexdigest()
		fingerprint = hashlib.sha1("".join((*self._recent, digest)).encode()).hexdigest()
		self._recent.append(digest)
		now = time.time()
		# What the publish helpers announce is in the log already: keep its place, not its data.
		item = Kept(fingerprint, now, channel, None if _already_logged(raw) else raw)
		self.kept.append(item)
		while self.kept and self.kept[0].at < now - KEPT_SECONDS:
			self.kept.popleft()
		return item

	def _log(self, items: list[Kept], after: dict[str, str] | None = None) -> list | None:
		"""Log messages in one call and move the mark past the last that had something to
		log. Those with nothing to log leave the mark where it is: a successor would pass
		over them again, at no cost. With ``after``, read the logs in the same call (see
		:meth:`receive`)."""
		logs, args, last = [], [], None
		for item in items:
			if item.raw is None:
				continue
			try:
				delivery = self.parse(item.channel, item.raw)
			except ValueError as exc:
				self.on_bad(item.channel, item.raw, exc)
				continue
			if delivery is None:
				continue
			fields = [part for pair in delivery.fields().items() for part in pair]
			logs.append(log.log_key(delivery.site))
			args += (len(fields), *fields)
			last = item
		if last is None and after is None:
			return None
		mark = f"{last.fingerprint}|{last.at!r}" if last is not None else ""
		read = dict(after or {})  # a snapshot: the other reader moves positions on
		keys = [self.lease_key, self.mark_key, *logs, *map(log.log_key, read)]
		try:
			answer = self._log_once(keys=keys, args=[self.holder, mark, self.max_events, len(logs), *args, *read.values()])
		except Exception as exc:
			if logs:
				logger.error("could not log %d event(s) from %s, so they are lost: %s", len(logs), ", ".join(sorted({item.channel for item in items})), exc)
			else:
				logger.warning("could not read the log: %s", exc)
			return None
		if not answer:
			self._lost()
			return None
		return log.from_script(answer[1]) if isinstance(answer, list) else None

	def _lost(self) -> None:
		self.holding = False
		self.on_change()
		logger.warning("lost the lease on logging %s; another process logs it now", self.lease_key)

	def check_lease(self) -> None:
		"""Renew the lease, or take it when it is free and catch up from the mark."""
		if self.holding:
			if not self._renew(keys=[self.lease_key], args=[self.holder, LEASE_MS]):
				self._lost()
			return
		if not self.redis.set(self.lease_key, self.holder, nx=True, px=LEASE_MS):
			return
		mark = self.redis.get(self.mark_key)
		pending = self._after(mark.decode() if isinstance(mark, bytes) else mark)
		logger.info("logging %s from here on (%d kept messages to catch up)", self.lease_key, len(pending))
		index = 0
		while index < len(pending):  # what arrives meanwhile is kept: take it too
			chunk = pending[index : index + log.BATCH]
			self._log(chunk)
			index += len(chunk)
			if index == len(pending):
				pending += self._newer_than(pending[-1])
		self.holding = True
		self.on_change()

	def release(self) -> None:
		"""Give the lease up (at shutdown), so another process takes over at once."""
		if self.holding:
			self.holding = False
			self.on_change()
			try:
				self._release(keys=[self.lease_key], args=[self.holder])
			except Exception:  # the lease expires by itself
				pass

	def _after(self, mark: str | None) -> list[Kept]:
		"""The kept messages the last holder had not logged."""
		kept = list(self.kept)
		if not mark:
			return kept
		fingerprint, _, at = mark.partition("|")
		for index, item in enumerate(kept):
			if item.fingerprint == fingerprint:
				return kept[index + 1 :]
		since = float(at or 0)
		return [item for item in kept if item.at > since]

	def _newer_than(self, last: Kept) -> list[Kept]:
		kept = list(self.kept)
		for index in range(len(kept) - 1, -1, -1):
			if kept[index] is last:
				return kept[index + 1 :]
		return []
