"""The Redis bridge: how each message format becomes a delivery, and the reader's life with
a real Redis that goes away and comes back."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from harness import wait_for
from prometheus_client import REGISTRY

from excel_restaurant_pos.realtime import ingest, log
from excel_restaurant_pos.realtime.bridge import FRAPPE_CHANNEL, LEAD_READ_S, BadMessage, Bridge, Parser
from excel_restaurant_pos.realtime.config import Config, load_config
from excel_restaurant_pos.realtime.log import Delivery
from excel_restaurant_pos.realtime.utils import APP_CHANNEL, LOGGED, announcement, publish_event

SITES = ("site1.local", "site2.local")

#: A reader thread that dies with an exception is a bridge that silently stopped reading.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def v15(event: str, message: Any, room: str | None, site: str = "site1.local") -> str:
	"""As Frappe v15 ``emit_via_redis`` writes it: ``frappe.as_json`` (indent 1, sorted keys)."""
	return json.dumps({"event": event, "message": message, "namespace": site, "room": room}, indent=1, sort_keys=True)


def v14(event: str, message: Any, room: str) -> str:
	"""As Frappe v14 writes it: no namespace, the room prefixed with ``<site>:``."""
	return json.dumps({"event": event, "message": message, "room": room}, indent=1, sort_keys=True)


def app(event: str, message: Any, room: str | None, namespace: str = "/excel_restaurant_pos/site1.local") -> str:
	return json.dumps({"namespace": namespace, "room": room, "event": event, "message": message})


def bad(parser: Parser, channel: str, raw: Any) -> BadMessage:
	with pytest.raises(BadMessage) as error:
		parser.parse(channel, raw)
	return error.value


@pytest.fixture
def parser() -> Parser:
	return Parser(SITES, None)


# -- Parser: Frappe's channel ----------------------------------------------------------


def test_frappe_v15_message(parser):
	raw = v15("doc_update", {"doctype": "ToDo", "name": "1", "modified": "2024-01-02 03:04:05"}, "doc:ToDo/1")

	assert parser.parse(FRAPPE_CHANNEL, raw) == Delivery(
		site="site1.local",
		scope="site",
		room="doc:ToDo/1",
		event="doc_update",
		message={"doctype": "ToDo", "name": "1", "modified": "2024-01-02 03:04:05"},
	)


def test_frappe_message_as_bytes(parser):
	assert parser.parse(FRAPPE_CHANNEL, v15("list_update", {}, "doctype:ToDo").encode()).room == "doctype:ToDo"


@pytest.mark.parametrize("room", [None, ""])
def test_frappe_message_without_room_goes_to_the_whole_namespace(parser, room):
	delivery = parser.parse(FRAPPE_CHANNEL, v15("msgprint", "hello", room, site="site2.local"))

	assert delivery.site == "site2.local"
	assert delivery.room is None
	assert delivery.scope == "site"


def test_frappe_v14_message_takes_the_site_from_the_room(parser):
	delivery = parser.parse(FRAPPE_CHANNEL, v14("doc_update", {"name": "1"}, "site1.local:doc:ToDo/1"))

	assert delivery == Delivery("site1.local", "site", "doc:ToDo/1", "doc_update", {"name": "1"})


@pytest.mark.parametrize(
	("room", "expected"), [("site2.local:all", "all"), ("site2.local:user:cook@example.com", "user:cook@example.com"), ("site2.local:", None)]
)
def test_frappe_v14_rooms_have_the_same_name_as_v15(parser, room, expected):
	delivery = parser.parse(FRAPPE_CHANNEL, v14("eval_js", "x", room))

	assert (delivery.site, delivery.room) == ("site2.local", expected)


@pytest.mark.parametrize(
	"raw",
	[
		v15("e", 1, "all", site="other.local"),
		v15("e", 1, "all", site=""),
		json.dumps({"event": "e", "namespace": 5, "room": "all"}),
		v14("e", 1, "other.local:all"),
		v14("e", 1, "all"),
		json.dumps({"event": "e", "message": 1}),
	],
)
def test_unknown_site_on_frappe_channel(parser, raw):
	assert bad(parser, FRAPPE_CHANNEL, raw).result == "unknown_site"


@pytest.mark.parametrize(
	("room", "expected"),
	[("kitchen", "kitchen"), ("table:12", "table:12"), ("site1.local:table:12", "table:12"), ("", None), (None, None)],
)
def test_frappe_v14_room_without_a_site_goes_to_the_only_site(room, expected):
	"""``publish_realtime(room="kitchen")`` on v14 publishes the room as given; a bench of
	one site has only one place it can be for."""
	delivery = Parser(("site1.local",), None).parse(FRAPPE_CHANNEL, json.dumps({"event": "order:new", "message": 1, "room": room}))

	assert delivery == Delivery("site1.local", "site", expected, "order:new", 1)


def test_frappe_v14_room_without_a_site_is_refused_with_several_sites(parser):
	error = bad(parser, FRAPPE_CHANNEL, v14("order:new", 1, "kitchen"))

	assert error.result == "unknown_site"
	assert "'kitchen' does not start with one of this bench's sites" in str(error)


# -- Parser: the app's channel ---------------------------------------------------------


def test_app_message(parser):
	delivery = parser.parse(APP_CHANNEL, app("order:new", {"order_id": "ORD-001"}, "kitchen"))

	assert delivery == Delivery("site1.local", "app", "kitchen", "order:new", {"order_id": "ORD-001"})


def test_app_message_never_reaches_frappes_namespace():
	parser = Parser(SITES, "site1.local")

	delivery = parser.parse(APP_CHANNEL, app("order:new", {}, None))

	assert delivery.room is None
	assert delivery.scope == "app"


def test_app_message_to_the_default_alias():
	delivery = Parser(SITES, "site2.local").parse(APP_CHANNEL, app("e", 1, "r", namespace="/excel_restaurant_pos/default"))

	assert delivery.site == "site2.local"
	assert delivery.scope == "app"


def test_app_message_as_publish_event_writes_it(parser, monkeypatch):
	"""What the publish helpers log is what the log reader delivers, and what they announce
	on the channel the bridge does not log a second time."""
	sent: list[tuple] = []
	monkeypatch.setattr("excel_restaurant_pos.realtime.utils._send", lambda *args: sent.append(args) or 1)

	publish_event("order:new", {"order_id": "ORD-009"}, "kitchen", site="site2.local")

	_, site, entry, payload, _, _ = sent[0]
	assert log.decode(site, "1-0", entry) == Delivery("site2.local", "app", "kitchen", "order:new", {"order_id": "ORD-009"}, "1-0")
	assert parser.parse(APP_CHANNEL, payload) is None
	assert payload.endswith(LOGGED)  # which lets the bridge keep its place without its data
	assert parser.parse(APP_CHANNEL, payload.replace(',"logged":true', "")) == Delivery("site2.local", "app", "kitchen", "order:new", {"order_id": "ORD-009"})


@pytest.mark.parametrize(
	("namespace", "result"),
	[
		("/excel_restaurant_pos/other.local", "unknown_site"),
		("/excel_restaurant_pos/default", "unknown_site"),
		("/site1.local", "malformed"),
		("site1.local", "malformed"),
		(None, "malformed"),
		(7, "malformed"),
	],
)
def test_bad_app_namespace(parser, namespace, result):
	assert bad(parser, APP_CHANNEL, app("e", 1, "r", namespace=namespace)).result == result


# -- Parser: malformed -----------------------------------------------------------------


@pytest.mark.parametrize("channel", [FRAPPE_CHANNEL, APP_CHANNEL])
@pytest.mark.parametrize(
	("raw", "reason"),
	[
		("{not json", "not JSON"),
		(b"\xff\xfe\xfa", "not JSON"),
		("", "not JSON"),
		("[1, 2]", "not a JSON object"),
		('"text"', "not a JSON object"),
		("null", "not a JSON object"),
		(json.dumps({"namespace": "site1.local", "room": "all"}), "no event name"),
		(json.dumps({"event": "", "namespace": "site1.local"}), "no event name"),
		(json.dumps({"event": 5, "namespace": "site1.local"}), "no event name"),
		(json.dumps({"event": "e", "namespace": "site1.local", "room": 5}), "room is not a string"),
		(json.dumps({"event": "e", "namespace": "site1.local", "room": ["a"]}), "room is not a string"),
	],
)
def test_malformed(parser, channel, raw, reason):
	error = bad(parser, channel, raw)

	assert error.result == "malformed"
	assert str(error).startswith(reason)


# -- Bridge with a real Redis ----------------------------------------------------------


class Running:
	"""A started bridge, the deliveries its log reader makes (without their offsets), and its
	reader threads."""

	def __init__(self, config: Config):
		self.log: list[Delivery] = []
		self.threads: list[threading.Thread] = []
		self.bridge = Bridge(config, redis.Redis.from_url(config.redis_queue), "test", self.log.append, retry_max=0.5)
		self.bridge.start(self.spawn)

	@property
	def deliveries(self) -> list[Delivery]:
		return [dataclasses.replace(delivery, offset=None) for delivery in self.log]

	def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
		thread = threading.Thread(target=fn, args=args, daemon=True)
		self.threads.append(thread)
		thread.start()

	def stop(self) -> None:
		self.bridge.stop()
		for thread in self.threads:
			thread.join(10)
		assert not any(thread.is_alive() for thread in self.threads), "bridge readers still running after stop()"


@pytest.fixture
def start_bridge():
	started: list[Running] = []

	def start(queue_url: str, **overrides: Any) -> Running:
		config = load_config(overrides, env={"FRAPPE_REDIS_QUEUE": queue_url, "EXCEL_RESTAURANT_POS_SITES": "site1.local,site2.local"})
		running = Running(config)
		started.append(running)
		return running

	yield start
	for running in started:
		running.stop()


def listening(client: redis.Redis, *channels: str) -> Callable[[], bool]:
	"""True once Redis has a subscriber on every channel (so a publish cannot be missed)."""
	return lambda: all(count >= 1 for _, count in client.pubsub_numsub(*channels))


def messages_counted(channel: str, result: str) -> float:
	return REGISTRY.get_sample_value("excel_pos_realtime_redis_messages_total", {"channel": channel, "result": result}) or 0.0


def test_bridge_skips_bad_messages_and_delivers_good_ones(start_bridge, redis_server, redis_url, caplog):
	client = redis_server.client()
	malformed_before = messages_counted(FRAPPE_CHANNEL, "malformed")
	unknown_before = messages_counted(APP_CHANNEL, "unknown_site")
	running = start_bridge(redis_url)
	wait_for(lambda: running.bridge.connected, 10, message="bridge connected")
	wait_for(listening(client, FRAPPE_CHANNEL, APP_CHANNEL), 10, message="bridge subscribed")

	with caplog.at_level(logging.WARNING, logger="excel_restaurant_pos.realtime.bridge"):
		client.publish(FRAPPE_CHANNEL, "{not json")
		client.publish(FRAPPE_CHANNEL, "[]")
		client.publish(APP_CHANNEL, app("e", 1, "r", namespace="/excel_restaurant_pos/ghost.local"))
		client.publish(FRAPPE_CHANNEL, v15("doc_update", {"name": "1"}, "doc:ToDo/1"))
		client.publish(APP_CHANNEL, app("order:new", {"order_id": "ORD-001"}, "kitchen", namespace="/excel_restaurant_pos/site2.local"))
		wait_for(lambda: len(running.deliveries) >= 2, 10, message="two deliveries")

	assert running.deliveries == [
		Delivery("site1.local", "site", "doc:ToDo/1", "doc_update", {"name": "1"}),
		Delivery("site2.local", "app", "kitchen", "order:new", {"order_id": "ORD-001"}),
	]
	assert running.bridge.connected
	assert messages_counted(FRAPPE_CHANNEL, "malformed") - malformed_before == 2
	assert messages_counted(APP_CHANNEL, "unknown_site") - unknown_before == 1
	assert "not JSON" in caplog.text
	assert "unknown site in namespace '/excel_restaurant_pos/ghost.local'" in caplog.text


def test_bridge_survives_a_failing_delivery(start_bridge, redis_server, redis_url):
	client = redis_server.client()
	running = start_bridge(redis_url)
	calls: list[Delivery] = []

	def deliver(delivery: Delivery) -> None:
		calls.append(delivery)
		if delivery.event == "boom":
			raise RuntimeError("a client went away mid-emit")

	running.bridge.deliver = deliver
	wait_for(listening(client, FRAPPE_CHANNEL), 10, message="bridge subscribed")

	client.publish(FRAPPE_CHANNEL, v15("boom", 1, "all"))
	client.publish(FRAPPE_CHANNEL, v15("after", 2, "all"))

	wait_for(lambda: [delivery.event for delivery in calls] == ["boom", "after"], 10, message="both deliveries")
	assert running.bridge.connected


def occupy_lease(client: redis.Redis, url: str) -> None:
	"""Another process holds the lease on logging ``url``'s channels: a bridge started now
	follows, reading the log."""
	client.set(ingest.keys(url)[0], "another process", px=60_000)


def append_announced(client: redis.Redis, events: list[str], site: str = "site1.local") -> None:
	"""Append entries in one transaction, each announced as the publish helpers do."""
	with client.pipeline(transaction=True) as pipe:
		for event in events:
			pipe.xadd(log.log_key(site), Delivery(site, "app", "kitchen", event, {}).fields())
			pipe.publish(APP_CHANNEL, announcement(event, "kitchen"))
		pipe.execute()


@pytest.mark.parametrize("leading", [True, False], ids=["leading", "following"])
def test_what_one_read_of_the_log_returns_is_delivered_in_one_batch(start_bridge, redis_server, redis_url, leading):
	"""The server holds its writes while a batch is open, so one opens around what one read
	returned, and none stays open while the bridge waits on Redis for the next. A read of a
	single entry opens none: there is nothing to write together."""
	client = redis_server.client()
	if not leading:
		occupy_lease(client, redis_url)
	running = start_bridge(redis_url)
	seen: list[str] = []
	batch_open = threading.Event()

	@contextlib.contextmanager
	def batch():
		batch_open.set()
		seen.append("open")
		try:
			yield
		finally:
			seen.append("close")
			batch_open.clear()

	running.bridge.deliver = lambda delivery: seen.append(delivery.event)
	running.bridge.batch = batch
	wait_for(lambda: running.bridge.ready, 10, message="log reader ready")
	wait_for(listening(client, APP_CHANNEL), 10, message="bridge subscribed")
	wait_for(lambda: running.bridge.leading == leading, 10, message=f"leading is {leading}")

	append_announced(client, ["first", "second", "third"])

	wait_for(lambda: "close" in seen, 10, message="three deliveries and the batch closed")
	if not leading:
		reader_waits = lambda: any(c["cmd"] == "xread" and "b" in c["flags"] for c in client.client_list())  # noqa: E731
		wait_for(reader_waits, 10, message="the reader waiting on Redis again")
	assert seen == ["open", "first", "second", "third", "close"]
	assert not batch_open.is_set()

	append_announced(client, ["alone"])
	wait_for(lambda: "alone" in seen, 10, message="the single entry delivered")
	assert seen[5:] == ["alone"]
	assert running.bridge.leading == leading


def test_the_leading_process_reads_the_log_in_the_call_that_appends(start_bridge, redis_server, redis_url, monkeypatch):
	"""While a process logs every channel, it delivers what its own Lua call appended from
	that call's answer: no read of the log per event, only one a second unasked."""
	client = redis_server.client()
	reads: list[float] = []
	xread = redis.Redis.xread

	def counting_xread(self: redis.Redis, *args: Any, **kwargs: Any) -> Any:
		reads.append(time.monotonic())
		return xread(self, *args, **kwargs)

	monkeypatch.setattr(redis.Redis, "xread", counting_xread)
	running = start_bridge(redis_url)
	wait_for(lambda: running.bridge.leading, 10, message="the bridge leads")
	wait_for(listening(client, FRAPPE_CHANNEL), 10, message="bridge subscribed")
	began, before = time.monotonic(), len(reads)

	for n in range(30):  # one at a time: each is its own Lua call
		client.publish(FRAPPE_CHANNEL, v15("doc_update", {"n": n}, "doc:ToDo/1"))
		wait_for(lambda: len(running.deliveries) == n + 1, 10, message=f"delivery {n}")

	elapsed = time.monotonic() - began
	assert [delivery.message["n"] for delivery in running.deliveries] == list(range(30))
	assert len(reads) - before <= elapsed / LEAD_READ_S + 2, (len(reads) - before, elapsed)


