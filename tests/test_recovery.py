"""Nothing missed: the Socket.IO v4 recovery protocol over the event log, with the official
JavaScript client, across the failures a restaurant sees: a transport closed under the
client, a TCP connection killed with a reset, a server stopped or killed mid-stream.

Gaps are made with a proxy that kills the connections and refuses new ones while the test
publishes, so "during the gap" is a fact, not a race."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
import socketio
import websocket
from harness import TcpProxy, assert_no_traceback, free_port, raw_connect, wait_for
from test_connect import token

NS = "/excel_restaurant_pos/default"
RECONNECT = {"reconnection": True, "reconnectionDelay": 50, "reconnectionDelayMax": 200, "randomizationFactor": 0}


def connect(js, client: str, url: str, user: str = "cook@example.com", transport: str = "websocket") -> dict:
	"""A recovering socket, as the README shows it: ``auth: {token, recover: true}``."""
	reply = js.connect(client, url, auth={"token": token(user), "recover": True}, transport=transport, **RECONNECT)
	assert reply["type"] == "connect", reply
	return reply


def connects(js, client: str) -> list[dict]:
	with js._lock:
		return [item for item in js.events if item.get("id") == client and item["type"] == "connect"]


def wait_connects(js, client: str, count: int, timeout: float = 20) -> dict:
	"""Wait for the client's ``count``-th connect and return it."""
	wait_for(lambda: len(connects(js, client)) >= count, timeout, message=f"connect #{count} of {client}")
	return connects(js, client)[count - 1]


def wait_disconnects(js, client: str, count: int, timeout: float = 20) -> None:
	def gone() -> bool:
		with js._lock:
			return sum(1 for item in js.events if item.get("id") == client and item["type"] == "disconnect") >= count

	wait_for(gone, timeout, message=f"disconnect #{count} of {client}")


def events(js, client: str, names: tuple[str, ...]) -> list[tuple[str, list]]:
	"""The client's events of those names, in the order they arrived, with all arguments."""
	with js._lock:
		return [(item["event"], item["args"]) for item in js.events if item.get("id") == client and item.get("type") == "event" and item["event"] in names]


@contextlib.contextmanager
def explained(js, client: str, server) -> Iterator[None]:
	"""On a failure, say what the client last saw besides events and what the server logged:
	a chaos test that fails once in many runs must say why the first time."""
	try:
		yield
	except AssertionError as exc:
		with js._lock:
			seen = [item for item in js.events if item.get("id") == client and item["type"] not in ("event", "ping")]
		raise AssertionError(f"{exc}\nclient {client}, last of {len(seen)}: {seen[-12:]}\nserver log, last lines:\n{server.log()[-6000:]}") from None


def frappe_v15(redis_url: str, site: str, event: str, message, room=None) -> None:
	body = {"event": event, "message": message, "room": room, "namespace": site}
	redis.Redis.from_url(redis_url).publish("events", json.dumps(body, indent=1, sort_keys=True))


def gap(js, proxy: TcpProxy, clients: tuple[str, ...], count: int, drop: str = "reset") -> None:
	"""Cut the clients off (``reset``: kill their TCP connections; ``close``: close the
	transport under the socket) and keep them off until the caller reopens the proxy."""
	proxy.refusing = True
	if drop == "reset":
		proxy.kill()
	else:
		for client in clients:
			js.send(cmd="drop", id=client)
	for client in clients:
		wait_disconnects(js, client, count)


@pytest.fixture
def proxied(realtime):
	"""A server behind a proxy that can drop its clients: ``(server, proxy)``."""
	proxies = []

	def start(**flags):
		server = realtime(**flags)
		proxy = TcpProxy(server.port)
		proxies.append(proxy)
		return server, proxy

	yield start
	for proxy in proxies:
		proxy.close()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
