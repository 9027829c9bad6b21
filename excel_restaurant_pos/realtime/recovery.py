"""Connection state recovery: sessions that outlive their connection, kept in Redis.

A socket that asks for it (``auth: {token, recover: true}``) gets a session: a ``pid`` its
client keeps, and the server's record of who it is, which rooms it joined and where it
stands in its site's event log (:mod:`~excel_restaurant_pos.realtime.log`). When the
transport drops, or the server restarts, the client comes back with its ``pid`` and the
offset of the last event it received; if its token names the same user and site and it is
back within ``recovery_window`` seconds, it gets its rooms back and every event it missed,
in order, once, before any live event (the Socket.IO v4 recovery protocol, as
``socket.io-client`` ≥ 4.6 speaks it).

Where replay starts. The client's offset is the truth about what it received, but a client
that received nothing has none, and one whose last event is old may name an entry the log
has trimmed. So a session also records the offset of the last event *sent* to it and where
the log reader stood when it went away (``position``): when nothing was sent after the
client's offset, nothing for it lies between that offset and ``position`` either, and the
replay starts at ``position``. Replay never starts before the session began, nor before an
offset the client reported earlier (a stale offset never replays twice).

Redis keys:

* ``excel_restaurant_pos:process:<process>``: a hash of one process's live sessions
  (pid → JSON), its log positions and when it last wrote them. Rooms are written as they
  change; what was sent, every second (:meth:`Recovery.snapshot`), in one transaction with
  the positions, so the two always agree. It expires ten seconds after ``recovery_window``
  past its process's last write: the clients of a killed process recover from it.
* ``excel_restaurant_pos:session:<pid>``: a session whose client went away, recoverable for
  ``recovery_window`` seconds (kept ten more, to answer a late client "expired").

Live and held sessions (by socket id) are in :attr:`Recovery.live`, which the client
manager reads for every delivery: a recovering socket's events carry their offset, and a
socket being restored has them held until its replay is out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from excel_restaurant_pos.realtime import log, metrics
from excel_restaurant_pos.realtime.bridge import CONTROL_CHANNEL
from excel_restaurant_pos.realtime.config import APP_NAME, Config
from excel_restaurant_pos.realtime.log import Delivery

SESSION_PREFIX = f"{APP_NAME}:session:"
#: ``<prefix><pid>`` → the process whose hash holds that live session (it moves on recovery).
HOLDER_PREFIX = f"{APP_NAME}:holder:"
#: How long a holder record may outlive a process killed without a word.
HOLDER_TTL_S = 86400
PROCESS_PREFIX = f"{APP_NAME}:process:"
#: Socket ids a session remembers: room events a client sent are never replayed to it.
KEPT_SIDS = 8
#: How long a recovering handshake waits, right after start-up, for the log reader to find
#: where the log stands (without it no session can begin or be restored).
READY_WAIT_S = 3.0
logger = logging.getLogger(__name__)

#: KEYS: the session's key, its holder key, this process's hash. ARGV: pid, user, site,
#: namespace, this process, the process hash prefix, this hash's ttl, the control channel.
#: Takes a session for this process in one step, wherever it is: stored after its client
#: left, or live in a process's hash (that process is told, and lets its socket go). A
#: session of another user, site or namespace stays where it is. Returns ``{"taken", record,
#: "live" or "stored", seen, positions}`` (the last two for a live session, when its process
#: wrote them) or ``{reason}``.
_TAKE = """
local raw = redis.call('GET', KEYS[1])
local from, seen, positions = nil, '', ''
if not raw then
	local holder = redis.call('GET', KEYS[2]) or string.match(ARGV[1], '^([^.]*)[.]')
	if not holder then return {'unknown_pid'} end
	from = ARGV[6] .. holder
	raw = redis.call('HGET', from, ARGV[1])
	if not raw then return {'unknown_pid'} end
	seen = redis.call('HGET', from, '@seen') or ''
	positions = redis.call('HGET', from, '@positions') or ''