def test_the_leading_process_delivers_appends_from_everywhere_once_and_in_order(start_bridge, redis_server, redis_url):
	"""Frappe's messages (appended by the leading process), the helpers' announced appends
	and a burst of more than one read's worth, all at once: every entry is delivered once,
	in the log's order, whichever of the bridge's two readers got to it first."""
	client = redis_server.client()
	running = start_bridge(redis_url)
	wait_for(lambda: running.bridge.leading, 10, message="the bridge leads")
	wait_for(listening(client, FRAPPE_CHANNEL, APP_CHANNEL), 10, message="bridge subscribed")

	def frappe() -> None:
		publisher = redis_server.client()
		for n in range(300):
			publisher.publish(FRAPPE_CHANNEL, v15("frappe", {"n": n}, "doc:ToDo/1"))

	def helpers() -> None:
		appender = redis_server.client()
		for n in range(0, 300, 3):
			append_announced(appender, [f"helper{n}", f"helper{n + 1}", f"helper{n + 2}"])
		append_announced(appender, [f"burst{n}" for n in range(2 * log.BATCH + 1)])

	threads = [threading.Thread(target=frappe), threading.Thread(target=helpers)]
	for thread in threads:
		thread.start()
	for thread in threads:
		thread.join(30)
	total = 300 + 300 + 2 * log.BATCH + 1
	wait_for(lambda: len(running.log) >= total, 15, message="every delivery")

	in_log = [log.text(offset) for offset, _ in client.xrange(log.log_key("site1.local"))]
	delivered = [delivery.offset for delivery in running.log]
	assert len(in_log) == total
	assert delivered == in_log
	assert running.bridge.leading