@pytest.mark.parametrize("drop", ["reset", "close"])
def test_every_kind_of_event_sent_during_a_gap_arrives_in_order_once(proxied, js, publish, redis_url, transport, drop):
	server, proxy = proxied()
	first = connect(js, "kitchen", proxy.url + NS, transport=transport)
	assert first["recovered"] is False and first["pid"]
	connect(js, "waiter", server.url + NS, user="waiter@example.com")  # not recovering, not cut off
	assert js.emit("kitchen", "room:join", "kitchen") == [{"ok": True, "room": "kitchen"}]
	assert js.emit("waiter", "room:join", "kitchen") == [{"ok": True, "room": "kitchen"}]
	publish.publish_to_room("kitchen", "order:new", {"n": 0})
	js.wait_event("kitchen", "order:new")

	gap(js, proxy, ("kitchen",), 1, drop)
	publish.publish_to_room("kitchen", "order:new", {"n": 1})
	publish.publish_to_user("cook@example.com", "note", {"n": 2})
	frappe_v15(redis_url, "default", "doc_update", {"n": 3}, "kitchen")
	# Frappe's messages enter the log through a server, the helpers' directly: the log's
	# order is the order of the events, so let this one in before the next is published.
	wait_for(lambda: redis.Redis.from_url(redis_url).xlen("excel_restaurant_pos:log:default") == 4, 10, message="Frappe's event logged")
	publish.publish_event("menu:changed", {"n": 4})
	js.emit("waiter", "order:update", {"room": "kitchen", "order_id": "ORD-5", "status": "ready"})
	publish.publish_to_room("bar", "order:new", {"n": 6})  # a room the kitchen is not in
	proxy.refusing = False

	back = wait_connects(js, "kitchen", 2)
	assert back["recovered"] is True and back["pid"] == first["pid"]
	js.wait_event("kitchen", "order:updated")
	publish.publish_to_room("kitchen", "order:new", {"n": 7})  # live again
	js.wait_event("kitchen", "order:new", where=lambda args: args[0]["n"] == 7)
	got = events(js, "kitchen", ("order:new", "note", "doc_update", "menu:changed", "order:updated"))
	assert [(name, args[0].get("n", args[0].get("order_id"))) for name, args in got] == [
		("order:new", 0), ("order:new", 1), ("note", 2), ("doc_update", 3), ("menu:changed", 4), ("order:updated", "ORD-5"), ("order:new", 7),
	]
	offsets = [args[-1] for _, args in got]
	assert all(isinstance(offset, str) and "-" in offset for offset in offsets)
	assert sorted(offsets, key=lambda o: tuple(map(int, o.split("-")))) == offsets
	assert server.metric("excel_pos_realtime_recoveries_total", result="recovered") == 1
	assert server.metric("excel_pos_realtime_replayed_events_total") == 5


def test_a_client_that_had_received_nothing_recovers(proxied, js, publish):
	server, proxy = proxied()
	connect(js, "kitchen", proxy.url + NS)
	assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]
	gap(js, proxy, ("kitchen",), 1)
	publish.publish_to_room("kitchen", "order:new", {"n": 1})
	proxy.refusing = False
	assert wait_connects(js, "kitchen", 2)["recovered"] is True
	assert js.wait_event("kitchen", "order:new")[0] == {"n": 1}


def test_ten_gaps_in_a_row_on_one_connection(proxied, js, publish):
	server, proxy = proxied()
	first = connect(js, "kitchen", proxy.url + NS, transport="polling")
	assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]
	for n in range(1, 11):
		gap(js, proxy, ("kitchen",), n, "reset" if n % 2 else "close")
		publish.publish_to_room("kitchen", "order:new", {"n": n})
		proxy.refusing = False
		back = wait_connects(js, "kitchen", n + 1)
		assert back["recovered"] is True and back["pid"] == first["pid"], n
		js.wait_event("kitchen", "order:new", where=lambda args, n=n: args[0]["n"] == n)
	assert [args[0]["n"] for args in js.received("kitchen", "order:new")] == list(range(1, 11))


