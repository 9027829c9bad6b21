"""Events published through Redis reach the right clients: rooms, users, whole namespaces,
Frappe's v14 and v15 message shapes, app events versus Frappe events, tenant isolation."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
import socketio
from conftest import SECRET
from harness import wait_for
from test_connect import token

from excel_restaurant_pos.realtime.server import MAX_WAITING_EVENTS, SocketServer

SITES = {"EXCEL_RESTAURANT_POS_SITES": "site1.local,site2.local", "FRAPPE_SITE": "site1.local"}


def frappe_v15(redis_url: str, site: str, event: str, message, room=None) -> None:
	"""Publish exactly as Frappe v15 does: ``frappe.as_json`` (indent=1, sorted keys) on ``events``."""
	body = {"event": event, "message": message, "room": room, "namespace": site}
	redis.Redis.from_url(redis_url).publish("events", json.dumps(body, indent=1, sort_keys=True, separators=(",", ": ")))


def frappe_v14(redis_url: str, site: str, event: str, message, room: str) -> None:
	"""Publish as Frappe v14 does: no namespace, the site as the room's prefix."""
	body = {"event": event, "message": message, "room": f"{site}:{room}"}
	redis.Redis.from_url(redis_url).publish("events", json.dumps(body, indent=1, sort_keys=True))


@pytest.fixture
def two_sites(realtime, js):
	"""A server with two sites and one client in each namespace of each site."""
	server = realtime(env=SITES)
	for client, namespace in {
		"s1": "/site1.local",
		"a1": "/excel_restaurant_pos/site1.local",
		"d1": "/excel_restaurant_pos/default",
		"s2": "/site2.local",
		"a2": "/excel_restaurant_pos/site2.local",
	}.items():
		assert js.connect(client, server.url + namespace, token=token())["type"] == "connect"
	return server


def seen(js, client: str, event: str) -> list:
	return [args[0] for args in js.received(client, event)]


def fence(js, publish, clients=("s1", "a1", "d1", "s2", "a2")) -> None:
	"""Publish a marker to every namespace and wait for it: what was sent before has arrived."""
	for site in ("site1.local", "site2.local"):
		frappe_v15(publish._standalone_config().redis_queue, site, "fence", site)
	for client in clients:
		js.wait_event(client, "fence")


def test_kitchen_sees_order_published_from_python(realtime, js, publish):
	server = realtime()
	js.connect("kitchen", server.url + "/excel_restaurant_pos/default", token=token("cook@example.com"))
	js.connect("bar", server.url + "/excel_restaurant_pos/default", token=token("barman@example.com"))
	js.emit("kitchen", "room:join", "kitchen")
	assert publish.publish_to_room("kitchen", "order:new", {"order_id": "ORD-001", "items": ["soup"]}) == 1
	assert js.wait_event("kitchen", "order:new") == [{"order_id": "ORD-001", "items": ["soup"]}]
	publish.publish_event("fence", None)
	js.wait_event("bar", "fence")
	assert seen(js, "bar", "order:new") == []


def test_user_room_and_namespace_broadcast(realtime, js, publish):
	server = realtime()
	js.connect("waiter", server.url + "/excel_restaurant_pos/default", token=token("waiter@example.com"))
	js.connect("cook", server.url + "/excel_restaurant_pos/default", token=token("cook@example.com"))
	publish.publish_to_user("waiter@example.com", "notification", {"message": "New order received"})
	publish.publish_event("menu:changed", {"item": "soup"})
	assert js.wait_event("cook", "menu:changed") == [{"item": "soup"}]
	assert js.wait_event("waiter", "menu:changed") == [{"item": "soup"}]
	assert seen(js, "waiter", "notification") == [{"message": "New order received"}]
	assert seen(js, "cook", "notification") == []


def test_frappe_v15_events_reach_both_namespaces_of_their_site_only(two_sites, js, publish, redis_url):
	frappe_v15(redis_url, "site1.local", "list_update", {"doctype": "ToDo", "name": "1"}, room="all")
	frappe_v15(redis_url, "site1.local", "task_progress", {"progress": 50}, room=None)
	fence(js, publish)
	for client in ("s1", "a1", "d1"):
		assert seen(js, client, "list_update") == [{"doctype": "ToDo", "name": "1"}], client
		assert seen(js, client, "task_progress") == [{"progress": 50}], client
	for client in ("s2", "a2"):
		assert seen(js, client, "list_update") == [] and seen(js, client, "task_progress") == [], client