def test_a_process_that_loses_the_lease_reads_what_the_new_holder_logs(start_bridge, redis_server, redis_url):
	"""The leading process pauses past its lease (a busy machine) and another process takes
	the lease over and logs Frappe's messages from then on, announcing nothing: the paused
	one stops leading and delivers what the other logged, from the log, once each."""
	client = redis_server.client()
	running = start_bridge(redis_url)
	wait_for(lambda: running.bridge.leading, 10, message="the bridge leads")
	wait_for(listening(client, FRAPPE_CHANNEL), 10, message="bridge subscribed")
	client.publish(FRAPPE_CHANNEL, v15("before", {}, "doc:ToDo/1"))
	wait_for(lambda: len(running.log) == 1, 10, message="the first delivery")

	client.set(ingest.keys(redis_url)[0], "another process", px=60_000)  # expired and taken
	wait_for(lambda: not running.bridge.leading, 10, message="the bridge stops leading")
	for n in range(3):  # what the other process logs from Frappe's channel
		client.publish(FRAPPE_CHANNEL, v15("after", {"n": n}, "doc:ToDo/1"))
		client.xadd(log.log_key("site1.local"), Delivery("site1.local", "site", "doc:ToDo/1", "after", {"n": n}).fields())

	client.xadd(log.log_key("site1.local"), Delivery("site1.local", "site", None, "fence", {}).fields())

	wait_for(lambda: running.log and running.log[-1].event == "fence", 10, message="what the new holder logged")
	assert [(delivery.event, delivery.message) for delivery in running.deliveries] == [("before", {}), *(("after", {"n": n}) for n in range(3)), ("fence", {})]
	assert client.xlen(log.log_key("site1.local")) == 5  # the paused process logged nothing more


