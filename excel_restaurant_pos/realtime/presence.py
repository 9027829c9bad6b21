"""What the server processes that share a Redis know together: which of them are alive,
how many connections each user has, and who has which document open.

Each process keeps a key ``excel_restaurant_pos:alive:<process>`` that expires
:data:`ALIVE_TTL_S` seconds after it stops renewing it, so the connections and viewers of a
process that died without a word stop counting within that time. Its value says where the
process answers, so ``excel-pos status`` finds every running server. A user's connections are
counted per process in one hash per site and user, checked and taken in one Lua call so two
processes cannot both let the twenty-first in. A document's viewers are a sorted set of
``<process>|<sid>|<user>`` by the time they opened it, as Frappe lists them.

Every call here is a Redis round trip; when Redis cannot be reached the server falls back
to what this process alone knows (see the callers), rather than refusing everyone.
"""

from __future__ import annotations

import json
import time
from typing import Any

from excel_restaurant_pos.realtime.config import APP_NAME

ALIVE_TTL_S = 15
#: Counts and viewer lists of users nobody has touched for this long are dropped.
IDLE_TTL_S = 86400
ALIVE_PREFIX = f"{APP_NAME}:alive:"

#: KEYS: the user's counts. ARGV: process, limit, alive prefix, idle ttl. Drops the counts
#: of dead processes, then takes a connection if the total is under the limit (1) or not (0).
_TAKE = """
local total = 0
local counts = redis.call('HGETALL', KEYS[1])
for i = 1, #counts, 2 do
	if redis.call('EXISTS', ARGV[3] .. counts[i]) == 1 then
		total = total + tonumber(counts[i + 1])
	else
		redis.call('HDEL', KEYS[1], counts[i])
	end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

#: KEYS: the user's counts. ARGV: process. Gives a connection back.
_GIVE_BACK = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 1
"""

#: KEYS: a document's viewers. ARGV: alive prefix. The members of live processes, in the
#: order they opened it; those of dead processes are dropped.
_VIEWERS = """
local live = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
	local process = string.match(member, '^([^|]*)|')
	if process and redis.call('EXISTS', ARGV[1] .. process) == 1 then
		table.insert(live, member)
	else
		redis.call('ZREM', KEYS[1], member)
	end
end
return live
"""


class Presence:
	"""This process's view of what all the processes on its Redis share."""

	def __init__(self, redis_client: Any, process: str, whereabouts: dict[str, Any] | None = None):
		self.redis = redis_client
		self.process = process
		self.alive_key = ALIVE_PREFIX + process
		#: Where this process answers (its URL, host and pid), kept in its alive key.
		self.whereabouts = json.dumps({"process": process, **(whereabouts or {})})
		self._take = redis_client.register_script(_TAKE)
		self._give_back = redis_client.register_script(_GIVE_BACK)
		self._viewers = redis_client.register_script(_VIEWERS)

	def keep_alive(self) -> None:
		"""Renew this process's key: called every second by the server's sweep. A failure
		is not reported here: the bridge reports a Redis outage, once."""
		try:
			self.redis.set(self.alive_key, self.whereabouts, ex=ALIVE_TTL_S)
		except Exception:
			pass

	def leave(self) -> None:
		"""This process stops: what it counted stops counting now."""
		self.redis.delete(self.alive_key)

	def take_connection(self, site: str, user: str, limit: int) -> bool:
		"""Count one more connection of ``user`` unless all processes hold ``limit`` already."""
		return bool(self._take(keys=[_connections_key(site, user)], args=[self.process, limit, ALIVE_PREFIX, IDLE_TTL_S]))

	def give_back_connection(self, site: str, user: str) -> None:
		self._give_back(keys=[_connections_key(site, user)], args=[self.process])

	def opened(self, site: str, room: str, sid: str, user: str) -> None:
		"""``user``'s socket ``sid`` has the document of the ``open_doc:`` room open."""
		key = _viewers_key(site, room)
		pipe = self.redis.pipeline(transaction=False)
		pipe.zadd(key, {f"{self.process}|{sid}|{user}": time.time()}, nx=True)
		pipe.expire(key, IDLE_TTL_S)
		pipe.execute()

	def closed(self, site: str, room: str, sid: str, user: str) -> None:
		self.redis.zrem(_viewers_key(site, room), f"{self.process}|{sid}|{user}")

	def viewers(self, site: str, room: str) -> list[str]:
		"""The distinct users who have the document open, on any live process, in the order
		they opened it."""
		users: dict[str, None] = {}
		for member in self._viewers(keys=[_viewers_key(site, room)], args=[ALIVE_PREFIX]):
			users[(member.decode() if isinstance(member, bytes) else member).split("|", 2)[2]] = None
		return list(users)


def running_servers(redis_client: Any) -> list[dict[str, Any]]:
	"""Every live process on this Redis and where it answers, as each one last said."""
	keys = sorted(redis_client.scan_iter(match=ALIVE_PREFIX + "*", count=500))
	found = []
	for key, value in zip(keys, redis_client.mget(keys) if keys else []):
		try:
			record = json.loads(value)
		except (TypeError, ValueError):
			record = None
		if not isinstance(record, dict):  # a process that does not say where it is
			name = key.decode() if isinstance(key, bytes) else key
			record = {"process": name[len(ALIVE_PREFIX) :]}
		found.append(record)
	return found


def _connections_key(site: str, user: str) -> str:
	return f"{APP_NAME}:connections:{site}|{user}"


def _viewers_key(site: str, room: str) -> str:
	return f"{APP_NAME}:viewers:{site}|{room}"
