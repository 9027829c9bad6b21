"""The Redis bridge: from Redis channels to :class:`Delivery` values.

Two channels are read:

* ``events``, where Frappe publishes. v15 and newer send
  ``{"event", "message", "namespace": "<site>", "room"}``; v14 sends no ``namespace`` and
  prefixes every room with ``<site>:``. Both become one :class:`Delivery`, so a room has one
  name on every Frappe version.
* ``excel_restaurant_pos_events``, where :mod:`excel_restaurant_pos.realtime.utils`
  publishes ``{"namespace": "/excel_restaurant_pos/<site>", "room", "event", "message"}``.

The bridge knows these formats and nothing about sockets: it hands each delivery to a
callback. A message it cannot use is logged with the reason and skipped; a lost Redis
connection is retried with backoff and logged once per outage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from excel_restaurant_pos.realtime import metrics, rooms
from excel_restaurant_pos.realtime.config import Config
from excel_restaurant_pos.realtime.utils import APP_CHANNEL

FRAPPE_CHANNEL = "events"
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Delivery:
	"""One event for local clients: emit ``event`` with ``message`` to ``room`` (the whole
	namespace when ``None``) in each of ``namespaces``."""

	site: str
	namespaces: tuple[str, ...]
	room: str | None
	event: str
	message: Any


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

	def parse(self, channel: str, raw: bytes | str) -> Delivery:
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
			return self._app_event(data, event, room or None)
		return self._frappe_event(data, event, room or None)

	def _frappe_event(self, data: dict, event: str, room: str | None) -> Delivery:
		site = data.get("namespace")
		if site is None:
			# Frappe v14: the site is the room's prefix ("site1.local:doc:ToDo/1").
			site, colon, room = (room or "").partition(":")
			if not colon:
				raise BadMessage("no namespace and no site-prefixed room", "unknown_site")
			room = room or None
		if not isinstance(site, str) or site.lstrip("/") not in self.sites:
			raise BadMessage(f"unknown site {site!r}", "unknown_site")
		site = site.lstrip("/")
		return Delivery(site, rooms.namespaces_of_site(site, self.default_site, frappe_events=True), room, event, data.get("message"))

	def _app_event(self, data: dict, event: str, room: str | None) -> Delivery:
		namespace = data.get("namespace")
		if not isinstance(namespace, str) or not namespace.startswith(rooms.APP_PREFIX):
			raise BadMessage(f"namespace {namespace!r} is not an app namespace")
		site = rooms.site_of_namespace(namespace, self.sites, self.default_site)
		if site is None:
			raise BadMessage(f"unknown site in namespace {namespace!r}", "unknown_site")
		return Delivery(site, rooms.namespaces_of_site(site, self.default_site, frappe_events=False), room, event, data.get("message"))


class Bridge:
	"""Subscribes to the channels on each Redis and calls ``deliver`` for every good message.

	One reader per Redis URL, each in its own green thread (started by ``spawn``, so this
	module does not depend on eventlet). ``connected`` is what ``/health`` reports.
	"""

	def __init__(self, config: Config, deliver: Callable[[Delivery], None], *, retry_max: float = 5.0):
		self.parser = Parser(config.sites, config.default_site)
		self.deliver = deliver
		self.retry_max = retry_max
		self.subscriptions: dict[str, tuple[str, ...]] = {config.redis_queue: (FRAPPE_CHANNEL, APP_CHANNEL)}
		for url in config.event_redis_urls[1:]:
			self.subscriptions[url] = (FRAPPE_CHANNEL,)
		self._up: dict[str, bool] = dict.fromkeys(self.subscriptions, False)
		self._pubsubs: dict[str, Any] = {}
		self._running = False

	@property
	def connected(self) -> bool:
		return all(self._up.values())

	def start(self, spawn: Callable[..., Any]) -> None:
		self._running = True
		for url in self.subscriptions:
			spawn(self._read_forever, url)

	def stop(self) -> None:
		self._running = False
		for pubsub in list(self._pubsubs.values()):
			try:
				pubsub.close()
			except Exception:  # closing a broken connection may raise; we are leaving anyway
				pass

	def handle(self, channel: str, raw: bytes | str) -> None:
		"""Parse and deliver one message; a bad one is logged and counted, never raised."""
		try:
			delivery = self.parser.parse(channel, raw)
		except BadMessage as exc:
			metrics.REDIS_MESSAGES.labels(channel, exc.result).inc()
			logger.warning("skipped message on %r: %s: %.200r", channel, exc, raw)
			return
		metrics.REDIS_MESSAGES.labels(channel, "ok").inc()
		try:
			self.deliver(delivery)
		except Exception:
			logger.exception("delivery of %r on %r failed", delivery.event, channel)

	def _read_forever(self, url: str) -> None:
		import redis

		delay, outage_logged = 0.2, False
		while self._running:
			try:
				client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_keepalive=True, health_check_interval=10)
				pubsub = client.pubsub(ignore_subscribe_messages=True)
				pubsub.subscribe(*self.subscriptions[url])
				self._pubsubs[url] = pubsub
				self._up[url] = True
				delay = 0.2
				if outage_logged:
					metrics.REDIS_RECONNECTS.inc()
					logger.warning("redis %s is back; listening on %s", url, ", ".join(self.subscriptions[url]))
					outage_logged = False
				else:
					logger.info("listening on redis %s: %s", url, ", ".join(self.subscriptions[url]))
				while self._running:
					message = pubsub.get_message(timeout=1.0)
					if message is not None and message.get("type") == "message":
						channel = message["channel"]
						self.handle(channel.decode() if isinstance(channel, bytes) else channel, message["data"])
			# Not only RedisError/OSError: redis-py raises ValueError or RuntimeError when the
			# connection is closed under a read (stop(), a dropped socket), and a reader that
			# died would leave the bridge reporting itself connected while reading nothing.
			except Exception as exc:
				self._up[url] = False
				self._pubsubs.pop(url, None)
				if not self._running:
					return
				if not outage_logged:
					logger.error("redis %s unavailable (%s); retrying with backoff", url, exc)
					outage_logged = True
				time.sleep(delay)
				delay = min(delay * 2, self.retry_max)