def test_bridge_reconnects_after_redis_restarts(start_bridge, own_redis, monkeypatch, caplog):
	attempts: list[str] = []
	original = redis.Redis.from_url

	def counting_from_url(url: str, **kwargs: Any) -> redis.Redis:
		attempts.append(url)
		return original(url, **kwargs)

	monkeypatch.setattr(redis.Redis, "from_url", counting_from_url)
	running = start_bridge(own_redis.url)
	wait_for(lambda: running.bridge.connected, 10, message="bridge connected")
	wait_for(listening(own_redis.client(), FRAPPE_CHANNEL, APP_CHANNEL), 10, message="bridge subscribed")

	with caplog.at_level(logging.INFO, logger="excel_restaurant_pos.realtime.bridge"):
		own_redis.stop()
		wait_for(lambda: not running.bridge.connected, 10, message="bridge to notice the outage")
		tries = len(attempts)
		wait_for(lambda: len(attempts) >= tries + 3, 10, message="several reconnection attempts")

		own_redis.start()
		wait_for(lambda: running.bridge.connected, 10, message="bridge back")
		client = own_redis.client()
		wait_for(listening(client, FRAPPE_CHANNEL, APP_CHANNEL), 10, message="bridge subscribed again")
		client.publish(APP_CHANNEL, app("order:new", {"order_id": "ORD-002"}, "kitchen"))
		wait_for(lambda: running.deliveries, 10, message="delivery after the outage")

	assert running.deliveries == [
		Delivery("site1.local", "app", "kitchen", "order:new", {"order_id": "ORD-002"})
	]
	outage_lines = [record for record in caplog.records if "unavailable" in record.getMessage()]
	assert len(outage_lines) == 1, "an outage is logged once, not once per retry"
	assert any("is back" in record.getMessage() for record in caplog.records)