end
local session = cjson.decode(raw)
if session.user ~= ARGV[2] or session.site ~= ARGV[3] or session.namespace ~= ARGV[4] then
	return {'user_mismatch'}
end
if from then
	redis.call('HDEL', from, ARGV[1])
	if from ~= KEYS[3] then redis.call('PUBLISH', ARGV[8], cjson.encode({moved = ARGV[1], to = ARGV[5]})) end
else
	redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[3], ARGV[1], raw)
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('SET', KEYS[2], ARGV[5], 'EX', %d)
return {'taken', raw, from and 'live' or 'stored', seen, positions}
""" % HOLDER_TTL_S


@dataclasses.dataclass
class Session:
	"""What a recovering socket's server knows about it; see the module's docstring."""

	pid: str
	site: str
	user: str
	namespace: str
	#: Rooms the client joined itself (the same set as its Client's ``joined``).
	joined: set[str]
	#: The site's log position when the session began.
	created: str
	reported: str | None = None
	last_sent: str | None = None
	position: str | None = None
	sids: list[str] = dataclasses.field(default_factory=list)
	left_at: float | None = None
	#: While a connect is under way: the live events held back.
	held: list[Delivery] | None = None
	#: While restoring: where the replay starts, the events to replay, and where it ends.
	replay_from: str | None = None
	replay: list[Delivery] = dataclasses.field(default_factory=list)
	replayed_to: str | None = None
	#: Its socket is going: stored already, nothing more to store or send.
	closing: bool = False

	def to_json(self) -> str:
		return json.dumps({
			"pid": self.pid, "site": self.site, "user": self.user, "namespace": self.namespace,
			"joined": sorted(self.joined), "created": self.created, "reported": self.reported,
			"last_sent": self.last_sent, "position": self.position, "sids": self.sids, "left_at": self.left_at,
		})

	@classmethod
	def from_json(cls, raw: bytes | str) -> Session:
		data = json.loads(raw)
		return cls(
			pid=data["pid"], site=data["site"], user=data["user"], namespace=data["namespace"],
			joined=set(data["joined"]), created=data["created"], reported=data.get("reported"),
			last_sent=data.get("last_sent"), position=data.get("position"), sids=list(data.get("sids") or ()),
			left_at=data.get("left_at"),
		)


class Recovery:
	"""The sessions of one server process.

	``positions`` is the log reader's (site → offset); ``abort`` closes a socket's transport
	at once (used when a session's client comes back while its old socket still looks open).
	"""

	def __init__(self, config: Config, process: str, redis_client: Any, positions: dict[str, str], abort: Callable[[str, str], None]):
		self.window = config.recovery_window
		self.max_events = config.recovery_max_events
		self.redis = redis_client
		self.positions = positions
		self.abort = abort
		self.process = process
		self.process_key = PROCESS_PREFIX + self.process
		#: Socket id → session, for every recovering socket of this process.
		self.live: dict[str, Session] = {}
		self._pids: dict[str, str] = {}
		self._written: dict[str, str | None] = {}
		self._snapshot_failing = False
		self._take = redis_client.register_script(_TAKE)

	def wants(self, auth: Any, site: str) -> bool:
		"""Whether a handshake asks for recovery and it can be given (the log was reached).

		Clients whose server was restarted reconnect the moment it listens, often before its
		log reader has read where the log stands: such a handshake waits for that a moment
		rather than start without a session (its client would then think it missed
		everything, though nothing was lost)."""
		if self.window <= 0 or not isinstance(auth, dict) or auth.get("recover") is not True:
			return False
		deadline = time.monotonic() + READY_WAIT_S
		while site not in self.positions and time.monotonic() < deadline:
			time.sleep(0.05)
		return site in self.positions

	# -- connect --------------------------------------------------------------------------

	def hold(self, sid: str, namespace: str, site: str) -> Session:
		"""Start a recovering socket's session, holding back its live events until the
		connect is complete (see :meth:`connected`)."""
		session = Session(secrets.token_urlsafe(12), site, "", namespace, set(), self.positions[site], held=[])
		session.pid = f"{self.process}.{session.pid}"
		self.live[sid] = session
		return session

	def drop(self, sid: str) -> None:
		"""Forget a socket: its connect was refused, it moved to another process, or its
		disconnect is over (after :meth:`close`)."""
		session = self.live.pop(sid, None)
		if session is not None:
			self._let_go_of(session.pid, sid)

	def _let_go_of(self, pid: str, sid: str) -> None:
		"""``sid`` no longer stands for ``pid`` (unless a newer socket took it already)."""
		if self._pids.get(pid) == sid:
			del self._pids[pid]

	def restore(self, sid: str, user: str, auth: dict) -> tuple[Session, bool]:
		"""Turn the held session of ``sid`` into the one its ``pid`` names, when it may be;
		otherwise keep it as a new session. Returns the session and whether it was restored."""
		session = self.live[sid]
		session.user = user
		pid = auth.get("pid")
		if not isinstance(pid, str) or not pid:
			return self._begin(sid, session), False
		offset = auth.get("offset") if log.is_offset(auth.get("offset")) else None
		try:
			result, stored = self._claim(pid, sid, session, user, offset)
		except Exception as exc:  # Redis is down or the record is damaged: start afresh
			logger.warning("recovery unavailable site=%s user=%s: %s", session.site, user, exc)
			return self._begin(sid, session), False
		if stored is None:
			metrics.RECOVERIES.labels(result).inc()
			logger.info("recovery refused (%s) site=%s user=%s", result, session.site, user)
			if result == "expired":
				self._discard(pid)
			return self._begin(sid, session), False
		stored.held, stored.reported = session.held, log.later(offset, stored.reported)
		stored.sids = [*stored.sids[-(KEPT_SIDS - 1) :], sid]
		self.live[sid] = stored
		return stored, True

	@staticmethod
	def _replay_start(stored: Session, offset: str | None) -> str:
		"""Where the replay of a stored session starts (see the module's docstring): after the
		client's offset, never before the session began or an offset it reported before, and
		past the reader's position when nothing was sent after that point."""
		start = log.later(offset, log.later(stored.created, stored.reported))
		if stored.last_sent is None or log.offset_key(stored.last_sent) <= log.offset_key(start):
			start = log.later(start, stored.position)
		return start

	def _discard(self, pid: str) -> None:
		"""Forget a session taken for this process that cannot be recovered after all."""
		try:
			pipe = self.redis.pipeline(transaction=False)
			pipe.hdel(self.process_key, pid)
			pipe.delete(HOLDER_PREFIX + pid)
			pipe.execute()
		except Exception:  # its record expires with this process's hash
			pass

	def _owns(self, session: Session) -> bool:
		"""Whether ``session`` is its socket's (its last sid's), and that socket the one its
		``pid`` names: not a copy a newer socket of its client took over (see :meth:`_claim`)."""
		sid = session.sids[-1] if session.sids else None
		return sid is not None and self.live.get(sid) is session and self._pids.get(session.pid) == sid

	def _begin(self, sid: str, session: Session) -> Session:
		session.sids = [sid]
		if self.live.get(sid) is session:  # not a socket dropped meanwhile (see :meth:`moved`)
			self._pids[session.pid] = sid
		return session

	def start_over(self, sid: str) -> Session:
		"""A restore whose replay could not be read becomes a new session (a new ``pid``, so
		the client knows to fetch its state again) rather than a recovery with a hole."""
		old = self.live.pop(sid)
		self._pids.pop(old.pid, None)
		session = self.hold(sid, old.namespace, old.site)
		session.user, session.joined, session.held = old.user, old.joined, old.held
		metrics.RECOVERIES.labels("expired").inc()
		return self._begin(sid, session)

	def moved(self, message: dict) -> tuple[str, str] | None:
		"""Another process took over one of this process's sessions (its client came back
		there while its old socket here still looked open): forget it without storing it,
		and return that socket's ``(sid, namespace)`` to close."""
		sid = self._pids.get(message.get("moved")) if message.get("to") != self.process else None
		session = self.live.get(sid) if sid is not None else None
		if session is None:
			return None
		self.drop(sid)  # a restore under way here is abandoned too: the other process has it
		return sid, session.namespace

	def rooms_changed(self, sid: str) -> None:
		"""A live session's client joined or left a room: store it now."""
		session = self.live.get(sid)
		if session is not None:
			self.save(session)

	def _claim(self, pid: str, sid: str, session: Session, user: str, offset: str | None) -> tuple[str, Session | None]:
		"""Take the session ``pid`` names for socket ``sid``: ``(result, session)``, with
		``None`` when it cannot be recovered. Another user's token takes nothing.

		The newest socket to ask for a ``pid`` has it: a client whose connect was cut off
		asks again with the same ``pid`` while the first connect may still wait on Redis
		here. That one is closed, and when its wait ends it finds the ``pid`` gone
		(``superseded``) and leaves the session to the newer socket."""
		old_sid = self._pids.get(pid)
		if old_sid is not None:  # its old socket has not noticed yet that its client left
			old = self.live.get(old_sid)
			if old is None or (old.user, old.site, old.namespace) != (user, session.site, session.namespace):
				return "user_mismatch", None
			self.abort(old_sid, old.namespace)  # runs its disconnect, which stores the session
		self._pids[pid] = sid
		try:
			result, stored = self._load(pid, session, user, offset)
		except Exception:
			self._let_go_of(pid, sid)
			raise
		if self._pids.get(pid) != sid:
			return "superseded", None  # what it took stays in this process's hash for the newer one
		if stored is None:
			self._let_go_of(pid, sid)
		return result, stored

	def _load(self, pid: str, session: Session, user: str, offset: str | None) -> tuple[str, Session | None]:
		"""Take the session's record from Redis, wherever it is, and check that what its
		client missed is still in the log; the replay's start is set on the session."""
		taken = self._take(
			keys=[SESSION_PREFIX + pid, HOLDER_PREFIX + pid, self.process_key],
			args=[pid, user, session.site, session.namespace, self.process, PROCESS_PREFIX, self._ttl(), CONTROL_CHANNEL],
		)
		if taken[0] != b"taken" and taken[0] != "taken":
			return log.text(taken[0]), None
		raw, where, seen, positions = (log.text(value) for value in taken[1:])
		stored = Session.from_json(raw)
		if where == "live":  # its process stopped without a word, or never noticed it left
			stored.left_at = float(seen) if seen else time.time()
			stored.position = json.loads(positions).get(stored.site) if positions else None
		if stored.left_at is None or time.time() - stored.left_at > self.window:
			return "expired", None
		start = self._replay_start(stored, offset)
		if log.was_trimmed_after(self.redis, stored.site, start, self.max_events):
			return "expired", None  # what it missed is no longer in the log
		stored.replay_from = stored.replayed_to = start
		return "recovered", stored

	def replay(self, session: Session, scope_namespaces: Callable[[str], tuple[str, ...]], auto_rooms: tuple[str, ...]) -> None:
		"""Read what a restored session missed, up to where the log reader stands: what lies
		beyond reaches the session through the reader, held until the replay is out. (Its
		socket is in its rooms by now, so nothing falls between the two.)"""
		wanted = set(auto_rooms) | session.joined
		for delivery in log.read_after(self.redis, session.site, session.replayed_to):
			if log.offset_key(delivery.offset) > log.offset_key(self.positions[session.site]):
				break
			session.replayed_to = delivery.offset
			if (delivery.room is None or delivery.room in wanted) and delivery.skip not in session.sids and session.namespace in scope_namespaces(delivery.scope):
				session.replay.append(delivery)
		metrics.RECOVERIES.labels("recovered").inc()

	def connected(self, sid: str, send: Callable[[Delivery], None]) -> int:
		"""The CONNECT reply is out: send the replay, then what was held back (less what the
		replay already covered), and let live events through. Returns how many were replayed."""
		session = self.live.get(sid)
		if session is None or session.held is None:
			return 0
		until, replayed = session.replayed_to, len(session.replay)
		pending = session.replay + [d for d in session.held if until is None or log.offset_key(d.offset) > log.offset_key(until)]
		session.held, session.replay = None, []
		for delivery in pending:
			send(delivery)
		if pending:
			session.last_sent = pending[-1].offset
		return replayed

	# -- state in Redis -------------------------------------------------------------------

	def save(self, session: Session) -> None:
		"""Write a live session's record now (at connect and when its rooms change), unless
		another process has taken it meanwhile."""
		if session.closing or not self._owns(session):
			return
		try:
			pipe = self.redis.pipeline(transaction=True)
			pipe.hset(self.process_key, session.pid, session.to_json())
			pipe.expire(self.process_key, self._ttl())
			pipe.set(HOLDER_PREFIX + session.pid, self.process, ex=HOLDER_TTL_S)
			pipe.execute()
			self._written[session.pid] = session.last_sent
		except Exception as exc:
			logger.warning("could not store session of site=%s user=%s: %s", session.site, session.user, exc)

	def close(self, sid: str) -> None:
		"""The socket is gone: keep its session for ``recovery_window`` seconds.

		Its Engine.IO socket still takes packets until the disconnect handler returns, and
		storing the session waits on Redis: from here on its events are held back (and
		dropped with it by :meth:`drop`, which the handler calls last), as they lie past the
		position stored and will be replayed."""
		session = self.live.get(sid)
		if session is None:
			return
		session.closing = True
		if not self._owns(session):
			return  # a newer socket of its client has the session (see :meth:`_claim`)
		if session.held is not None:
			if session.replay_from is None:
				return  # a new session whose client never heard of it
			session.position = session.replay_from  # a restore that did not finish: as it was
		else:
			session.position = self.positions.get(session.site)
			session.held = []
		session.left_at = time.time()
		try:
			pipe = self.redis.pipeline(transaction=True)
			pipe.set(SESSION_PREFIX + session.pid, session.to_json(), ex=self._ttl())
			pipe.hdel(self.process_key, session.pid)
			pipe.delete(HOLDER_PREFIX + session.pid)
			pipe.execute()
		except Exception as exc:
			logger.warning("could not keep session of site=%s user=%s for recovery: %s", session.site, session.user, exc)
		self._written.pop(session.pid, None)

	def snapshot(self) -> None:
		"""Write what was sent to each session since the last snapshot, with the positions,
		so a process killed without warning leaves its clients recoverable."""
		if not self.live and not self._written:
			return
		try:
			self._write_snapshot()
			self._snapshot_failing = False
		except Exception as exc:
			if not self._snapshot_failing:
				logger.warning("could not store sessions (%s); retrying every second", exc)
			self._snapshot_failing = True

	def _write_snapshot(self) -> None:
		owned = [session for session in self.live.values() if session.held is None and self._owns(session)]
		changed = {session.pid: session.to_json() for session in owned if self._written.get(session.pid, "") != session.last_sent}
		pipe = self.redis.pipeline(transaction=True)
		pipe.hset(self.process_key, mapping={**changed, "@seen": repr(time.time()), "@positions": json.dumps(self.positions)})
		pipe.expire(self.process_key, self._ttl())
		pipe.execute()
		for session in owned:
			if session.pid in changed:
				self._written[session.pid] = session.last_sent

	def _ttl(self) -> int:
		"""Records outlive the window a little, so a late client hears "expired", not "unknown"."""
		return int(self.window) + 10