def test_frappe_v14_site_prefixed_rooms(two_sites, js, publish, redis_url):
	js.emit("a2", "room:join", "kitchen")
	js.emit("a1", "room:join", "kitchen")
	frappe_v14(redis_url, "site2.local", "docinfo_update", {"doc": "ORD-9"}, room="kitchen")
	frappe_v14(redis_url, "site2.local", "list_update", {"doctype": "Order"}, room="all")
	fence(js, publish)
	assert seen(js, "a2", "docinfo_update") == [{"doc": "ORD-9"}]
	assert seen(js, "a1", "docinfo_update") == []
	assert seen(js, "s2", "list_update") == [{"doctype": "Order"}]
	assert seen(js, "s1", "list_update") == [] and seen(js, "a1", "list_update") == []


def test_frappe_v14_room_an_app_names_reaches_the_only_site(realtime, js, redis_url):
	"""v14's ``publish_realtime(room="kitchen")`` publishes the room with no site: on a
	one-site bench the kitchen display of that site gets it."""
	server = realtime()
	js.connect("kitchen", server.url + "/excel_restaurant_pos/default", token=token("cook@example.com"))
	js.emit("kitchen", "room:join", "kitchen")
	body = {"event": "order:new", "message": {"order_id": "ORD-14"}, "room": "kitchen"}
	redis.Redis.from_url(redis_url).publish("events", json.dumps(body, indent=1, sort_keys=True))
	assert js.wait_event("kitchen", "order:new") == [{"order_id": "ORD-14"}]


def test_frappe_v14_events_on_a_separate_socketio_redis(realtime, js, publish, own_redis):
	server = realtime(redis_socketio=own_redis.url)
	js.connect("c", server.url + "/default", token=token())
	frappe_v14(own_redis.url, "default", "list_update", {"doctype": "ToDo"}, room="all")
	assert js.wait_event("c", "list_update") == [{"doctype": "ToDo"}]


def test_app_events_never_reach_frappe_namespaces(two_sites, js, publish):
	publish.publish_event("order:updated", {"order_id": "ORD-1"}, site="site1.local")
	publish.publish_event("order:updated", {"order_id": "ORD-2"}, site="site2.local")
	fence(js, publish)
	assert seen(js, "a1", "order:updated") == [{"order_id": "ORD-1"}]
	assert seen(js, "d1", "order:updated") == [{"order_id": "ORD-1"}]
	assert seen(js, "a2", "order:updated") == [{"order_id": "ORD-2"}]
	assert seen(js, "s1", "order:updated") == [] and seen(js, "s2", "order:updated") == []


def test_default_alias_namespace_in_published_messages(two_sites, js, publish, monkeypatch):
	"""The helpers name the default site from the same configuration as the server."""
	for name, value in SITES.items():
		monkeypatch.setenv(name, value)
	publish._standalone_config.cache_clear()
	publish.publish_event("order:new", {"order_id": "ORD-3"}, namespace="/excel_restaurant_pos/default")
	fence(js, publish)
	assert seen(js, "a1", "order:new") == [{"order_id": "ORD-3"}]
	assert seen(js, "d1", "order:new") == [{"order_id": "ORD-3"}]
	assert seen(js, "a2", "order:new") == []