def test_a_bridge_stopped_while_starting_leaves_no_subscriber_behind(redis_server, redis_url, monkeypatch):
	"""stop() can come while a reader is still subscribing (a server told to leave as it
	starts): that subscription must not outlive the reader, or Redis keeps counting, and
	sending to, a listener nobody reads."""
	positions_asked, release = threading.Event(), threading.Event()
	last_offset = log.last_offset

	def slow_last_offset(client: Any, site: str) -> str:
		positions_asked.set()
		release.wait(10)
		return last_offset(client, site)

	monkeypatch.setattr(log, "last_offset", slow_last_offset)
	running = Running(load_config({}, env={"FRAPPE_REDIS_QUEUE": redis_url, "EXCEL_RESTAURANT_POS_SITES": "site1.local"}))
	assert positions_asked.wait(10)
	running.bridge.stop()
	release.set()
	for thread in running.threads:
		thread.join(10)
	assert not any(thread.is_alive() for thread in running.threads)
	assert redis_server.client().pubsub_numsub(FRAPPE_CHANNEL, APP_CHANNEL) == [(FRAPPE_CHANNEL.encode(), 0), (APP_CHANNEL.encode(), 0)]


def test_bridge_reads_frappe_v14_events_from_redis_socketio(start_bridge, redis_server, redis_url, own_redis):
	queue, socketio = redis_server.client(), own_redis.client()
	running = start_bridge(redis_url, redis_socketio=own_redis.url)
	wait_for(lambda: running.bridge.connected, 10, message="bridge connected to both")
	wait_for(listening(queue, FRAPPE_CHANNEL, APP_CHANNEL), 10, message="queue subscribed")
	wait_for(listening(socketio, FRAPPE_CHANNEL), 10, message="socketio subscribed")
	assert socketio.pubsub_numsub(APP_CHANNEL) == [(APP_CHANNEL.encode(), 0)]

	socketio.publish(FRAPPE_CHANNEL, v14("list_update", {"doctype": "ToDo"}, "site2.local:doctype:ToDo"))
	wait_for(lambda: running.deliveries, 10, message="v14 delivery")
	assert running.deliveries == [
		Delivery("site2.local", "site", "doctype:ToDo", "list_update", {"doctype": "ToDo"})
	]

	own_redis.stop()
	wait_for(lambda: not running.bridge.connected, 10, message="one Redis down shows as not connected")
