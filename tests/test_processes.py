"""Several server processes on one Redis: every event reaches every subscribed client once,
whichever process holds it and whichever process read it from Frappe's channel; the
logging of Frappe's messages moves to another process when its holder dies; a client whose
process dies recovers on another."""

from __future__ import annotations

import json
import os
import signal
import threading

import redis
from harness import Nginx, TcpProxy, free_port, wait_for
from test_connect import token
from test_publish import Listener
from test_recovery import RECONNECT, connect, wait_connects, wait_disconnects
from test_robustness import starve

APP_NS = "/excel_restaurant_pos/default"
FRAPPE_NS = "/default"
LOG = "excel_restaurant_pos:log:default"


def frappe_event(redis_url: str, event: str, message, room=None) -> None:
	body = {"event": event, "message": message, "room": room, "namespace": "default"}
	redis.Redis.from_url(redis_url).publish("events", json.dumps(body, indent=1, sort_keys=True))


def numbers(js, client: str, event: str) -> list:
	return [args[0]["n"] for args in js.received(client, event)]


def test_every_client_gets_every_event_once_whichever_process_holds_it(realtime, js, publish, redis_url):
	servers = [realtime(), realtime(), realtime()]
	for index, server in enumerate(servers):
		for namespace in (APP_NS, FRAPPE_NS):
			name = f"p{index}{'app' if namespace == APP_NS else 'frappe'}"
			assert js.connect(name, server.url + namespace, token=token())["type"] == "connect"
			assert js.emit(name, "room:join", "kitchen")[0]["ok"]
	clients = [item["id"] for item in js.events if item["type"] == "connect"]
	raw = redis.Redis.from_url(redis_url)
	wait_for(lambda: all(count == 3 for _, count in raw.pubsub_numsub("events", "excel_restaurant_pos_events")), 10, message="three subscribers")

	for n in range(20):
		publish.publish_to_room("kitchen", "helper", {"n": n})
		frappe_event(redis_url, "frappe", {"n": n}, "kitchen")
		frappe_event(redis_url, "frappe", {"n": n}, "kitchen")  # the same message twice: two events
		raw.publish("excel_restaurant_pos_events", json.dumps({"namespace": APP_NS, "room": "kitchen", "event": "raw", "message": {"n": n}}))
	publish.publish_event("fence", {}, site="default")
	frappe_event(redis_url, "fence", {})
	wait_for(lambda: all(len(js.received(c, "fence")) == (2 if c.endswith("app") else 1) for c in clients), 10, message="every fence")

	for client in clients:
		assert numbers(js, client, "frappe") == [n for n in range(20) for _ in (0, 1)], client
		if client.endswith("app"):
			assert numbers(js, client, "helper") == list(range(20)), client
			assert numbers(js, client, "raw") == list(range(20)), client
	assert raw.xlen(LOG) == 20 + 40 + 20 + 2  # each message logged once, by one process


def test_events_published_together_are_read_from_the_log_together(realtime, redis_url):
	"""A commit's events, published together, enter the log in one call: a process's log
	reader, blocked until the next event, gets them all in one read, so each client gets
	them in one write. Logged one by one, the reader would wake at the first."""
	realtime()
	raw = redis.Redis.from_url(redis_url)
	wait_for(lambda: raw.keys("excel_restaurant_pos:ingester:*"), 10, message="a lease holder")
	newest = raw.xrevrange(LOG, count=1)
	after = newest[0][0] if newest else "0-0"
	reader = redis.Redis.from_url(redis_url)
	reader.client_setname("burst-reader")
	read = []
	blocked = threading.Thread(target=lambda: read.extend(reader.xread({LOG: after}, count=100, block=10000)))
	blocked.start()
	wait_for(lambda: any(c.get("name") == "burst-reader" and c.get("cmd") == "xread" for c in raw.client_list()), 5, message="the reader blocked")

	pipe = raw.pipeline(transaction=False)
	for n in range(10):
		body = {"event": "order", "message": {"n": n}, "room": "kitchen", "namespace": "default"}
		pipe.publish("events", json.dumps(body, indent=1, sort_keys=True))
	pipe.execute()
	blocked.join(15)

	assert not blocked.is_alive()
	[(_, entries)] = read
	assert [json.loads(fields[b"message"])["n"] for _, fields in entries] == list(range(10))