def test_a_gap_long_after_connecting(proxied, js, publish):
	server, proxy = proxied(ping_interval=2, ping_timeout=5)
	connect(js, "kitchen", proxy.url + NS)
	assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]
	publish.publish_to_room("bar", "order:new", {"n": 0})  # the site's log moves on meanwhile
	with js._lock:
		pings_before = sum(1 for item in js.events if item.get("id") == "kitchen" and item["type"] == "ping")
	wait_for(lambda: sum(1 for item in list(js.events) if item.get("id") == "kitchen" and item["type"] == "ping") >= pings_before + 6, 30, message="six pings (over 10 s)")
	gap(js, proxy, ("kitchen",), 1)
	publish.publish_to_room("kitchen", "order:new", {"n": 1})
	proxy.refusing = False
	assert wait_connects(js, "kitchen", 2)["recovered"] is True
	assert js.wait_event("kitchen", "order:new")[0] == {"n": 1}


@pytest.mark.parametrize("transport", ["websocket", "polling"])
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_events_published_while_no_server_runs_are_recovered(realtime, js, publish, transport, stop):
	port = free_port()
	first = realtime(port=port)
	connect(js, "kitchen", first.url + NS, transport=transport)
	assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]
	publish.publish_to_room("kitchen", "order:new", {"n": 0})
	js.wait_event("kitchen", "order:new")
	first.signal(stop)
	first.wait(15)
	wait_disconnects(js, "kitchen", 1)

	for n in (1, 2, 3):
		assert publish.publish_to_room("kitchen", "order:new", {"n": n}) == 0  # no server listens
	second = realtime(port=port)
	assert wait_connects(js, "kitchen", 2)["recovered"] is True
	publish.publish_to_room("kitchen", "order:new", {"n": 4})
	js.wait_event("kitchen", "order:new", where=lambda args: args[0]["n"] == 4)
	assert [args[0]["n"] for args in js.received("kitchen", "order:new")] == [0, 1, 2, 3, 4]
	assert second.metric("excel_pos_realtime_recoveries_total", result="recovered") == 1


def test_a_gap_longer_than_the_window_starts_a_new_session(proxied, js, publish):
	server, proxy = proxied(recovery_window=1)
	first = connect(js, "kitchen", proxy.url + NS)
	assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]
	gap(js, proxy, ("kitchen",), 1)
	left = time.monotonic()
	publish.publish_to_room("kitchen", "order:new", {"n": 1})
	wait_for(lambda: time.monotonic() - left > 2, 5, message="the window to pass")
	proxy.refusing = False
	back = wait_connects(js, "kitchen", 2)
	assert back["recovered"] is False and back["pid"] != first["pid"]
	assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]  # a new session: its rooms are gone
	publish.publish_to_room("kitchen", "order:new", {"n": 2})
	js.wait_event("kitchen", "order:new", where=lambda args: args[0]["n"] == 2)
	assert [args[0]["n"] for args in js.received("kitchen", "order:new")] == [2]  # nothing partial
	assert server.metric("excel_pos_realtime_recoveries_total", result="expired") == 1


def test_a_pid_with_another_users_token_restores_nothing(proxied, js, publish):
	server, proxy = proxied()
	first = connect(js, "kitchen", proxy.url + NS)
	assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]
	gap(js, proxy, ("kitchen",), 1)
	publish.publish_to_room("kitchen", "order:new", {"n": 1})

	thief, reply = raw_connect(server.port, NS, {"token": token("guest@example.com"), "recover": True, "pid": first["pid"]})
	assert reply["pid"] != first["pid"]
	bare, bare_reply = raw_connect(server.port, NS, {"token": token("guest@example.com"), "pid": first["pid"]})
	assert set(bare_reply) == {"sid"}  # did not ask for recovery: nothing about it on the wire
	publish.publish_to_room("kitchen", "order:new", {"n": 2})
	publish.publish_to_user("guest@example.com", "fence", {})
	for ws in (thief, bare):
		frames = []
		while not (frames and '"fence"' in frames[-1]):
			frames.append(ws.recv())
		assert not any("order:new" in frame for frame in frames), frames
		ws.close()
	assert server.metric("excel_pos_realtime_recoveries_total", result="user_mismatch") == 1

	proxy.refusing = False  # the rightful client still recovers everything
	assert wait_connects(js, "kitchen", 2)["recovered"] is True
	js.wait_event("kitchen", "order:new", where=lambda args: args[0]["n"] == 2)
	assert [args[0]["n"] for args in js.received("kitchen", "order:new")] == [1, 2]


