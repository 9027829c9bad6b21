"""The publish helpers against a real Redis: what a realtime server subscribed to
``excel_restaurant_pos_events`` receives, and what the caller gets back.

Outside Frappe the helpers read configuration through ``load_config()``; the fixture points
``FRAPPE_REDIS_QUEUE`` at the test Redis and clears the helpers' caches around each test.
Inside Frappe the ``fake_frappe`` stand-in plays the running site.
"""

from __future__ import annotations

import datetime
import decimal
import json
import logging
import uuid
from typing import Any

import pytest
import redis
from fake_frappe import installed
from harness import free_port, wait_for

from excel_restaurant_pos.realtime import log, utils
from excel_restaurant_pos.realtime.utils import APP_CHANNEL, publish_event, publish_to_room, publish_to_user


class Listener:
	"""A subscriber on the app channel, like one realtime server process."""

	def __init__(self, url: str):
		self.client = redis.Redis.from_url(url, socket_timeout=5)
		self.pubsub = self.client.pubsub()
		self.pubsub.subscribe(APP_CHANNEL)
		wait_for(lambda: self._next_of_type("subscribe"), 5, message="subscription confirmed")

	def _next_of_type(self, kind: str) -> dict | None:
		message = self.pubsub.get_message(timeout=0.1)
		return message if message and message["type"] == kind else None

	def next(self, timeout: float = 5) -> tuple[str, dict[str, Any]]:
		"""The next published message: its channel and decoded JSON."""
		message = wait_for(lambda: self._next_of_type("message"), timeout, message="a published message")
		return message["channel"].decode(), json.loads(message["data"])

	def next_raw(self, timeout: float = 5) -> bytes:
		return wait_for(lambda: self._next_of_type("message"), timeout, message="a published message")["data"]

	def nothing_before_marker(self) -> None:
		"""Assert no message is queued: publish a marker and check it comes first."""
		self.client.publish(APP_CHANNEL, "marker")
		assert self.next_raw() == b"marker"

	def close(self) -> None:
		self.pubsub.close()
		self.client.close()


@pytest.fixture(autouse=True)
def standalone(monkeypatch, redis_url):
	"""Outside Frappe: the loader finds no bench and reads the test Redis from the env."""
	monkeypatch.setenv("FRAPPE_REDIS_QUEUE", redis_url)
	utils._standalone_config.cache_clear()
	utils._redis_client.cache_clear()
	yield
	utils._standalone_config.cache_clear()
	utils._redis_client.cache_clear()


@pytest.fixture
def listener(redis_url):
	subscriber = Listener(redis_url)
	yield subscriber
	subscriber.close()


@pytest.fixture
def frappe(redis_url):
	"""A running Frappe site, site1.local, whose queue Redis is the test Redis."""
	with installed("site1.local") as module:
		module.conf["redis_queue"] = redis_url
		yield module


def dead_redis_url() -> str:
	return f"redis://127.0.0.1:{free_port()}"


# -- wire format and namespaces ---------------------------------------------------------


def test_publish_event_wire_format(listener):
	sent = publish_event("order:new", {"order_id": "ORD-001"}, "kitchen", site="site1.local")

	channel, data = listener.next()
	assert sent == 1
	assert channel == "excel_restaurant_pos_events"
	assert data == {"namespace": "/excel_restaurant_pos/site1.local", "room": "kitchen", "event": "order:new", "message": {"order_id": "ORD-001"}, "logged": True}


def test_no_room_means_the_whole_namespace(listener):
	publish_event("menu:changed", None, site="site1.local")

	_, data = listener.next()
	assert data == {"namespace": "/excel_restaurant_pos/site1.local", "room": None, "event": "menu:changed", "message": None, "logged": True}


def test_explicit_namespace_wins_over_site(listener):
	publish_event("ping", {}, site="site1.local", namespace="/excel_restaurant_pos/site2.local")

	assert listener.next()[1]["namespace"] == "/excel_restaurant_pos/site2.local"


def test_outside_frappe_the_default_site_is_default(listener):
	publish_event("ping", {})

	assert listener.next()[1]["namespace"] == "/excel_restaurant_pos/default"