def test_order_updates_cross_processes_and_namespaces(realtime, js, redis_url):
	"""A client's room event reaches the other process's clients. The process that appends
	it announces it on the app channel: the process holding the lease learns of appends it
	did not make itself from there, not by reading the log for each event."""
	first, second = realtime(), realtime()
	announcements = Listener(redis_url)
	js.connect("waiter", first.url + APP_NS, token=token("waiter@example.com"))
	js.connect("kitchen-app", second.url + APP_NS, token=token("cook@example.com"))
	js.connect("kitchen-desk", second.url + FRAPPE_NS, token=token("cook@example.com"))
	for client in ("waiter", "kitchen-app", "kitchen-desk"):
		assert js.emit(client, "room:join", "kitchen")[0]["ok"]
	assert js.emit("waiter", "order:update", {"room": "kitchen", "order_id": "ORD-1", "status": "ready"}) == [{"ok": True, "room": "kitchen"}]
	for client in ("kitchen-app", "kitchen-desk"):
		update = js.wait_event(client, "order:updated")[0]
		assert (update["order_id"], update["status"], update["updated_by"]) == ("ORD-1", "ready", "waiter@example.com")
	assert js.received("waiter", "order:updated") == []
	assert announcements.next() == ("excel_restaurant_pos_events", {"event": "order:updated", "room": "kitchen", "logged": True})


def test_on_a_starved_machine_every_source_arrives_once_in_the_logs_order(realtime, js, publish, redis_url):
	"""Two processes share one core with two busy loops while Frappe's channel, the publish
	helpers and a waiter's order updates arrive together. Whichever process logs Frappe's
	messages delivers from its own call and the other reads the log: every client still
	gets every event once, and all of them in the same order, the log's."""
	first, second = realtime(), realtime()
	listeners = {"first-app": first.url + APP_NS, "second-app": second.url + APP_NS, "second-desk": second.url + FRAPPE_NS}
	for name, url in {**listeners, "waiter": first.url + APP_NS}.items():
		assert js.connect(name, url, token=token(f"{name}@example.com"))["type"] == "connect"
		assert js.emit(name, "room:join", "kitchen")[0]["ok"]
	raw = redis.Redis.from_url(redis_url)
	wait_for(lambda: all(count == 2 for _, count in raw.pubsub_numsub("events", "excel_restaurant_pos_events")), 10, message="two subscribers")
	wait_for(lambda: raw.keys("excel_restaurant_pos:ingester:*"), 10, message="a lease holder")

	busy = [starve(first.process.pid), starve(second.process.pid)]
	try:
		for n in range(100):
			publish.publish_to_room("kitchen", "helper", {"n": n})
			frappe_event(redis_url, "frappe", {"n": n}, "kitchen")
			if n % 5 == 0:
				js.emit_no_ack("waiter", "order:update", {"room": "kitchen", "order_id": f"ORD-{n}", "status": "ready"})
		wait_for(lambda: len(js.received("second-desk", "order:updated")) == 20, 120, message="every order update")
		publish.publish_event("fence", {}, site="default")
		frappe_event(redis_url, "fence", {})
		wait_for(lambda: all(len(js.received(c, "fence")) == (1 if c.endswith("desk") else 2) for c in listeners), 120, message="every fence")
	finally:
		for loop in busy:
			loop.kill()
			loop.wait(10)

	def seen(client: str, events: tuple[str, ...]) -> list:
		return [(item["event"], json.dumps(item["args"][0])) for item in js.events if item.get("id") == client and item.get("type") == "event" and item["event"] in events]

	for client in listeners:
		assert numbers(js, client, "frappe") == list(range(100)), client
		assert [args[0]["order_id"] for args in js.received(client, "order:updated")] == [f"ORD-{n}" for n in range(0, 100, 5)], client
	for client in ("first-app", "second-app"):
		assert numbers(js, client, "helper") == list(range(100)), client
	assert seen("first-app", ("helper", "frappe", "order:updated")) == seen("second-app", ("helper", "frappe", "order:updated"))
	assert seen("second-desk", ("frappe", "order:updated")) == seen("first-app", ("frappe", "order:updated"))
	assert [item for item in js.events if item.get("type") == "disconnect"] == []
	assert raw.xlen(LOG) == 100 + 100 + 20 + 2