def test_malformed_messages_are_skipped_and_the_next_good_one_arrives(realtime, js, publish, redis_url):
	server = realtime()
	js.connect("c", server.url + "/excel_restaurant_pos/default", token=token())
	r = redis.Redis.from_url(redis_url)
	for bad in (b"{not json", b"[]", b'{"event": 5}', json.dumps({"event": "x", "room": 5, "namespace": "default"}), json.dumps({"event": "x", "namespace": "nosuch"}), b"\xff\xfe"):
		r.publish("events", bad)
	r.publish("excel_restaurant_pos_events", json.dumps({"namespace": "/nosuch", "event": "x"}))
	publish.publish_event("order:new", {"order_id": "after-junk"})
	assert js.wait_event("c", "order:new") == [{"order_id": "after-junk"}]
	assert server.metric("excel_pos_realtime_redis_messages_total", channel="events", result="malformed") == 5
	assert server.metric("excel_pos_realtime_redis_messages_total", channel="events", result="unknown_site") == 1
	assert server.metric("excel_pos_realtime_redis_messages_total", channel="excel_restaurant_pos_events", result="malformed") == 1
	assert "skipped message on 'events'" in server.log()


def test_each_message_is_delivered_once_per_server(realtime, js, publish):
	first, second = realtime(), realtime()
	js.connect("one", first.url + "/excel_restaurant_pos/default", token=token())
	js.connect("two", second.url + "/excel_restaurant_pos/default", token=token())
	assert publish.publish_event("order:new", {"n": 1}) == 2  # two servers subscribed
	publish.publish_event("fence", None)
	for client in ("one", "two"):
		js.wait_event(client, "fence")
		assert seen(js, client, "order:new") == [{"n": 1}]


def test_room_policy_over_the_wire(realtime, js):
	server = realtime(env={"EXCEL_RESTAURANT_POS_PUBLIC_ROOMS": "table:*"})
	url = server.url + "/excel_restaurant_pos/default"
	js.connect("guest", url, token=token("guest@example.com", user_type="Website User"))
	assert js.emit("guest", "room:join", "table:12") == [{"ok": True, "room": "table:12"}]
	assert js.emit("guest", "room:join", "kitchen") == [{"ok": False, "room": "kitchen", "error": "Not allowed to join room 'kitchen'"}]
	assert js.wait_event("guest", "room:error") == [{"room": "kitchen", "message": "Not allowed to join room 'kitchen'"}]
	assert js.emit("guest", "room:join", "all")[0]["ok"] is False
	assert js.emit("guest", "room:join", "user:waiter@example.com")[0]["error"] == "Cannot join another user's room"
	assert js.emit("guest", "room:join", "x" * 257)[0]["error"] == "Room must be a non-empty string of at most 256 characters"
	assert js.emit("guest", "room:join", {"not": "a room"})[0]["ok"] is False
	assert js.emit("guest", "room:join")[0]["ok"] is False
	assert js.emit("guest", "task_subscribe", "job-1") == [{"ok": True, "room": "task_progress:job-1"}]
	jwt_mode_doc = js.emit("guest", "doc_subscribe", "ToDo", "1")[0]
	assert jwt_mode_doc["ok"] is False and "Frappe" in jwt_mode_doc["error"]
	assert js.emit("guest", "room:leave", "table:12") == [{"ok": True, "room": "table:12"}]
	assert js.wait_event("guest", "room:left") == [{"room": "table:12"}]