def test_outside_frappe_the_configured_default_site(listener, monkeypatch):
	monkeypatch.setenv("EXCEL_RESTAURANT_POS_SITES", "site1.local,site9.local")
	monkeypatch.setenv("FRAPPE_SITE", "site9.local")

	publish_event("ping", {})

	assert listener.next()[1]["namespace"] == "/excel_restaurant_pos/site9.local"


def test_publish_to_room(listener):
	assert publish_to_room("table:12", "order:ready", {"order_id": "ORD-002"}, site="site1.local") == 1

	_, data = listener.next()
	assert data == {"namespace": "/excel_restaurant_pos/site1.local", "room": "table:12", "event": "order:ready", "message": {"order_id": "ORD-002"}, "logged": True}


def test_publish_to_user(listener):
	assert publish_to_user("waiter@example.com", "call:waiter", {"table": 5}, site="site1.local") == 1

	_, data = listener.next()
	assert data["room"] == "user:waiter@example.com"
	assert data["event"] == "call:waiter"
	assert data["message"] == {"table": 5}


# -- the log ---------------------------------------------------------------------------


def test_every_event_is_kept_in_its_sites_log_even_with_no_server(redis_url):
	"""Nobody listens, yet the events wait for the clients that will recover them."""
	assert publish_to_room("kitchen", "order:new", {"order_id": "ORD-010"}, site="site1.local") == 0
	assert publish_event("menu:changed", None, site="site1.local") == 0

	entries = redis.Redis.from_url(redis_url).xrange("excel_restaurant_pos:log:site1.local")
	assert [log.decode("site1.local", offset, fields) for offset, fields in entries] == [
		log.Delivery("site1.local", "app", "kitchen", "order:new", {"order_id": "ORD-010"}, entries[0][0].decode()),
		log.Delivery("site1.local", "app", None, "menu:changed", None, entries[1][0].decode()),
	]


def test_the_log_is_bounded(redis_url, monkeypatch):
	monkeypatch.setenv("EXCEL_RESTAURANT_POS_SOCKETIO_RECOVERY_MAX_EVENTS", "100")
	utils._standalone_config.cache_clear()
	for n in range(1_000):
		publish_event("tick", n, site="site1.local")

	length = redis.Redis.from_url(redis_url).xlen("excel_restaurant_pos:log:site1.local")
	assert 100 <= length < 300  # trimmed by whole blocks ("MAXLEN ~"), which is what keeps it cheap


def test_a_namespace_of_another_app_is_refused(listener):
	with pytest.raises(ValueError, match="not a namespace of this app"):
		publish_event("ping", {}, namespace="/site1.local")
	listener.nothing_before_marker()


# -- subscribers counted ---------------------------------------------------------------


def test_returns_the_number_of_subscribers(redis_url):
	assert publish_event("ping", {}) == 0
	first, second = Listener(redis_url), Listener(redis_url)
	try:
		assert publish_event("ping", {}) == 2
		assert first.next()[1]["event"] == "ping"
		assert second.next()[1]["event"] == "ping"
	finally:
		first.close()
		second.close()


# -- Frappe JSON conventions ------------------------------------------------------------


class Doc:
	"""Anything with ``as_dict``, as Frappe documents have."""

	def as_dict(self) -> dict[str, Any]:
		return {"doctype": "POS Order", "name": "ORD-003"}


def test_frappe_json_conventions(listener):
	message = {
		"date": datetime.date(2024, 1, 2),
		"datetime": datetime.datetime(2024, 1, 2, 3, 4, 5),
		"datetime_us": datetime.datetime(2024, 1, 2, 3, 4, 5, 6),
		"time": datetime.time(3, 4, 5),
		"duration": datetime.timedelta(days=1, hours=2, minutes=3, seconds=4),
		"short": datetime.timedelta(minutes=5),
		"fraction": datetime.timedelta(seconds=1.5),
		"amount": decimal.Decimal("12.50"),
		"tags": {"hot"},
		"frozen": frozenset({7}),
		"doc": Doc(),
		"id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
		"nested": [{"when": datetime.date(2024, 12, 31)}],
	}

	publish_event("order:update", message, site="site1.local")

	assert listener.next()[1]["message"] == {
		"date": "2024-01-02",
		"datetime": "2024-01-02 03:04:05",
		"datetime_us": "2024-01-02 03:04:05.000006",
		"time": "03:04:05",
		"duration": "26:03:04",
		"short": "0:05:00",
		"fraction": "0:00:1.5",
		"amount": 12.5,
		"tags": ["hot"],
		"frozen": [7],
		"doc": {"doctype": "POS Order", "name": "ORD-003"},
		"id": "12345678-1234-5678-1234-567812345678",
		"nested": [{"when": "2024-12-31"}],
	}


