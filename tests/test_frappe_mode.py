"""``frappe`` auth mode against the Frappe API stand-in: what Frappe receives, the socket
secret, permission checks on v14/v15 and newest Frappe, and a Frappe that is slow or down."""

from __future__ import annotations

import time

import pytest
from conftest import OTHER_SECRET
from harness import TcpProxy, assert_no_traceback, wait_for
from test_connect import token

from excel_restaurant_pos.realtime.config import load_config
from excel_restaurant_pos.realtime.connect import Identity
from excel_restaurant_pos.realtime.events import Client
from excel_restaurant_pos.realtime.server import RealtimeServer

SITES = {"EXCEL_RESTAURANT_POS_SITES": "site1.local,site2.local"}


@pytest.fixture
def frappe_server(realtime, frappe_standin):
	"""A server in ``frappe`` mode whose Frappe is the stand-in."""
	return realtime(auth_mode="frappe", frappe_url=frappe_standin.url, frappe_timeout=2, env=SITES)


def test_connect_asks_frappe_with_the_clients_token_and_site(frappe_server, frappe_standin, js):
	bearer = token("waiter@example.com")
	reply = js.connect("c", frappe_server.url + "/excel_restaurant_pos/site1.local", token=bearer, headers={"Host": "evil.example:1", "X-Frappe-Site-Name": "site2.local"})
	assert reply["type"] == "connect"
	(call,) = frappe_standin.calls("frappe.realtime.get_user_info")
	assert call["headers"]["authorization"] == f"Bearer {bearer}"
	assert call["headers"]["host"] == "site1.local"
	assert call["headers"]["x-frappe-site-name"] == "site1.local"
	assert "x-frappe-socket-secret" not in call["headers"]
	assert "cookie" not in call["headers"]


def test_refusals_in_frappe_mode(frappe_server, frappe_standin, js):
	url = frappe_server.url + "/excel_restaurant_pos/site1.local"
	assert js.connect("other", url, token=token(secret=OTHER_SECRET))["message"] == "Unauthorized: invalid signature"
	assert js.connect("gone", url, token=token("gone@example.com"))["message"] == "Unauthorized: user 'gone@example.com' is unknown or disabled"
	assert js.connect("nobody", url, token=token("nobody@example.com"))["type"] == "connect_error"
	assert js.connect("ns", frappe_server.url + "/excel_restaurant_pos/nosuch", token=token())["message"] == "Invalid namespace"
	assert len(frappe_standin.requests) == 3  # the bad namespace never reached Frappe


def test_hostile_origin_never_reaches_frappe(realtime, frappe_standin, js):
	server = realtime(auth_mode="frappe", frappe_url=frappe_standin.url, env={**SITES, "EXCEL_RESTAURANT_POS_ALLOWED_ORIGINS": "https://pos.example.com"})
	reply = js.connect("c", server.url + "/site1.local", token=token(), headers={"Origin": "https://evil.example"})
	assert reply["message"] == "Invalid origin"
	assert frappe_standin.requests == []


def test_user_type_and_installed_apps_come_from_frappe(frappe_server, frappe_standin, js, publish):
	"""The token says System User; Frappe says Website User, and Frappe wins."""
	js.connect("c", frappe_server.url + "/excel_restaurant_pos/site1.local", token=token("guest@example.com", user_type="System User"))
	assert js.emit("c", "room:join", "all")[0]["error"] == "Only System Users may join 'all'"


def test_socket_secret_from_redis_is_sent(frappe_server, frappe_standin, js, redis_url):
	import redis

	redis.Redis.from_url(redis_url).set("socketio_auth_secret", "s3cr3t-from-frappe")
	frappe_standin.socket_secret = "s3cr3t-from-frappe"
	frappe_standin.newest = True
	# the secret is re-read once a minute; a fresh server reads it at its first connect
	assert js.connect("c", frappe_server.url + "/site1.local", token=token())["type"] == "connect"
	(call,) = frappe_standin.calls("frappe.realtime.get_user_info")
	assert call["headers"]["x-frappe-socket-secret"] == "s3cr3t-from-frappe"


def test_verified_tokens_are_cached_briefly(frappe_server, frappe_standin, js):
	bearer = token()
	for client in ("a", "b", "c"):
		assert js.connect(client, frappe_server.url + "/site1.local", token=bearer)["type"] == "connect"
	assert len(frappe_standin.calls("frappe.realtime.get_user_info")) == 1