def test_order_update_reaches_others_in_the_room(realtime, js):
	server = realtime()
	url = server.url + "/excel_restaurant_pos/default"
	js.connect("waiter", url, token=token("waiter@example.com"))
	js.connect("cook", url, token=token("cook@example.com"))
	js.connect("guest", url, token=token("guest@example.com", user_type="Website User"))
	js.emit("cook", "room:join", "kitchen")
	assert js.emit("waiter", "order:update", {"room": "kitchen", "order_id": "ORD-1", "status": "preparing"})[0]["ok"] is False
	js.emit("waiter", "room:join", "kitchen")
	assert js.emit("waiter", "order:update", {"room": "kitchen", "order_id": "ORD-1", "status": "preparing"}) == [{"ok": True, "room": "kitchen"}]
	update = js.wait_event("cook", "order:updated")[0]
	assert {key: update[key] for key in ("order_id", "status", "updated_by")} == {"order_id": "ORD-1", "status": "preparing", "updated_by": "waiter@example.com"}
	assert "T" in update["timestamp"]
	assert js.emit("guest", "order:update", {"room": "kitchen", "order_id": "ORD-1", "status": "x"})[0] == {"ok": False, "error": "Only System Users may update orders"}
	assert js.emit("cook", "order:update", "junk")[0]["ok"] is False
	assert seen(js, "waiter", "order:updated") == []


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_a_clients_events_are_handled_in_the_order_it_sent_them(realtime, js, transport):
	"""A waiter who joins the kitchen and at once sends an order through its statuses,
	without waiting for an answer, is handled as sent: the join before the first update,
	and the cook sees every status in order (a green thread per event let an update that
	waited on Redis be overtaken by the next). Over long-polling the client sends all 51 in
	one POST, past python-engineio's own limit of 16 packets a body."""
	server = realtime()
	url = server.url + "/excel_restaurant_pos/default"
	js.connect("cook", url, token=token("cook@example.com"))
	js.emit("cook", "room:join", "kitchen")
	js.connect("waiter", url, token=token("waiter@example.com"), transport=transport)
	js.emit_no_ack("waiter", "room:join", "kitchen")
	statuses = [f"step {n}" for n in range(50)]
	for status in statuses:
		js.emit_no_ack("waiter", "order:update", {"room": "kitchen", "order_id": "ORD-1", "status": status})
	js.wait_event("cook", "order:updated", where=lambda args: args[0]["status"] == statuses[-1])
	assert [args[0]["status"] for args in js.received("cook", "order:updated")] == statuses
	assert js.received("waiter", "order:error") == []


def test_a_clients_events_wait_in_order_past_a_failing_handler_and_up_to_a_bound(monkeypatch):
	"""The green thread that handles a client's events goes on past one whose handler
	raises, and handles what arrived meanwhile in order. While one handler waits, the
	client's reader queues at most ``MAX_WAITING_EVENTS`` and then waits too, so a client
	sending faster than its events are handled is read no further."""
	handled: list[str] = []
	gate = threading.Event()

	def handle(server, eio_sid, namespace, id, data):
		handled.append(data[0])
		if data[0] == "slow":
			gate.wait(10)
		if data[0] == "boom":
			raise RuntimeError("a handler's bug")

	monkeypatch.setattr(socketio.Server, "_handle_event", handle)
	server = SocketServer(async_mode="threading")
	sent = ["slow", "boom"] + [f"n{n}" for n in range(MAX_WAITING_EVENTS)]
	server._handle_event("eio-1", "/", None, ["slow"])
	wait_for(lambda: handled == ["slow"], 5, message="the first event under way")
	reader = threading.Thread(target=lambda: [server._handle_event("eio-1", "/", None, [name]) for name in sent[1:]])
	reader.start()
	wait_for(lambda: server.waiting_events["eio-1"].room is not None, 5, message="the reader to wait")
	assert [data[0] for _, _, data in server.waiting_events["eio-1"]] == sent[1:]  # MAX_WAITING_EVENTS + 1
	reader.join(0.2)
	assert reader.is_alive() and handled == ["slow"]
	gate.set()
	reader.join(5)
	wait_for(lambda: not server.waiting_events, 5, message="every event handled")
	assert handled == sent


def test_auth_refresh_on_a_live_connection(realtime, js):
	server = realtime()
	js.connect("c", server.url + "/excel_restaurant_pos/default", token=token("waiter@example.com", ttl=600))
	fresh = token("waiter@example.com", ttl=7200)
	reply = js.emit("c", "auth:refresh", {"token": fresh})[0]
	assert reply["ok"] is True and reply["exp"] > 0
	assert js.emit("c", "auth:refresh", token("cook@example.com"))[0] == {"ok": False, "error": "Token belongs to another user"}
	assert js.emit("c", "auth:refresh", {"token": token(ttl=-5)})[0] == {"ok": False, "error": "Unauthorized: token expired"}


def test_token_expiry_warns_then_disconnects(realtime, js):
	server = realtime(expiry_warning=5, expiry_grace=1)
	js.connect("c", server.url + "/excel_restaurant_pos/default", token=token(ttl=3))
	warning = js.wait_event("c", "auth:expired", timeout=5)[0]
	assert warning["exp"] > 0
	gone = js.wait(lambda item: item.get("id") == "c" and item["type"] == "disconnect", 10, "disconnect after exp")
	assert gone["reason"] == "io server disconnect"