def test_unencodable_message_raises_naming_the_event_and_sends_nothing(listener):
	with pytest.raises(TypeError, match="'order:broken'") as error:
		publish_event("order:broken", {"ok": 1, "bad": object()}, site="site1.local")

	assert "object" in str(error.value)
	listener.nothing_before_marker()


def test_unencodable_message_raises_before_deferring(listener, frappe):
	with pytest.raises(TypeError, match="'order:broken'"):
		publish_event("order:broken", {"bad": object()}, after_commit=True)

	assert frappe.db.after_commit.callbacks == []


# -- inside Frappe ---------------------------------------------------------------------


def test_inside_frappe_site_and_redis_come_from_the_running_site(listener, frappe, monkeypatch):
	monkeypatch.setenv("FRAPPE_REDIS_QUEUE", dead_redis_url())
	utils._standalone_config.cache_clear()

	assert publish_event("order:new", {"order_id": "ORD-004"}, "kitchen") == 1

	_, data = listener.next()
	assert data == {"namespace": "/excel_restaurant_pos/site1.local", "room": "kitchen", "event": "order:new", "message": {"order_id": "ORD-004"}, "logged": True}
	assert frappe.errors_logged == []


def test_inside_frappe_the_site_argument_still_wins(listener, frappe):
	publish_event("ping", {}, site="site2.local")

	assert listener.next()[1]["namespace"] == "/excel_restaurant_pos/site2.local"


def test_inside_frappe_without_redis_queue_uses_the_loader(listener, frappe):
	del frappe.conf["redis_queue"]

	assert publish_event("ping", {}) == 1
	assert listener.next()[1]["namespace"] == "/excel_restaurant_pos/site1.local"


def test_frappe_module_without_a_site_counts_as_outside(listener):
	"""``import frappe`` from a script with no site initialised is not a running site."""
	with installed(site=None):
		publish_event("ping", {})

	assert listener.next()[1]["namespace"] == "/excel_restaurant_pos/default"


def test_after_commit_sends_on_commit(listener, frappe):
	assert publish_event("order:paid", {"order_id": "ORD-005"}, "kitchen", after_commit=True) == 0
	listener.nothing_before_marker()

	assert frappe.db.after_commit.run() == [1]

	_, data = listener.next()
	assert data == {"namespace": "/excel_restaurant_pos/site1.local", "room": "kitchen", "event": "order:paid", "message": {"order_id": "ORD-005"}, "logged": True}


def test_after_commit_dropped_on_rollback(listener, frappe):
	publish_to_user("waiter@example.com", "order:paid", {"order_id": "ORD-006"}, after_commit=True)

	frappe.db.after_commit.reset()
	frappe.db.after_commit.run()

	listener.nothing_before_marker()


def test_after_commit_outside_frappe_sends_at_once(listener):
	assert publish_event("ping", {}, after_commit=True) == 1
	assert listener.next()[1]["event"] == "ping"


# -- Redis down ------------------------------------------------------------------------


def test_dead_redis_returns_zero_and_logs(monkeypatch, caplog):
	monkeypatch.setenv("FRAPPE_REDIS_QUEUE", dead_redis_url())
	utils._standalone_config.cache_clear()

	with caplog.at_level(logging.WARNING, logger="excel_restaurant_pos.realtime.utils"):
		assert publish_event("order:new", {"order_id": "ORD-007"}) == 0

	assert "'order:new'" in caplog.text


def test_dead_redis_inside_frappe_returns_zero_and_logs_an_error(frappe):
	frappe.conf["redis_queue"] = dead_redis_url()

	assert publish_to_room("kitchen", "order:new", {"order_id": "ORD-008"}) == 0

	assert len(frappe.errors_logged) == 1
	assert "'order:new'" in frappe.errors_logged[0]["title"]


def test_dead_redis_after_commit_does_not_break_the_commit(frappe):
	frappe.conf["redis_queue"] = dead_redis_url()
	publish_event("order:new", {}, after_commit=True)

	assert frappe.db.after_commit.run() == [0]
	assert len(frappe.errors_logged) == 1