@pytest.mark.parametrize("newest", [False, True], ids=["v14-v15-can_subscribe", "newest-has_permission"])
def test_document_rooms_ask_frappe(frappe_server, frappe_standin, js, newest):
	frappe_standin.newest = newest
	frappe_standin.permissions = {("waiter@example.com", "POS Order", "ORD-1"), ("waiter@example.com", "Kitchen Ticket", None)}
	url = frappe_server.url + "/site1.local"
	js.connect("c", url, token=token("waiter@example.com"))
	assert js.emit("c", "doc_subscribe", "POS Order", "ORD-1") == [{"ok": True, "room": "doc:POS Order/ORD-1"}]
	assert js.emit("c", "doc_subscribe", "POS Order", "ORD-2")[0] == {"ok": False, "room": "doc:POS Order/ORD-2", "error": "Permission denied"}
	assert js.emit("c", "doctype_subscribe", "Kitchen Ticket") == [{"ok": True, "room": "doctype:Kitchen Ticket"}]
	assert js.emit("c", "doctype_subscribe", "User")[0]["ok"] is False
	assert js.emit("c", "room:join", "doc:POS Order/ORD-2")[0]["error"] == "Permission denied"
	methods = [request["method"] for request in frappe_standin.requests[1:]]
	if newest:
		assert "frappe.realtime.has_permission" in methods and "frappe.realtime.can_subscribe_doc" not in methods
	else:
		# v14/v15 answer 417 for has_permission once; after that the site is known
		assert methods.count("frappe.realtime.has_permission") == 1
		assert "frappe.realtime.can_subscribe_doc" in methods
	doc_call = next(r for r in frappe_standin.requests if r["params"].get("doctype") == "POS Order")
	assert doc_call["headers"]["x-frappe-site-name"] == "site1.local"


def test_doc_viewers(frappe_server, frappe_standin, js):
	frappe_standin.permissions = {("waiter@example.com", "POS Order", None), ("cook@example.com", "POS Order", None)}
	url = frappe_server.url + "/site1.local"
	js.connect("w", url, token=token("waiter@example.com"))
	js.connect("k", url, token=token("cook@example.com"))
	js.emit("w", "doc_open", "POS Order", "ORD-1")
	js.emit("k", "doc_open", "POS Order", "ORD-1")
	assert js.wait_event("w", "doc_viewers", where=lambda a: len(a[0]["users"]) == 2) == [
		{"doctype": "POS Order", "docname": "ORD-1", "users": ["waiter@example.com", "cook@example.com"]}
	]
	js.emit("k", "doc_close", "POS Order", "ORD-1")
	js.wait_event("w", "doc_viewers", where=lambda a: a[0]["users"] == ["waiter@example.com"])


def test_slow_frappe_refuses_in_bounded_time_and_delays_no_one(frappe_server, frappe_standin, js, publish):
	js.connect("live", frappe_server.url + "/excel_restaurant_pos/site1.local", token=token())
	frappe_standin.delay = 5
	started = time.monotonic()
	js.send(cmd="connect", id="slow", url=frappe_server.url + "/excel_restaurant_pos/site1.local", opts={"transports": ["websocket"], "extraHeaders": {"Authorization": f"Bearer {token('cook@example.com')}"}, "reconnection": False})
	wait_for(lambda: frappe_standin.calls("frappe.realtime.get_user_info")[1:], message="the slow call to start")
	publish.publish_event("order:new", {"n": 1}, site="site1.local")
	assert js.wait_event("live", "order:new", timeout=2) == [{"n": 1}]
	delivered_after = time.monotonic() - started
	refusal = js.wait(lambda item: item.get("id") == "slow" and item["type"] == "connect_error", 10, "slow refusal")
	assert refusal["message"] == "Unauthorized: Frappe did not answer within 2 s"
	assert delivered_after < 2 < time.monotonic() - started < 5


def test_dead_or_garbage_frappe_refuses_with_reason(realtime, frappe_standin, js):
	server = realtime(auth_mode="frappe", frappe_url="http://127.0.0.1:9", env=SITES)
	assert js.connect("dead", server.url + "/site1.local", token=token())["message"] == "Unauthorized: Frappe unreachable (ConnectionError)"
	frappe_standin.garbage = True
	server = realtime(auth_mode="frappe", frappe_url=frappe_standin.url, env=SITES)
	assert js.connect("junk", server.url + "/site1.local", token=token())["message"] == "Unauthorized: Frappe did not accept the token"


def test_a_client_that_leaves_while_frappe_checks_its_token_leaves_nothing_behind(realtime, frappe_standin, js):
	"""Socket.IO runs no disconnect handler for a socket that is still connecting, though the
	socket can close meanwhile (here a long-poller that cannot answer pings while its connect
	request waits on a slow Frappe): it must not stay counted, holding the one connection its
	user may have, nor linger in its rooms."""
	server = realtime(auth_mode="frappe", frappe_url=frappe_standin.url, frappe_timeout=5, connections_per_user=1, ping_interval=1, ping_timeout=1, env=SITES)
	url = server.url + "/excel_restaurant_pos/site1.local"
	frappe_standin.delay = 3
	js.send(cmd="connect", id="lost", url=url, opts={"transports": ["polling"], "auth": {"token": token()}, "reconnection": False})
	wait_for(lambda: server.metric("excel_pos_realtime_connects_total", result="ok") == 1, 10, message="the slow check to end")
	frappe_standin.delay = 0
	assert js.connect("back", url, token=token())["type"] == "connect"
	assert server.metric("excel_pos_realtime_connections", site="site1.local") == 1
	assert not [item for item in js.events if item.get("id") == "lost" and item["type"] == "connect"]