def test_token_expiry_is_watched_from_a_refreshed_token_and_for_clients_connected_later(realtime, js):
	"""The sweep looks at the clients only when a token is due. Once it has passed with every
	token two hours away, a refresh to a token that expires sooner, and then a client
	connecting with such a token, are each warned and cut off on time all the same, while
	the long token stays."""
	server = realtime(expiry_warning=5, expiry_grace=1)
	ns = server.url + "/excel_restaurant_pos/default"
	js.connect("long", ns, token=token("host@example.com", ttl=7200))
	js.connect("refreshed", ns, token=token("waiter@example.com", ttl=7200))
	time.sleep(1.5)  # a sweep (once a second) passes with both tokens two hours away

	def warned_then_cut_off(client: str) -> None:
		assert js.wait_event(client, "auth:expired", timeout=5)[0]["exp"] > 0
		gone = js.wait(lambda item: item.get("id") == client and item["type"] == "disconnect", 10, f"{client} cut off after exp")
		assert gone["reason"] == "io server disconnect"

	assert js.emit("refreshed", "auth:refresh", {"token": token("waiter@example.com", ttl=3)})[0]["ok"] is True
	warned_then_cut_off("refreshed")  # the sweep that cut it off passed with the long token alone
	js.connect("late", ns, token=token("cook@example.com", ttl=3))
	warned_then_cut_off("late")
	assert js.received("long", "auth:expired") == []
	assert [item for item in js.events if item.get("id") == "long" and item["type"] == "disconnect"] == []


def test_secret_is_not_shared_between_sites(realtime, js, tmp_path):
	"""A token signed for one site does not open another site's namespace (per-site secrets)."""
	bench = tmp_path / "bench"
	(bench / "sites" / "site1.local").mkdir(parents=True)
	(bench / "sites" / "site2.local").mkdir(parents=True)
	(bench / "sites" / "common_site_config.json").write_text(json.dumps({"excel_restaurant_pos_socketio_auth": "jwt"}))
	(bench / "sites" / "site1.local" / "site_config.json").write_text(json.dumps({"jwt_secret_key": SECRET}))
	(bench / "sites" / "site2.local" / "site_config.json").write_text(json.dumps({"jwt_secret_key": "another-secret-of-site-two-0123456789"}))
	server = realtime(bench=str(bench))
	assert js.connect("ok", server.url + "/site1.local", token=token())["type"] == "connect"
	assert js.connect("no", server.url + "/site2.local", token=token())["message"] == "Unauthorized: invalid signature"


def test_events_keep_their_order_across_the_upgrade_from_polling(realtime, js, publish):
	"""The browser's default: long-polling first, then the upgrade to websocket, while events
	keep coming; then a burst on the websocket alone."""
	server = realtime()
	sent, stop = [], threading.Event()

	def publish_steadily() -> None:
		while not stop.wait(0.002):
			publish.publish_event("order:new", {"n": len(sent)})
			sent.append(len(sent))

	publisher = threading.Thread(target=publish_steadily)
	publisher.start()
	try:
		js.send(cmd="connect", id="kds", url=server.url + "/excel_restaurant_pos/default", opts={"transports": ["polling", "websocket"], "auth": {"token": token()}, "reconnection": False})
		js.wait(lambda item: item.get("id") == "kds" and item["type"] == "upgrade" and item["transport"] == "websocket", 10, "the upgrade")
		js.wait(lambda item: item.get("id") == "kds" and item.get("event") == "order:new" and len(js.received("kds", "order:new")) > 20, 10, "events after the upgrade")
	finally:
		stop.set()
		publisher.join(10)
	for _ in range(500):  # a burst, faster than one socket write per event
		publish.publish_event("order:new", {"n": len(sent), "pad": "x" * 2000})
		sent.append(len(sent))
	publish.publish_event("fence", {})
	js.wait_event("kds", "fence", timeout=30)
	received = [args[0]["n"] for args in js.received("kds", "order:new")]
	assert received == list(range(received[0], len(sent)))
	assert [item for item in js.events if item.get("type") == "disconnect"] == []