def test_sockets_that_do_not_ask_see_no_change(realtime, js, publish):
	server = realtime()
	connect(js, "recovering", server.url + NS)
	js.connect("plain", server.url + NS, token=token())
	received = []
	client = socketio.Client(reconnection=False)
	client.on("order:new", lambda *args: received.append(args), namespace=NS)
	client.connect(server.url, namespaces=[NS], transports=["websocket"], auth={"token": token()})
	try:
		for name in ("recovering", "plain"):
			assert js.emit(name, "room:join", "kitchen")[0]["ok"]
		assert client.call("room:join", "kitchen", namespace=NS, timeout=10)["ok"]
		publish.publish_to_room("kitchen", "order:new", {"n": 1})
		wait_for(lambda: received, 10, message="the python client's event")
		assert received == [({"n": 1},)]
		assert js.wait_event("plain", "order:new") == [{"n": 1}]
		message, offset = js.wait_event("recovering", "order:new")
		assert message == {"n": 1} and isinstance(offset, str)
		assert connects(js, "plain")[0]["pid"] is None
	finally:
		client.disconnect()


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_exactly_once_and_in_order_through_random_drops(proxied, js, publish, transport):
	"""Two thousand numbered events while the connection keeps breaking, every way it breaks."""
	server, proxy = proxied()
	connect(js, "kitchen", proxy.url + NS, transport=transport)
	assert js.emit("kitchen", "room:join", "stream")[0]["ok"]
	total, chaos = 2_000, random.Random(7)

	def publish_all() -> None:
		for n in range(total):
			publish.publish_to_room("stream", "seq", {"n": n})
			if n % 10 == 9:
				time.sleep(0.01)  # a steady stream rather than one burst, long enough for many drops

	def since(mark: int, kind: str) -> bool:
		"""Whether the client had a ``kind`` event after the first ``mark`` events. (Counting
		them would not do: a kill that lands after a reconnect's handshake but before its
		connect makes the client report a disconnect without a connect.)"""
		with js._lock:
			return any(item.get("id") == "kitchen" and item["type"] == kind for item in js.events[mark:])

	publisher = threading.Thread(target=publish_all)
	publisher.start()
	drops = 0
	with explained(js, "kitchen", server):
		while publisher.is_alive() and drops < 30:
			drops += 1
			with js._lock:
				mark = len(js.events)
			if chaos.random() < 0.5:
				# A poll between two requests has no connection to kill: kill until one breaks.
				wait_for(lambda: proxy.kill() and False or since(mark, "disconnect"), 20, 0.2, "a killed connection")
			else:
				js.send(cmd="drop", id="kitchen")
			wait_for(lambda: since(mark, "connect"), 20, message=f"the reconnect after drop #{drops}")
			flowing = len(js.received("kitchen", "seq")) + 25
			wait_for(lambda: len(js.received("kitchen", "seq")) >= flowing or not publisher.is_alive(), 30, message="events flowing again")
		publisher.join(60)
		publish.publish_to_room("stream", "end", {})
		js.wait_event("kitchen", "end", timeout=30)
	numbers = [args[0]["n"] for args in js.received("kitchen", "seq")]
	assert numbers == list(range(total)), f"{len(numbers)} events, first differences at {next((i for i, (a, b) in enumerate(zip(numbers, range(total))) if a != b), None)}"
	assert all(item["recovered"] for item in connects(js, "kitchen")[1:])
	assert drops > 3
	assert_no_traceback(server.log())  # connections that break are no error of the server's


def events_of(ws: websocket.WebSocket, until: str) -> list[list]:
	"""Read Socket.IO events off a raw websocket (answering pings) up to the event ``until``."""
	prefix, got = f"42{NS},", []
	while True:
		frame = ws.recv()
		if frame == "2":
			ws.send("3")
		elif frame.startswith(prefix):
			got.append(json.loads(frame[len(prefix) :]))
			if got[-1][0] == until:
				return got


