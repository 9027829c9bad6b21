"""The Redis bridge: from Redis to :class:`~excel_restaurant_pos.realtime.log.Delivery` values.

Two kinds of reader, each on its own connection:

* the channel readers take the pub/sub channels below and hand each message to an
  :class:`~excel_restaurant_pos.realtime.ingest.Ingester`, which appends it, parsed, to its
  site's event log (:mod:`~excel_restaurant_pos.realtime.log`) exactly once however many
  processes read the channel;
* the log reader takes the sites' logs in order and hands each entry to ``deliver``.

The process holding every ingester's lease *leads*: every append is made by its own Lua
calls or announced on the app channel (the publish helpers and the servers announce what
they append), so it learns of each from pub/sub. Its channel reader then reads the logs in
the same Lua call that appends, and delivers; its log reader no longer blocks on the log,
and reads it only when woken (more than one call's worth is waiting, the lease changed
hands) or once a second, for an append nobody announced. That saves a Redis round trip an
event, which is most of the CPU the log costs. Both paths deliver under one lock and pass
over what the other delivered, so each entry is delivered once and in order.

The channels are:

* ``events``, where Frappe publishes. v15 and newer send
  ``{"event", "message", "namespace": "<site>", "room"}``; v14 sends no ``namespace`` and
  prefixes Frappe's own rooms with ``<site>:``. Both become one :class:`Delivery`, so a room
  has one name on every Frappe version. A v14 room without the prefix (one an app named)
  goes to the site of a one-site bench.
* ``excel_restaurant_pos_events``, where :mod:`excel_restaurant_pos.realtime.utils`
  publishes ``{"namespace": "/excel_restaurant_pos/<site>", "room", "event", "message"}``.

The publish helpers append to the log themselves and mark what they announce on the app
channel ``"logged": true``; such a message is not appended again. The bridge knows these
formats and nothing about sockets. A message it cannot use is logged with the reason and
skipped; a lost Redis connection is retried with backoff and logged once per outage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ContextManager

from excel_restaurant_pos.realtime import log, metrics, rooms
from excel_restaurant_pos.realtime.config import Config
from excel_restaurant_pos.realtime.ingest import LEASE_CHECK_S, Ingester
from excel_restaurant_pos.realtime.log import Delivery
from excel_restaurant_pos.realtime.utils import APP_CHANNEL

FRAPPE_CHANNEL = "events"
#: Where the server processes sharing a Redis tell each other things (see ``on_control``).
CONTROL_CHANNEL = "excel_restaurant_pos:control"
#: Seconds after an outage's end during which a reader's failure counts as the same outage.
OUTAGE_QUIET_S = 5.0
#: The ``channel`` label of log entries in the messages metric.
LOG_CHANNEL = "log"
#: Seconds a leading process's log reader waits before it reads the log unasked.
LEAD_READ_S = 1.0
logger = logging.getLogger(__name__)


class BadMessage(ValueError):
	"""A Redis message that cannot be delivered; ``result`` is its metrics label."""

	def __init__(self, reason: str, result: str = "malformed"):
		super().__init__(reason)
		self.result = result


class Parser:
	"""Turns raw channel messages into deliveries for the configured sites."""

	def __init__(self, sites: tuple[str, ...], default_site: str | None):
		self.sites = frozenset(sites)
		self.default_site = default_site

	def parse(self, channel: str, raw: bytes | str) -> Delivery | None:
		"""The delivery a message asks for; ``None`` when it is already in the log."""
		try:
			data = json.loads(raw)
		except (TypeError, ValueError, UnicodeDecodeError) as exc:
			raise BadMessage(f"not JSON ({exc})") from None
		if not isinstance(data, dict):
			raise BadMessage("not a JSON object")
		event, room = data.get("event"), data.get("room")
		if not isinstance(event, str) or not event:
			raise BadMessage("no event name")
		if room is not None and not isinstance(room, str):
			raise BadMessage("room is not a string")
		if channel == APP_CHANNEL:
			return None if data.get("logged") is True else self._app_event(data, event, room or None)
		return self._frappe_event(data, event, room or None)

	def _frappe_event(self, data: dict, event: str, room: str | None) -> Delivery:
		site = data.get("namespace")
		if site is None:
			site, room = self._v14_site(room)
		if not isinstance(site, str) or site.lstrip("/") not in self.sites:
			raise BadMessage(f"unknown site {site!r}", "unknown_site")
		site = site.lstrip("/")
		return Delivery(site, "site", room, event, data.get("message"))

	def _v14_site(self, room: str | None) -> tuple[str, str | None]:
		"""The site and room of a Frappe v14 message, which has no namespace. Frappe's own
		rooms carry the site as a prefix (``site1.local:doc:ToDo/1``); a room an app names
		itself (``publish_realtime(room="kitchen")``) does not, and goes to the only site of a
		one-site bench. With several sites such a room is refused: no tenant is guessed."""
		site, colon, rest = (room or "").partition(":")
		if colon and site in self.sites:
			return site, rest or None
		if len(self.sites) == 1:
			return next(iter(self.sites)), room or None
		raise BadMessage(f"no namespace, and room {room!r} does not start with one of this bench's sites", "unknown_site")

	def _app_event(self, data: dict, event: str, room: str | None) -> Delivery:
		namespace = data.get("namespace")
		if not isinstance(namespace, str) or not namespace.startswith(rooms.APP_PREFIX):
			raise BadMessage(f"namespace {namespace!r} is not an app namespace")
		site = rooms.site_of_namespace(namespace, self.sites, self.default_site)
		if site is None:
			raise BadMessage(f"unknown site in namespace {namespace!r}", "unknown_site")
		return Delivery(site, "app", room, event, data.get("message"))


class Bridge:
	"""The readers of one server process, in green threads started by ``spawn`` (so this
	module does not depend on eventlet). ``connected`` is what ``/health`` reports.

	``positions`` (site → the last offset delivered) is where delivery is, whichever reader
	delivered: everything up to it was handed to ``deliver``. It starts at the newest entry
	of each log, and after an outage reading resumes from it, so nothing appended meanwhile
	is skipped.
	"""

	def __init__(
		self,
		config: Config,
		redis_client: Any,
		holder: str,
		deliver: Callable[[Delivery], None],
		*,
		batch: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
		retry_max: float = 5.0,
	):
		self.parser = Parser(config.sites, config.default_site)
		self.deliver = deliver
		#: Wraps the delivery of what one read of the log returned (the server's ``WriteBatch``).
		self.batch = batch
		#: Called with each message on the control channel, decoded (a dict).
		self.on_control: Callable[[dict], None] = lambda message: None
		self.retry_max = retry_max
		self.sites = config.sites
		self.positions: dict[str, str] = {}
		self.subscriptions: dict[str, tuple[str, ...]] = {config.redis_queue: (FRAPPE_CHANNEL, APP_CHANNEL, CONTROL_CHANNEL)}
		for url in config.event_redis_urls[1:]:
			self.subscriptions[url] = (FRAPPE_CHANNEL,)
		#: (Redis URL, what is read there) → whether that reader is connected.
		self._up: dict[tuple[str, str], bool] = {(url, "channels"): False for url in self.subscriptions}
		self._up[(config.redis_queue, "log")] = False
		self.ingesters = {url: Ingester(redis_client, url, holder, config.recovery_max_events, self.parse, self.skip) for url in self.subscriptions}
		#: Set to have a leading process's log reader read the log now.
		self._wake = threading.Event()
		for ingester in self.ingesters.values():
			ingester.on_change = self._wake.set
		#: Held while entries are delivered, by whichever reader delivers them.
		self._delivering = threading.Lock()
		self._connections: dict[tuple[str, str], Any] = {}
		#: Redis URL → whether its current outage was announced (see ``_keep_reading``).
		self._outages: dict[str, bool] = {}
		self._back_at: dict[str, float] = {}
		self._running = False

	@property
	def connected(self) -> bool:
		return all(self._up.values())

	@property
	def ready(self) -> bool:
		"""Whether the log reader knows where every site's log stands."""
		return len(self.positions) == len(self.sites)

	@property
	def leading(self) -> bool:
		"""Whether this process logs every channel it reads (see the module's docstring)."""
		return all(ingester.holding for ingester in self.ingesters.values())

	def start(self, spawn: Callable[..., Any]) -> None:
		self._running = True
		for reader in self._up:
			spawn(self._keep_reading, reader)
		spawn(self._keep_leases)

	def stop(self) -> None:
		self._running = False
		self._wake.set()
		for ingester in self.ingesters.values():
			ingester.release()
		for connection in list(self._connections.values()):
			_close(connection)

	def parse(self, channel: str, raw: bytes | str) -> Delivery | None:
		"""What a channel message asks to log (``None``: nothing); :class:`BadMessage` when
		it cannot be used."""
		delivery = self.parser.parse(channel, raw)
		metrics.REDIS_MESSAGES.labels(channel, "ok").inc()
		return delivery

	def skip(self, channel: str, raw: bytes | str, exc: Exception) -> None:
		"""A message that cannot be used is logged with the reason and counted."""
		metrics.REDIS_MESSAGES.labels(channel, getattr(exc, "result", "malformed")).inc()
		logger.warning("skipped message on %r: %s: %.200r", channel, exc, raw)

	def deliver_read(self, read: list) -> None:
		"""Deliver what one read of the logs returned (``XREAD``'s answer), past what the
		other reader delivered already: in one batch when it holds several entries, so each
		client's frames go out together. A single entry has nothing to write together, and
		holding its writes to write them later would only add work for every client."""
		if any(len(entries) >= log.BATCH for _, entries in read):
			self._wake.set()  # more may wait: a leading log reader reads on
		with self._delivering:
			fresh = []
			for key, entries in read:
				site = log.text(key)[len(log.KEY_PREFIX) :]
				position = log.offset_key(self.positions[site])
				entries = [entry for entry in entries if log.offset_key(log.text(entry[0])) > position]
				if entries:
					fresh.append((site, entries))
			several = sum(len(entries) for _, entries in fresh) > 1
			with self.batch() if several else contextlib.nullcontext():  # opened once the read is back: it holds writes
				for site, entries in fresh:
					self.handle_entries(site, entries)

	def handle_entries(self, site: str, entries: list) -> None:
		"""Deliver log entries in order; a malformed one is logged, counted and passed over."""
		for entry_id, fields in entries:
			offset = log.text(entry_id)
			try:
				delivery = log.decode(site, offset, fields)
			except ValueError as exc:
				metrics.REDIS_MESSAGES.labels(LOG_CHANNEL, "malformed").inc()
				logger.warning("skipped log entry %s of %s: %s", offset, site, exc)
			else:
				metrics.REDIS_MESSAGES.labels(LOG_CHANNEL, "ok").inc()
				try:
					self.deliver(delivery)
				except Exception:
					logger.exception("delivery of log entry %s of %s failed", offset, site)
			self.positions[site] = offset

	def _keep_reading(self, reader: tuple[str, str]) -> None:
		"""Run one reader, again after every failure, with backoff; an outage of a Redis is
		logged once, and its end once, however many readers it stopped."""
		import redis

		url, what = reader
		delay = 0.2
		while self._running:
			try:
				client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_keepalive=True, health_check_interval=10)
				read = self._read_channels if what == "channels" else self._read_log
				for _ in read(client, reader):
					delay = 0.2
					self._connected(reader)
			# Not only RedisError/OSError: redis-py raises ValueError or RuntimeError when the
			# connection is closed under a read (stop(), a dropped socket), and a reader that
			# died would leave the bridge reporting itself connected while reading nothing.
			except Exception as exc:
				self._up[reader] = False
				self._connections.pop(reader, None)
				if not self._running:
					return
				if url not in self._outages:
					# Readers notice an outage at different moments (one may still be blocked
					# on a read when another is back): a failure just after the end of one is
					# the same outage, not a new one to announce.
					announce = time.monotonic() - self._back_at.get(url, -OUTAGE_QUIET_S) >= OUTAGE_QUIET_S
					self._outages[url] = announce
					if announce:
						logger.error("redis %s unavailable (%s); retrying with backoff", url, exc)
				time.sleep(delay)
				delay = min(delay * 2, self.retry_max)

	def _connected(self, reader: tuple[str, str]) -> None:
		self._up[reader] = True
		url = reader[0]
		if url in self._outages and all(up for (other, _), up in self._up.items() if other == url):
			if self._outages.pop(url):
				self._back_at[url] = time.monotonic()
				metrics.REDIS_RECONNECTS.inc()
				logger.warning("redis %s is back", url)

	def _read_channels(self, client: Any, reader: tuple[str, str]) -> Any:
		"""Subscribe once the log reader knows where the logs stand (what is logged from
		then on is delivered), say so (by yielding), then read until stopped."""
		while self._running and not self.ready:
			time.sleep(0.05)
		pubsub = self._connections[reader] = client.pubsub(ignore_subscribe_messages=True)
		# Closed as soon as reading ends, by a failure or by stop(), not when collected: an
		# abandoned subscription is still counted (and sent to) by Redis beside the retry's.
		try:
			pubsub.subscribe(*self.subscriptions[reader[0]])
			logger.info("listening on redis %s: %s", reader[0], ", ".join(self.subscriptions[reader[0]]))
			yield
			ingester = self.ingesters[reader[0]]
			while self._running:
				received: list[tuple[str, Any]] = []
				message = pubsub.get_message(timeout=1.0)
				# With the first message, what Redis handed over with it (a commit's events,
				# published together): logged in one call, so they reach the log together.
				while message is not None:
					if message.get("type") == "message":
						channel = log.text(message["channel"])
						if channel == CONTROL_CHANNEL:
							if received:  # what came before it is logged before it acts
								self._log(ingester, received)
								received = []
							self._control(message["data"])
						else:
							received.append((channel, message["data"]))
					message = pubsub.get_message(timeout=0) if len(received) < log.BATCH else None
				if received:
					self._log(ingester, received)
		finally:
			_close(pubsub)

	def _log(self, ingester: Ingester, received: list[tuple[str, Any]]) -> None:
		"""Hand received messages to their ingester; while leading, deliver what the log
		holds past the positions, which the ingester read in the call that logged them."""
		read = ingester.receive(received, self.positions if self.leading else None)
		if read:
			self.deliver_read(read)

	def _read_log(self, client: Any, reader: tuple[str, str]) -> Any:
		"""Find where each site's log stands (once), say so, then read until stopped."""
		self._connections[reader] = client
		for site in self.sites:
			if site not in self.positions:
				self.positions[site] = log.last_offset(client, site)
		yield
		while self._running:
			leading = self.leading
			if leading:
				self._wake.wait(LEAD_READ_S)
				self._wake.clear()
			streams = {log.log_key(site): self.positions[site] for site in self.sites}
			read = client.xread(streams, count=log.BATCH, block=None if leading else 1000)
			if read:
				self.deliver_read(read)

	def _control(self, raw: bytes | str) -> None:
		try:
			message = json.loads(raw)
			self.on_control(message if isinstance(message, dict) else {})
		except Exception:
			logger.exception("control message %.200r failed", raw)

	def _keep_leases(self) -> None:
		"""Renew or take the ingesters' leases, for as long as the bridge runs."""
		while self._running:
			for ingester in self.ingesters.values():
				try:
					ingester.check_lease()
				except Exception as exc:  # Redis is down: the readers report the outage
					logger.debug("lease check of %s failed: %s", ingester.lease_key, exc)
			time.sleep(LEASE_CHECK_S)


def _close(connection: Any) -> None:
	"""Close a reader's Redis connection or subscription; one already broken may raise on
	close, and its reader is gone or leaving either way."""
	try:
		connection.close()
	except Exception:
		pass