def test_when_the_process_logging_frappe_events_dies_another_takes_over(realtime, js, redis_url):
	"""Frappe publishes 40 events a second; the process that logs them is killed mid-stream."""
	first, second = realtime(), realtime()
	raw = redis.Redis.from_url(redis_url)
	wait_for(lambda: raw.get(next(iter(raw.keys("excel_restaurant_pos:ingester:*")), b"none")), 10, message="a lease holder")
	holder_key = raw.keys("excel_restaurant_pos:ingester:*")[0]
	for server in (first, second):
		js.connect(f"c{server.port}", server.url + FRAPPE_NS, token=token())
	total, stop = 200, threading.Event()

	def frappe_publishes() -> None:
		for n in range(total):
			frappe_event(redis_url, "tick", {"n": n})
			if stop.wait(0.025):
				return

	publisher = threading.Thread(target=frappe_publishes)
	publisher.start()
	try:
		wait_for(lambda: len(js.received(f"c{second.port}", "tick")) >= 40, 20, message="events flowing")
		holder = raw.get(holder_key).decode()
		dead, survivor = (first, second) if _holds(first, holder) else (second, first)
		assert _holds(dead, holder)
		dead.signal(signal.SIGKILL)
		dead.wait(10)
		publisher.join(60)
	finally:
		stop.set()
	frappe_event(redis_url, "fence", {})
	js.wait_event(f"c{survivor.port}", "fence", timeout=20)
	assert numbers(js, f"c{survivor.port}", "tick") == list(range(total))
	assert raw.xlen(LOG) == total + 1
	assert "from here on" in survivor.log()  # it took the lease over


def clients_of(server) -> int:
	"""The clients a server reports (0 while it is too busy to answer within 2 s)."""
	body = server.health()[1]
	return body["clients"] if body else 0


def _holds(server, holder: str) -> bool:
	"""Whether ``server`` is the process named ``holder`` (its log says who logs)."""
	return f"process={holder}" in server.log()


def test_a_client_whose_process_dies_recovers_on_another(realtime, js, publish):
	first, second = realtime(), realtime()
	proxy = TcpProxy(first.port)
	try:
		connect(js, "kitchen", proxy.url + APP_NS)
		assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]
		publish.publish_to_room("kitchen", "order:new", {"n": 0})
		js.wait_event("kitchen", "order:new")
		proxy.refusing = True
		first.signal(signal.SIGKILL)
		first.wait(10)
		wait_disconnects(js, "kitchen", 1)
		publish.publish_to_room("kitchen", "order:new", {"n": 1})
		proxy.target_port = second.port  # the load balancer sends it to the process left
		proxy.refusing = False
		assert wait_connects(js, "kitchen", 2)["recovered"] is True
		js.wait_event("kitchen", "order:new", where=lambda args: args[0]["n"] == 1)
		assert numbers(js, "kitchen", "order:new") == [0, 1]
	finally:
		proxy.close()


def test_a_client_back_on_another_process_while_its_old_socket_looks_open(realtime, js, publish, redis_url):
	"""A long-polling client's old process cannot tell it left until the ping timeout; the
	process it comes back to takes the session over, and the old one lets go at once."""
	first, second = realtime(), realtime()
	proxy = TcpProxy(first.port)
	try:
		reply = connect(js, "kitchen", proxy.url + APP_NS, transport="polling")
		assert js.emit("kitchen", "room:join", "kitchen")[0]["ok"]
		proxy.refusing = True
		wait_for(lambda: proxy.kill() and False or len([i for i in js.events if i.get("id") == "kitchen" and i["type"] == "disconnect"]), 20, 0.2, "a killed poll")
		assert first.health()[1]["clients"] == 1  # still looks connected there
		publish.publish_to_room("kitchen", "order:new", {"n": 1})
		proxy.target_port = second.port
		proxy.refusing = False
		assert wait_connects(js, "kitchen", 2)["recovered"] is True
		wait_for(lambda: first.health()[1]["clients"] == 0, 10, message="the old process to let go")
		publish.publish_to_room("kitchen", "order:new", {"n": 2})
		js.wait_event("kitchen", "order:new", where=lambda args: args[0]["n"] == 2)
		assert numbers(js, "kitchen", "order:new") == [1, 2]
		assert not redis.Redis.from_url(redis_url).exists(f"excel_restaurant_pos:session:{reply['pid']}")
	finally:
		proxy.close()


def test_the_per_user_limit_counts_every_process_and_forgets_a_killed_one(realtime, js):
	first, second = realtime(connections_per_user=2), realtime(connections_per_user=2)
	assert js.connect("a", first.url + APP_NS, token=token())["type"] == "connect"
	assert js.connect("b", second.url + FRAPPE_NS, token=token())["type"] == "connect"
	refused = js.connect("c", first.url + APP_NS, token=token())
	assert (refused["type"], refused["message"]) == ("connect_error", "Too many connections for this user")
	assert js.connect("other", first.url + APP_NS, token=token("cook@example.com"))["type"] == "connect"  # per user
	js.disconnect("a")
	wait_for(lambda: first.health()[1]["clients"] == 1, 10, message="a's connection given back")
	assert js.connect("d", second.url + APP_NS, token=token())["type"] == "connect"

	second.signal(signal.SIGKILL)  # holding b and d, and never saying goodbye
	second.wait(10)
	attempt = iter(range(1000))
	wait_for(lambda: js.connect(f"e{next(attempt)}", first.url + APP_NS, token=token())["type"] == "connect", 40, 1, "the killed process's connections to stop counting")