def test_a_client_cut_off_for_not_reading_recovers_the_rest(realtime, publish):
	server = realtime(slow_client_seconds=1)
	bearer = token("cook@example.com")
	stalled, reply = raw_connect(server.port, NS, {"token": bearer, "recover": True}, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
	pid = reply["pid"]
	stalled.send(f"42{NS}," + json.dumps(["room:join", "firehose"]))
	wait_for(lambda: '"firehose"' in stalled.recv(), 10, message="room:joined")
	# From here on it reads nothing: a tablet whose app froze, its socket still open.
	chunk = "x" * 20_000
	for n in range(300):
		publish.publish_to_room("firehose", "bulk", {"n": n, "data": chunk})
	wait_for(lambda: server.metric("excel_pos_realtime_slow_client_disconnects_total") == 1, 30, message="the stalled client to be cut off")
	stalled.close()

	publish.publish_to_room("firehose", "end", {})
	back, reply = raw_connect(server.port, NS, {"token": bearer, "recover": True, "pid": pid})
	assert reply["pid"] == pid  # recovered: the client library would say socket.recovered
	got = events_of(back, "end")
	back.close()
	assert [args[1]["n"] for args in got if args[0] == "bulk"] == list(range(300))
	assert all(isinstance(args[-1], str) for args in got)


@pytest.mark.parametrize("waiting_on", ["taking the session", "checking the log"])
def test_a_connect_overtaken_by_its_clients_next_one_leaves_the_session_to_it(redis_url, tmp_path, monkeypatch, waiting_on):
	"""A client whose connect was cut off asks again with the same ``pid`` while the first
	connect still waits on Redis: the newer socket gets the session, the older one is closed
	and, when its wait ends, starts a session of its own and stores nothing over the newer's."""
	from excel_restaurant_pos.realtime import log as event_log
	from excel_restaurant_pos.realtime.config import load_config
	from excel_restaurant_pos.realtime.recovery import SESSION_PREFIX, Recovery

	client = redis.Redis.from_url(redis_url)
	aborted: list[str] = []
	site, namespace, user = "default", NS, "cook@example.com"
	recovery = Recovery(load_config(env={}, cwd=tmp_path), "p1", client, {site: event_log.last_offset(client, site)}, lambda sid, _: aborted.append(sid))

	def connect_socket(sid: str, auth: dict) -> tuple:
		recovery.hold(sid, namespace, site)
		session, restored = recovery.restore(sid, user, auth)
		recovery.save(session)
		return session, restored

	first, _ = connect_socket("sid1", {})
	recovery.connected("sid1", lambda delivery: None)
	recovery.close("sid1")  # its client lost the connection
	recovery.drop("sid1")
	pid = first.pid

	waiting, go_on = threading.Event(), threading.Event()

	def answered_late(call):  # the first connect's Redis call, answered late
		def late(*args, **kwargs):
			if not waiting.is_set():
				waiting.set()
				go_on.wait(10)
			return call(*args, **kwargs)

		return late

	if waiting_on == "taking the session":
		recovery._take = answered_late(recovery._take)
	else:
		monkeypatch.setattr(event_log, "was_trimmed_after", answered_late(event_log.was_trimmed_after))
	overtaken: list[tuple] = []
	older_connect = threading.Thread(target=lambda: overtaken.append(connect_socket("sid2", {"pid": pid})))
	older_connect.start()
	assert waiting.wait(10)
	newer, restored = connect_socket("sid3", {"pid": pid})
	go_on.set()
	older_connect.join(10)
	assert (newer.pid, restored, aborted) == (pid, True, ["sid2"])
	(older, older_restored), = overtaken
	assert older_restored is False and older.pid != pid
	recovery.close("sid2")  # its disconnect, once its connect handler sees it closed
	recovery.drop("sid2")
	assert client.get(SESSION_PREFIX + pid) is None  # nothing stored over the live session
	recovery.close("sid3")  # and the newer socket's client can still come back to it
	recovery.drop("sid3")
	again, restored = connect_socket("sid4", {"pid": pid})
	assert (again.pid, restored) == (pid, True)