def test_a_client_waiting_on_frappe_is_still_read_and_its_events_keep_their_order(realtime, frappe_standin, js):
	"""Frappe takes 3 s over a client's doctype_subscribe, while the server pings every
	second and gives a second for the answer: the client's next event waits its turn, but
	its connection is still read, so the pongs it sends meanwhile keep it connected."""
	frappe_standin.newest = True
	frappe_standin.permissions = {("waiter@example.com", "Kitchen Ticket", None)}
	server = realtime(auth_mode="frappe", frappe_url=frappe_standin.url, frappe_timeout=5, ping_interval=1, ping_timeout=1, env=SITES)
	js.connect("desk", server.url + "/site1.local", token=token("waiter@example.com"))
	frappe_standin.delay = 3
	first = js.send(cmd="emit", id="desk", event="doctype_subscribe", args=["Kitchen Ticket"], ack=True)
	second = js.send(cmd="emit", id="desk", event="room:join", args=["kitchen"], ack=True)
	js.wait(lambda item: item.get("type") == "ack" and item.get("seq") == second, 10, "the second answer")
	acks = [item for item in js.events if item.get("type") == "ack" and item.get("seq") in (first, second)]
	assert [(ack["seq"], ack["args"]) for ack in acks] == [
		(first, [{"ok": True, "room": "doctype:Kitchen Ticket"}]),
		(second, [{"ok": True, "room": "kitchen"}]),
	]
	assert [item for item in js.events if item.get("type") == "disconnect"] == []


def test_a_client_that_drops_while_frappe_answers_its_join_leaves_no_error_behind(realtime, frappe_standin, js):
	"""A waiter's tablet loses its connection while Frappe takes 2 s over its doctype_subscribe,
	with a room:join waiting behind it. Frappe's yes comes for a client that is gone: nothing
	is joined for it, no error reaches the log or /health, and the waiting join goes with it."""
	frappe_standin.newest = True
	frappe_standin.permissions = {("waiter@example.com", "Kitchen Ticket", None)}
	server = realtime(auth_mode="frappe", frappe_url=frappe_standin.url, frappe_timeout=5, env=SITES)
	proxy = TcpProxy(server.port)
	try:
		js.connect("desk", proxy.url + "/site1.local", token=token("waiter@example.com"))
		frappe_standin.delay = 2
		js.send(cmd="emit", id="desk", event="doctype_subscribe", args=["Kitchen Ticket"], ack=True)
		js.send(cmd="emit", id="desk", event="room:join", args=["kitchen"], ack=True)
		wait_for(lambda: frappe_standin.calls("frappe.realtime.has_permission"), 5, message="the question to Frappe")
		proxy.refusing = True
		proxy.kill()
		wait_for(lambda: server.health()[1]["clients"] == 0, 5, message="the dropped client gone")
		wait_for(lambda: "doctype_subscribe" in server.log() or "'doctype:Kitchen Ticket'" in server.log(), 10, message="Frappe's answer handled")
	finally:
		proxy.close()
	assert_no_traceback(server.log())
	assert "join of 'doctype:Kitchen Ticket' dropped: site=site1.local user=waiter@example.com" in server.log()
	assert server.health()[1]["errors"] == []


def test_a_viewer_that_drops_while_its_session_is_stored_is_not_left_viewing(tmp_path, redis_url, frappe_standin, monkeypatch):
	"""A recovering client's doc_open stores its session in Redis before it returns, and a
	dropped transport's disconnect may run during that wait: it counts the client out of the
	document's viewers, and nothing may count it in again after it, or everyone with the
	document open would see the waiter there until the process stops. The disconnect is run
	here where that wait is (an in-process server, real Redis and the Frappe stand-in), as no
	test from outside can time it."""
	frappe_standin.permissions = {(user, "POS Order", "ORD-1") for user in ("cook@example.com", "waiter@example.com")}
	config = load_config({"auth_mode": "frappe", "frappe_url": frappe_standin.url}, env={**SITES, "FRAPPE_REDIS_QUEUE": redis_url}, cwd=tmp_path)
	server = RealtimeServer(config)
	server.presence.keep_alive()  # as the server's sweep does every second
	namespace, room = "/excel_restaurant_pos/site1.local", "open_doc:POS Order/ORD-1"

	def connect(user: str) -> Client:
		sid = server.sio.manager.connect(f"eio-{user}", namespace)
		server.user_connections[("site1.local", user)] += 1
		server.clients[sid] = Client(server, sid, namespace, Identity("site1.local", user, "System User", (), None, token(user)))
		return server.clients[sid]

	cook, waiter = connect("cook@example.com"), connect("waiter@example.com")
	assert cook.join(room) is None
	store_session = server.recovery.rooms_changed

	def drop_while_storing(sid: str) -> None:
		store_session(sid)
		if sid == waiter.sid and sid in server.clients:
			server.on_disconnect(namespace, sid, "transport error")

	monkeypatch.setattr(server.recovery, "rooms_changed", drop_while_storing)
	assert waiter.join(room) is None
	assert waiter.gone
	assert server.presence.viewers("site1.local", room) == ["cook@example.com"]