def test_doc_viewers_lists_the_viewers_on_every_process(realtime, frappe_standin, js):
	frappe_standin.permissions = {("waiter@example.com", "POS Order", None), ("cook@example.com", "POS Order", None)}
	sites = {"EXCEL_RESTAURANT_POS_SITES": "site1.local,site2.local"}
	first, second = (realtime(auth_mode="frappe", frappe_url=frappe_standin.url, env=sites) for _ in range(2))
	js.connect("w", first.url + "/site1.local", token=token("waiter@example.com"))
	js.connect("k", second.url + "/excel_restaurant_pos/site1.local", token=token("cook@example.com"))
	assert js.emit("w", "doc_open", "POS Order", "ORD-1")[0]["ok"]
	assert js.emit("k", "doc_open", "POS Order", "ORD-1")[0]["ok"]
	both = {"doctype": "POS Order", "docname": "ORD-1", "users": ["waiter@example.com", "cook@example.com"]}
	assert js.wait_event("w", "doc_viewers", where=lambda a: len(a[0]["users"]) == 2) == [both]
	assert js.wait_event("k", "doc_viewers", where=lambda a: len(a[0]["users"]) == 2) == [both]
	js.disconnect("k")
	js.wait_event("w", "doc_viewers", where=lambda a: a[0]["users"] == ["waiter@example.com"])


def test_a_rolling_restart_behind_nginx_loses_nothing(tmp_path, realtime, js, publish):
	"""Two processes behind Debian's nginx with the README's block; 200 recovering clients,
	a quarter on long-polling; 50 events a second; each process restarted in turn."""
	ports = [free_port(), free_port()]
	servers = [realtime(port=port) for port in ports]
	nginx = Nginx(tmp_path / "nginx", ports)
	nginx.start()
	try:
		clients = [f"c{i}" for i in range(200)]
		for i, client in enumerate(clients):
			opts = {"transports": ["polling" if i % 4 == 0 else "websocket"], "path": "/pos-socket.io/", "auth": {"token": token(f"u{i}@example.com"), "recover": True}, "forceNew": True, **RECONNECT}
			js.send(cmd="connect", id=client, url=nginx.url + APP_NS, opts=opts)
		for client in clients:
			js.wait(lambda item, c=client: item.get("id") == c and item["type"] == "connect", 60, f"{client} to connect")
			js.send(cmd="emit", id=client, event="room:join", args=["stream"], ack=False)
		wait_for(lambda: sum(clients_of(server) for server in servers) == 200, 30, message="200 clients")
		wait_for(lambda: all(len(js.received(c, "room:joined")) for c in clients), 30, message="every client in the room")

		stop, sent = threading.Event(), []

		def publish_steadily() -> None:
			while not stop.wait(0.02):
				publish.publish_to_room("stream", "seq", {"n": len(sent)})
				sent.append(len(sent))

		publisher = threading.Thread(target=publish_steadily)
		publisher.start()
		try:
			for index, port in enumerate(ports):
				wait_for(lambda: len(sent) >= 50 * (index + 1) + 100 * index, 30, message="events flowing")
				servers[index].signal(signal.SIGTERM)
				assert servers[index].wait(15) == 0
				servers[index] = realtime(port=port)
				wait_for(lambda: sum(clients_of(server) for server in servers) == 200, 60, message="every client back")
			wait_for(lambda: len(sent) >= 400, 30, message="events after the restarts")
		finally:
			stop.set()
			publisher.join(10)
		publish.publish_to_room("stream", "end", {})
		for client in clients:
			try:
				js.wait_event(client, "end", timeout=60)
			except AssertionError:
				story = [item for item in js.events if item.get("id") == client and item["type"] in ("connect", "disconnect", "connect_error")]
				raise AssertionError(f"{client} got no 'end' after {len(js.received(client, 'seq'))} of {len(sent)} events; {story}") from None
		for client in clients:
			if numbers(js, client, "seq") != sent and os.environ.get("DUMP"):
				with open(os.environ["DUMP"], "w") as out:
					for item in js.events:
						if item.get("id") == client:
							out.write(json.dumps(item) + "\n")
			assert numbers(js, client, "seq") == sent, client
		reconnects = [item for item in js.events if item["type"] == "connect" and not item.get("recovered")]
		assert len(reconnects) == 200, "every reconnect recovered its session"
	finally:
		nginx.stop()
