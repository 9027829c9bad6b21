"""Faults, load and hostile input: slow readers, limits, floods, oversized payloads, hostile
tokens, namespaces and room names, while a legitimate client keeps receiving every event."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import socket
import string
import subprocess
import sys
import threading
import time

import pytest
import requests
import socketio
import websocket
from harness import TcpProxy, assert_no_traceback, raw_connect, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_connect import token, unsigned_token

from excel_restaurant_pos.realtime import rooms

NS = "/excel_restaurant_pos/default"


class StalledClient:
	"""A websocket client that connects, joins rooms and then never reads again.

	Its receive buffer is tiny, so the server's writes to it block after a few kilobytes.
	"""

	def __init__(self, port: int, bearer: str, *join: str):
		self.ws, _ = raw_connect(port, NS, {"token": bearer}, sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
		for ack, room in enumerate(join):  # each join is answered before the client stops reading
			self.ws.send(f"42{NS},{ack}" + json.dumps(["room:join", room]))
			while not self.ws.recv().startswith(f"43{NS},{ack}["):
				pass

	def close(self) -> None:
		self.ws.sock and self.ws.sock.close()


def probe_latencies(js, clients: list[str], count: int) -> list[float]:
	"""Delivery latency (ms) of every probe at every client."""
	latencies = []
	for client in clients:
		probes = js.received(client, "probe")
		assert len(probes) == count, (client, len(probes))
	with js._lock:
		for item in js.events:
			if item.get("event") == "probe":
				latencies.append(item["at"] - item["args"][0]["sent_at"])
	return latencies


def test_slow_reader_is_cut_off_and_fast_clients_keep_their_latency(realtime, js, publish):
	server = realtime(max_unsent_bytes=4 * 1024 * 1024)
	fast = [f"fast{i}" for i in range(200)]
	for client in fast:
		js.send(cmd="connect", id=client, url=server.url + NS, opts={"transports": ["websocket"], "auth": {"token": token(f"u{client}@example.com")}, "reconnection": False})
	for client in fast:
		js.wait(lambda item, c=client: item.get("id") == c and item["type"] == "connect", 30, f"{client} to connect")
	stalled = StalledClient(server.port, token("slow@example.com"), "firehose")
	wait_for(lambda: server.health()[1]["clients"] == 201, message="all clients connected")
	rss_before = server.rss_bytes()

	chunk = "x" * 20_000
	firehose = threading.Thread(target=lambda: [publish.publish_to_room("firehose", "bulk", {"n": n, "data": chunk}) for n in range(2_000)])
	firehose.start()  # 40 MB for the stalled client alone, ten times the process's budget
	probes = 0
	while firehose.is_alive() or probes < 20:
		publish.publish_event("probe", {"sent_at": time.time() * 1000})
		probes += 1
		js.wait(lambda item, n=probes: item.get("id") == fast[-1] and item.get("event") == "probe" and len(js.received(fast[-1], "probe")) >= n, 10, "probe")
	firehose.join(60)
	publish.publish_event("fence", None)
	for client in fast:
		js.wait_event(client, "fence")

	wait_for(lambda: server.metric("excel_pos_realtime_slow_client_disconnects_total") == 1, 30, message="the slow client to be cut off")
	wait_for(lambda: server.health()[1]["clients"] == 200, 10, message="the slow client to be gone")
	latencies = sorted(probe_latencies(js, fast, probes))
	assert latencies[-1] < 1000, f"max probe latency {latencies[-1]:.0f} ms"
	grown = server.rss_bytes() - rss_before
	assert grown < 20 * 1024 * 1024, f"server grew {grown / 1e6:.1f} MB for a client that never read"
	# Cut by the budget right past it, or (on a machine too busy to fill it quickly) by the
	# stall rule before it: either way, never far past what the process may hold.
	unsent_at_cut = int(re.search(r"slow client cut off \((?:over budget|stalled)\): (\d+) bytes", server.log())[1])
	assert unsent_at_cut < 2 * 4 * 1024 * 1024, f"cut only at {unsent_at_cut / 1e6:.1f} MB unsent"
	assert server.metric("excel_pos_realtime_queued_bytes") < 256 * 1024
	stalled.close()


def test_a_burst_that_healthy_clients_drain_does_not_trip_the_limit(realtime, js, publish):
	server = realtime(slow_client_seconds=1)
	js.connect("c", server.url + NS, token=token())
	for n in range(3_000):  # ~3 MB in a burst: the client falls behind and keeps taking packets
		publish.publish_event("burst", {"n": n, "pad": "y" * 1000})
	publish.publish_event("fence", None)
	js.wait_event("c", "fence", timeout=30)
	assert len(js.received("c", "burst")) == 3_000
	assert server.metric("excel_pos_realtime_slow_client_disconnects_total") == 0


def connect_healthy(js, server, clients: list[str], room: str) -> None:
	"""Connect JS clients (``poll…`` on long-polling, the rest on websocket) and have each
	join ``room``; their events come back abridged, so large ones can be counted cheaply."""
	for client in clients:
		transport = "polling" if client.startswith("poll") else "websocket"
		opts = {"transports": [transport], "auth": {"token": token(f"{client}@example.com")}, "reconnection": False}
		js.send(cmd="connect", id=client, url=server.url + NS, opts=opts, brief=True)
	for client in clients:
		js.wait(lambda item, c=client: item.get("id") == c and item["type"] in ("connect", "connect_error"), 30, f"{client} to connect")
		assert js.emit(client, "room:join", room, timeout=30)[0]["ok"] is True


def starve(pid: int) -> subprocess.Popen:
	"""Pin ``pid`` (every thread of it) and a busy loop to one core, so that the process gets
	about half of it. Returns the busy loop, for the caller to kill."""
	cpu = max(os.sched_getaffinity(0))
	busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
	os.sched_setaffinity(busy.pid, {cpu})
	for thread in os.listdir(f"/proc/{pid}/task"):
		os.sched_setaffinity(int(thread), {cpu})
	return busy


def test_a_burst_on_a_starved_server_cuts_only_the_client_that_stopped_reading(realtime, js, publish):
	"""20 MB to a room on a server that has half a core: every healthy client falls far
	behind while it reads, and receives every event; only the client that stopped reading is
	cut, for being stalled."""
	server = realtime()
	healthy = [f"ws{i}" for i in range(20)] + [f"poll{i}" for i in range(3)]
	connect_healthy(js, server, healthy, "firehose")
	stalled = StalledClient(server.port, token("slow@example.com"), "firehose")
	wait_for(lambda: server.health()[1]["clients"] == len(healthy) + 1, message="all clients connected")

	busy = starve(server.process.pid)
	try:
		chunk = "x" * 20_000
		for n in range(1_000):
			publish.publish_to_room("firehose", "bulk", {"n": n, "data": chunk})
		publish.publish_to_room("firehose", "fence", None)
		for client in healthy:
			end = js.wait(lambda item, c=client: item.get("id") == c and (item["type"] == "disconnect" or item.get("event") == "fence"), 180, f"fence at {client}")
			assert end["type"] == "event", end
		wait_for(lambda: server.metric("excel_pos_realtime_slow_client_disconnects_total") >= 1, 30, message="the stalled client to be cut")
	finally:
		busy.kill()
		busy.wait(10)

	for client in healthy:
		assert [args[0]["n"] for args in js.received(client, "bulk")] == list(range(1_000)), client
	assert [item for item in js.events if item.get("type") == "disconnect"] == []
	assert server.metric("excel_pos_realtime_slow_client_disconnects_total") == 1
	cuts = [line for line in server.log().splitlines() if "slow client cut off" in line]
	assert len(cuts) == 1 and "(stalled)" in cuts[0] and "user=slow@example.com" in cuts[0], cuts
	stalled.close()


def test_the_process_budget_cuts_the_stalled_client_long_before_the_stall_rule(realtime, js, publish):
	"""With a 2 MB budget and a minute's grace for stalls, a client that stopped reading is
	cut as soon as the process's unsent data passes the budget, before any client that reads;
	the healthy clients of the same room miss nothing, and the unsent data goes back to
	nothing. 10 MB in all: the kernel takes a few MB for the stalled client before its writer
	blocks, and the rest waits in the process."""
	server = realtime(max_unsent_bytes=2 * 1024 * 1024, slow_client_seconds=60)
	healthy = [f"ws{i}" for i in range(5)] + ["poll0"]
	connect_healthy(js, server, healthy, "firehose")
	stalled = StalledClient(server.port, token("slow@example.com"), "firehose")
	wait_for(lambda: server.health()[1]["clients"] == len(healthy) + 1, message="all clients connected")

	started = time.monotonic()
	chunk = "x" * 20_000
	for round_ in range(20):  # 25 events (0.5 MB) at a time, each read by the healthy clients before the next
		for n in range(25 * round_, 25 * (round_ + 1)):
			publish.publish_to_room("firehose", "bulk", {"n": n, "data": chunk})
		for client in healthy:
			js.wait_event(client, "bulk", timeout=60, where=lambda args, last=25 * round_ + 24: args[0]["n"] == last)
	wait_for(lambda: server.metric("excel_pos_realtime_slow_client_disconnects_total") == 1, 30, message="the stalled client to be cut")
	assert time.monotonic() - started < 45, "cut by the stall rule, not the budget"

	for client in healthy:
		assert [args[0]["n"] for args in js.received(client, "bulk")] == list(range(500)), client
	assert [item for item in js.events if item.get("type") == "disconnect"] == []
	cuts = [line for line in server.log().splitlines() if "slow client cut off" in line]
	assert len(cuts) == 1 and "(over budget)" in cuts[0] and "user=slow@example.com" in cuts[0], cuts
	wait_for(lambda: server.metric("excel_pos_realtime_queued_bytes") < 64 * 1024, 10, message="unsent data to drain")
	stalled.close()


def test_connections_per_user(realtime, js):
	server = realtime(connections_per_user=2, env={"EXCEL_RESTAURANT_POS_SITES": "default"})
	bearer = token("waiter@example.com")
	assert js.connect("a", server.url + NS, token=bearer)["type"] == "connect"
	assert js.connect("b", server.url + "/default", token=bearer)["type"] == "connect"  # both namespaces count
	third = js.connect("c", server.url + NS, token=bearer)
	assert third == {**third, "type": "connect_error", "message": "Too many connections for this user"}
	assert js.connect("other", server.url + NS, token=token("cook@example.com"))["type"] == "connect"
	js.disconnect("a")
	wait_for(lambda: server.health()[1]["clients"] == 2, message="a to leave")
	assert js.connect("d", server.url + NS, token=bearer)["type"] == "connect"


def test_clients_that_close_their_websockets_leave_nothing_in_the_log(realtime, js):
	"""A client that leaves sends the websocket's closing frame, which the websocket answers
	and closes its socket with; the server's own close that follows must not write an error
	for the socket it finds closed (one line per client that leaves, on a busy site)."""
	server = realtime()
	for n in range(5):
		assert js.connect(f"js{n}", server.url + NS, token=token(f"js{n}@example.com"), transport="websocket")["type"] == "connect"
	python_clients = []
	for n in range(5):
		client = socketio.Client(reconnection=False)
		client.connect(server.url, namespaces=[NS], transports=["websocket"], auth={"token": token(f"py{n}@example.com")}, wait_timeout=10)
		python_clients.append(client)
	wait_for(lambda: server.health()[1]["clients"] == 10, 10, message="ten clients")
	for n in range(5):
		js.disconnect(f"js{n}")
	for client in python_clients:
		client.disconnect()
	wait_for(lambda: server.health()[1]["clients"] == 0, 10, message="every client to leave")
	assert "error" not in server.log().lower(), server.log()


def test_rooms_per_socket(realtime, js):
	server = realtime(rooms_per_socket=3)
	js.connect("c", server.url + NS, token=token())
	for room in ("r1", "r2", "r3"):
		assert js.emit("c", "room:join", room)[0]["ok"] is True
	assert js.emit("c", "room:join", "r4")[0]["error"] == "Room limit reached (3 rooms)"
	assert js.emit("c", "room:join", "r1")[0]["ok"] is True  # already in it: no new room
	js.emit("c", "room:leave", "r1")
	assert js.emit("c", "room:join", "r4")[0]["ok"] is True


def test_event_flood_is_limited_and_counted(realtime, js, publish):
	server = realtime(events_per_second=10)
	js.connect("flood", server.url + NS, token=token("flood@example.com"))
	js.connect("legit", server.url + NS, token=token("legit@example.com"))
	for _ in range(300):
		js.emit_no_ack("flood", "ping")
	for _ in range(300):
		js.emit_no_ack("flood", "no:such:event", "x" * 100)
	assert js.emit("flood", "ping") == [{"ok": False, "error": "Rate limit exceeded"}]
	publish.publish_event("after", {"ok": 1})
	assert js.wait_event("legit", "after") == [{"ok": 1}]
	pongs = len(js.received("flood", "pong"))
	assert 20 <= pongs <= 60, pongs  # of 300: a burst of 2 × 10, plus 10/s refilled while the flood lasted
	assert server.metric("excel_pos_realtime_client_events_total", result="rate_limited") >= 500
	assert server.health()[0] == 200


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_oversized_client_message_closes_only_that_connection(realtime, js, publish, transport):
	server = realtime(max_payload=100_000)
	js.connect("big", server.url + NS, token=token("big@example.com"), transport=transport)
	js.connect("legit", server.url + NS, token=token("legit@example.com"))
	js.emit_no_ack("big", "order:update", {"room": "kitchen", "order_id": "x" * 200_000, "status": "new"})
	gone = js.wait(lambda item: item.get("id") == "big" and item["type"] == "disconnect", 10, "the oversized sender to be cut")
	assert gone["reason"] in ("transport close", "transport error")
	publish.publish_event("after", {})
	js.wait_event("legit", "after")


def test_hostile_input_never_disturbs_a_legitimate_client(realtime, js, publish):
	server = realtime()
	js.connect("legit", server.url + NS, token=token("legit@example.com"))
	js.emit("legit", "room:join", "kitchen")
	hostile = [
		({"Authorization": f"Bearer {unsigned_token({'user': 'Administrator', 'exp': int(time.time()) + 60})}"}, None),
		({"Authorization": "Bearer " + "e" * 20_000}, None),
		({"Authorization": "Bearer \u00e9\u00e9.\u00e9.\u00e9"}, None),
		({}, {"token": {"nested": ["junk"]}}),
		({}, {"token": 12345}),
		({}, ["not", "an", "object"]),
	]
	for n, (headers, auth) in enumerate(hostile):
		reply = js.connect(f"h{n}", server.url + NS, headers=headers, auth=auth)
		assert reply["type"] == "connect_error", reply
	for n in range(50):
		publish.publish_to_room("kitchen", "order:new", {"n": n})
	publish.publish_event("fence", None)
	js.wait_event("legit", "fence")
	assert [args[0]["n"] for args in js.received("legit", "order:new")] == list(range(50))
	assert_no_traceback(server.log())


room_names = st.one_of(
	st.text(max_size=300),
	st.text(alphabet=string.printable, min_size=250, max_size=260),
	st.sampled_from(["all", "website", "user:Administrator", "doc:ToDo/1", "open_doc:x", "doctype:", "task_progress:", ""]),
	st.integers(),
	st.none(),
	st.lists(st.text(max_size=5), max_size=3),
	st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def test_hostile_room_names_and_namespaces(realtime, js, publish):
	"""Property-based: every join gets a well-formed answer, and no namespace but the
	configured ones is ever entered."""
	server = realtime(events_per_second=1000)  # the joins come as fast as answers do
	client = socketio.Client(reconnection=False)
	client.connect(server.url, namespaces=[NS], auth={"token": token("guest@example.com", user_type="Website User")}, transports=["websocket"], wait_timeout=10)

	@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
	@given(room=room_names)
	def join(room):
		reply = client.call("room:join", room, namespace=NS, timeout=10)
		assert set(reply) >= {"ok", "room"}, reply
		expected = rooms.check_join("guest@example.com", "Website User", room, public_rooms=(), can_ask_frappe=False)
		assert reply["ok"] is expected.allowed
		if not reply["ok"]:
			assert reply["error"] == expected.reason

	@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
	@given(namespace=st.text(alphabet=string.ascii_letters + string.digits + "/._-:%", max_size=60).map(lambda text: "/" + text))
	def connect(namespace):
		if namespace in ("/default", NS):
			return
		attempt = socketio.Client(reconnection=False)
		errors = []
		attempt.on("connect_error", errors.append, namespace=namespace)
		with pytest.raises(socketio.exceptions.ConnectionError):
			attempt.connect(server.url, namespaces=[namespace], auth={"token": token()}, transports=["websocket"], wait_timeout=10)
		assert errors == [{"message": "Invalid namespace"}]

	try:
		join()
		connect()
		assert client.call("ping", namespace=NS, timeout=10)["timestamp"] > 0
	finally:
		client.disconnect()
	assert_no_traceback(server.log())


def test_a_refused_namespace_cannot_write_a_log_line_of_its_own(realtime):
	"""A namespace is whatever a client sends: its newlines are logged escaped, inside the line
	that refuses it, so no client can forge a line an operator would read as the server's."""
	server = realtime()
	forged = "/x\n2000-01-01 00:00:00 ERROR excel_restaurant_pos.realtime: redis lost"  # a namespace ends at a comma
	attempt = socketio.Client(reconnection=False)
	with pytest.raises(socketio.exceptions.ConnectionError):
		attempt.connect(server.url, namespaces=[forged], auth={"token": token()}, transports=["websocket"], wait_timeout=10)
	refused = wait_for(lambda: [line for line in server.log().splitlines() if "refused namespace=" in line], message="the refusal in the log")
	assert f"refused namespace={forged!r} reason='Invalid namespace'" in refused[0]
	assert not [line for line in server.log().splitlines() if line.startswith("2000-01-01")]


def attachment(number: int) -> str:
	return json.dumps({"_placeholder": True, "num": number})


@pytest.mark.parametrize(
	("frames", "farewell"),
	[
		pytest.param([f"42{NS},[\"room:join\""], ["1"], id="JSON cut short"),
		pytest.param([f"40{NS},{{\"token\": "], ["1"], id="a CONNECT whose auth is cut short"),
		pytest.param(["4x"], ["1"], id="no packet type"),
		pytest.param(["4"], ["1"], id="nothing at all"),
		pytest.param([f"44{NS},{{\"message\": \"no\"}}"], ["1"], id="CONNECT_ERROR, the server's to send"),
		pytest.param(["47"], ["1"], id="no such type"),
		pytest.param([f"42{NS},[]"], ["1"], id="an event without its name"),
		pytest.param([f"42{NS},{{\"event\": \"room:join\"}}"], ["1"], id="an event that is not an array"),
		pytest.param([f"42{NS},[\"disconnect\"]"], ["1"], id="an event by a name the protocol keeps"),
		pytest.param([f"451-{NS},[\"ping\",{attachment(3)}]", b"\x01"], ["1"], id="a placeholder that points nowhere"),
		pytest.param([f"451-/elsewhere,[\"ping\",{attachment(0)}]"], ["1"], id="binary for a namespace not joined"),
		pytest.param([f"4599-{NS},[\"ping\"]"], ["1"], id="more attachments than any client sends"),
		pytest.param([b"4\x00"], ["1"], id="bytes where a packet was due"),
		pytest.param(["hello"], [], id="not an Engine.IO packet"),
	],
)
def test_a_malformed_packet_closes_its_connection_and_nobody_else_notices(realtime, js, publish, frames, farewell):
	"""The reference server closes a connection whose client sends what is not a Socket.IO
	packet. So does this one: one line in the log says why, with no traceback and nothing in
	``/health``'s errors, and the clients beside it keep their events."""
	server = realtime()
	js.connect("kitchen", server.url + NS, token=token("chef@example.com"))
	bad, _ = raw_connect(server.port, NS, {"token": token("bad@example.com")})
	for frame in frames:
		bad.send_binary(frame) if isinstance(frame, bytes) else bad.send(frame)
	received = []
	while True:  # until the server closes it; the socket's timeout bounds the wait
		try:
			frame = bad.recv()
		except websocket.WebSocketConnectionClosedException:
			break
		if not frame:
			break
		received.append(frame)
	assert received == farewell  # Engine.IO's close, where the connection still spoke Engine.IO
	wait_for(lambda: server.health()[1]["clients"] == 1, message="the connection to be gone")
	publish.publish_event("order:new", {"order": "T1"})
	js.wait_event("kitchen", "order:new")
	assert server.metric("excel_pos_realtime_client_events_total", result="malformed") == 1
	assert [line for line in server.log().splitlines() if "malformed packet" in line]
	assert_no_traceback(server.log())
	# nothing but the server's own lines: no library's complaint about a socket closed twice
	assert [line for line in server.log().splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d\d:", line)] == []
	assert server.health()[1]["errors"] == []


def test_packets_with_binary_attachments_still_arrive(realtime):
	"""The checks leave well-formed binary packets alone: an event with ten attachments (as
	many as the reference server takes) is answered, and the connection stays."""
	server = realtime()
	ws, _ = raw_connect(server.port, NS, {"token": token("chef@example.com")})
	placeholders = ",".join(attachment(number) for number in range(10))
	ws.send(f"4510-{NS},[\"ping\",[{placeholders}]]")
	for number in range(10):
		ws.send_binary(bytes([number]) * 100)
	assert ws.recv().startswith(f"42{NS},[\"pong\",")
	ws.send(f"42{NS},[\"ping\"]")
	assert ws.recv().startswith(f"42{NS},[\"pong\",")
	ws.close()
	assert server.metric("excel_pos_realtime_client_events_total", result="malformed") == 0


@pytest.mark.parametrize(
	"body",
	[
		pytest.param(f"42{NS},[]", id="an event without its name"),
		pytest.param("hello", id="not an Engine.IO packet"),
		pytest.param(b"\xff\xfe", id="not UTF-8"),
		pytest.param("bA", id="binary that is not base64"),
		pytest.param("4\x1e", id="an empty packet after the separator"),
		pytest.param("d=", id="a JSONP body without its data"),
	],
)
def test_a_malformed_packet_over_long_polling_is_answered_at_once_and_ends_the_poll(realtime, js, publish, body):
	"""The POST that carries it is answered at once, not held until the client polls again;
	the poll under way gets Engine.IO's close; the session is gone; one line in the log says
	why, without a traceback (Engine.IO's own decode of a POST logs one). A websocket client
	beside it keeps its connection and its events."""
	server = realtime()
	js.connect("kitchen", server.url + NS, token=token("chef@example.com"))
	base = f"{server.url}/socket.io/?EIO=4&transport=polling"
	sid = json.loads(requests.get(base, timeout=10).text[1:])["sid"]
	session = f"{base}&sid={sid}"
	assert requests.post(session, data=f"40{NS}," + json.dumps({"token": token("bad@example.com")}), timeout=10).text == "OK"
	assert requests.get(session, timeout=10).text.startswith(f"40{NS},")
	with concurrent.futures.ThreadPoolExecutor(1) as pool:
		poll = pool.submit(requests.get, session, timeout=10)
		assert requests.post(session, data=body, timeout=5).text == "OK"
		# Engine.IO's close if the poll was waiting by then; if the POST came first, the
		# poll finds the session gone, as every later one does.
		answer = poll.result()
		assert (answer.status_code, answer.text) == (200, "1") or answer.status_code == 400, (answer.status_code, answer.text)
	assert requests.get(session, timeout=10).status_code == 400
	wait_for(lambda: server.health()[1]["clients"] == 1, message="the long-polling session to be gone")
	publish.publish_event("order:new", {"order": "T1"})
	assert js.wait_event("kitchen", "order:new")[0]["order"] == "T1"
	assert server.metric("excel_pos_realtime_client_events_total", result="malformed") == 1
	assert [line for line in server.log().splitlines() if f"closed eio_sid={sid}: malformed packet" in line]
	assert_no_traceback(server.log())
	assert server.health()[1]["errors"] == []


def test_no_token_is_ever_logged(realtime, js):
	server = realtime(log_level="DEBUG")
	good, bad = token("waiter@example.com"), token("waiter@example.com", ttl=-5)
	js.connect("good", server.url + NS, token=good)
	js.connect("bad", server.url + NS, token=bad)
	js.emit("good", "auth:refresh", {"token": good})
	js.disconnect("good")
	wait_for(lambda: "disconnected site=default user=waiter@example.com" in server.log(), message="the disconnect line")
	log = server.log()
	for secret in (good, bad):
		for part in secret.split("."):
			assert part not in log
	assert "refused namespace='/excel_restaurant_pos/default' reason='Unauthorized: token expired' token=" in log
	assert "connected site=default user=waiter@example.com type=System User" in log


def test_soak_with_reconnect_churn(realtime, js, publish, redis_url):
	"""500 clients, 30 s of mixed app and Frappe traffic while 100 of them reconnect over and
	over: every client that stayed connected receives every event meant for it, exactly once,
	and memory does not grow with the churn.

	A closed Engine.IO socket is held for one ping interval (25 s) by its ping task, so memory
	under churn is "churn rate × 25 s" of closed sockets. The baseline is therefore taken after
	a warm-up of the same traffic lasting longer than that, and compared with the end of the
	soak: a leak shows as growth between the two; the steady cost of churn does not."""
	import redis

	server = realtime()
	steady = [f"s{i}" for i in range(400)]
	churners = [f"c{i}" for i in range(100)]
	for n, client in enumerate(steady):
		js.send(cmd="connect", id=client, url=server.url + NS, opts={"transports": ["websocket" if n % 4 else "polling"], "auth": {"token": token(f"{client}@example.com")}, "reconnection": False})
	for client in steady:
		js.wait(lambda item, c=client: item.get("id") == c and item["type"] == "connect", 60, f"{client} to connect")
	for n, client in enumerate(steady):
		js.send(cmd="emit", id=client, event="room:join", args=[f"table:{n % 10}"], ack=False)
	for client in steady:
		js.wait(lambda item, c=client: item.get("id") == c and item.get("event") == "room:joined", 30, f"{client} to join")

	frappe = redis.Redis.from_url(redis_url)
	expected = {f"table:{n}": 0 for n in range(10)}
	counts = {"broadcasts": 0, "rounds": 0}

	def traffic_with_churn(seconds: float) -> None:
		stop = time.monotonic() + seconds
		while time.monotonic() < stop:
			for n in range(10):
				room = f"table:{n}"
				publish.publish_to_room(room, "order:new", {"room": room, "seq": expected[room]})
				expected[room] += 1
			body = {"event": "list_update", "message": {"seq": counts["broadcasts"]}, "room": None, "namespace": "default"}
			frappe.publish("events", json.dumps(body, indent=1, sort_keys=True))
			counts["broadcasts"] += 1
			generation = counts["rounds"] = counts["rounds"] + 1
			for client in churners:
				js.send(cmd="connect", id=f"{client}-{generation}", url=server.url + NS, opts={"transports": ["websocket"], "auth": {"token": token(f"{client}@example.com")}, "reconnection": False})
			for client in churners:
				js.wait(lambda item, c=f"{client}-{generation}": item.get("id") == c and item["type"] in ("connect", "connect_error"), 30, "churn connect")
				js.send(cmd="emit", id=f"{client}-{generation}", event="room:join", args=["table:0"], ack=False)
			for client in churners:
				js.disconnect(f"{client}-{generation}")

	traffic_with_churn(27)
	rss_before = server.rss_bytes()
	traffic_with_churn(30)
	rss_after = server.rss_bytes()

	publish.publish_event("fence", None)
	for client in steady:
		js.wait_event(client, "fence", timeout=60)
	for n, client in enumerate(steady):
		room = f"table:{n % 10}"
		orders = [args[0]["seq"] for args in js.received(client, "order:new")]
		assert orders == list(range(expected[room])), (client, len(orders), expected[room])
		updates = [args[0]["seq"] for args in js.received(client, "list_update")]
		assert updates == list(range(counts["broadcasts"])), (client, len(updates), counts["broadcasts"])
	wait_for(lambda: server.health()[1]["clients"] == 400, 30, message="churned clients to leave")

	grown = rss_after - rss_before
	print(
		f"soak: {counts['rounds']} churn rounds of 100 connections, {sum(expected.values())} room events, "
		f"{counts['broadcasts']} broadcasts to 400 clients; RSS {rss_before / 1e6:.1f} MB after warm-up, "
		f"{rss_after / 1e6:.1f} MB after the soak"
	)
	assert grown < 16 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB over the soak"
	assert_no_traceback(server.log())


@pytest.mark.parametrize("leaving", ["disconnect", "reset"])
def test_clients_that_leave_are_freed_as_they_leave_not_by_the_cyclic_collector(realtime, js, leaving):
	"""What a client held (its Engine.IO socket and queue, its websocket, its connection) is
	in no reference cycle once it has left, so it is freed at once, whether it said goodbye
	or its connection was reset under it (a lost network). In cycles, every client that left
	waited for a full collection, ten seconds apart at the most often, and under reconnect
	churn memory grew with them. Counted by the collector's own figures on ``/metrics``, over
	full collections after the clients left, which a heap that does not grow gets every
	``FULL_MAX``: here every ``FULL_EVERY``. (The heartbeat holds a closed socket until its
	next ping was due: a short ping interval lets go of them sooner.)"""
	server = realtime(ping_interval=1, ping_timeout=2, setup="from excel_restaurant_pos.realtime import collector\ncollector.FULL_MAX = collector.FULL_EVERY")
	proxy = TcpProxy(server.port)

	def collected() -> float:
		return sum(server.metric("python_gc_objects_collected_total", generation=g) for g in "012")

	before = collected()
	clients = [f"leaver{n}" for n in range(200)]
	for n, client in enumerate(clients):
		transport = "websocket" if n % 2 else "polling"
		assert js.connect(client, proxy.url + NS, token=token(f"{client}@example.com"), transport=transport, reconnection=False)["type"] == "connect"
	if leaving == "reset":
		proxy.refusing = True  # a poll between two requests would otherwise just open a new connection
		proxy.kill()
	else:
		for client in clients:
			js.disconnect(client)
	wait_for(lambda: server.health()[1]["clients"] == 0, 30, message="every client to leave")
	proxy.close()
	full_collections = server.metric("python_gc_collections_total", generation="2")
	# The first may have come before the heartbeat let go of the last socket; the second has not.
	wait_for(lambda: server.metric("python_gc_collections_total", generation="2") >= full_collections + 2, 40, message="two full collections")
	# Each client left some 30 objects in cycles, 6,000 in all; what remains is the Redis
	# client's own on eventlet (a timeout's traceback every second or so), whatever the clients do.
	assert collected() - before < 2500, collected() - before


@pytest.mark.parametrize("transport", ["websocket", "polling"])
def test_idle_clients_stay_through_many_pings_and_silent_ones_are_closed(realtime, js, publish, transport):
	server = realtime(ping_interval=0.5, ping_timeout=1)
	js.connect("idle", server.url + NS, token=token("idle@example.com"), transport=transport)
	silent = StalledClient(server.port, token("silent@example.com"))  # never answers a ping
	wait_for(lambda: server.health()[1]["clients"] == 1, 10, message="the silent client to be closed")
	# six pings answered: three seconds, twice what a ping interval and timeout add up to
	js.wait(lambda item: item.get("id") == "idle" and item["type"] == "ping" and sum(1 for e in js.events if e.get("type") == "ping") >= 6, 10, "six pings")
	assert [item for item in js.events if item.get("type") == "disconnect"] == []
	publish.publish_event("still:here", {})
	assert js.wait_event("idle", "still:here") == [{}]
	silent.close()


def test_silent_http_connections_are_closed_and_free_their_slot(realtime, js, publish):
	"""Connections that never finish a request (a tablet gone mid-request, a kept-alive socket
	whose peer vanished, a hostile peer) are closed after ``http_timeout``: filling every slot
	with them locks nobody out for longer than that."""
	server = realtime(max_connections=3, http_timeout=1, ping_interval=3, ping_timeout=2)
	silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
	silent[2].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
	started = time.monotonic()
	for sock in silent:
		assert sock.recv(1024) == b""  # closed by the server
		sock.close()
	assert time.monotonic() - started < 5
	assert server.health()[0] == 200
	# A long-poll waiting for events is not silence: the poll that brings the first ping has
	# waited a whole ping interval, three times the timeout.
	js.connect("poller", server.url + NS, token=token("poller@example.com"), transport="polling")
	js.wait(lambda item: item.get("id") == "poller" and item["type"] == "ping", 10, "a ping over long-polling")
	publish.publish_event("still:here", {"n": 1})
	assert js.wait_event("poller", "still:here") == [{"n": 1}]
	assert [item for item in js.events if item.get("type") == "disconnect"] == []


def test_a_connection_that_has_sent_nothing_holds_no_slot(realtime):
	"""A TCP connection that has sent nothing yet (a load balancer's TCP check, a port scan)
	is handed to the server only once its first bytes arrive: with a single slot, a request
	made beside it is answered at once, not after ``http_timeout``."""
	server = realtime(max_connections=1, http_timeout=30)
	silent = socket.create_connection(("127.0.0.1", server.port), timeout=10)
	request = socket.create_connection(("127.0.0.1", server.port), timeout=10)
	request.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	assert request.recv(1024).startswith(b"HTTP/1.1 200 "), "the silent connection held the only slot"
	request.close()
	silent.close()


def test_a_websocket_holds_its_slot_for_its_life_and_a_silent_one_gives_it_back(realtime):
	"""An upgraded websocket counts against ``max_connections`` until it closes, however the
	server reads it, and one whose peer went silent (a tablet whose Wi-Fi died) is closed by
	the ping check and frees its slot."""
	server = realtime(max_connections=1, ping_interval=2, ping_timeout=2)
	silent = StalledClient(server.port, token("silent@example.com"))
	waiting = socket.create_connection(("127.0.0.1", server.port), timeout=1)
	waiting.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	with pytest.raises(socket.timeout):
		waiting.recv(1024)  # the only slot is the websocket's
	waiting.settimeout(20)
	assert waiting.recv(1024).startswith(b"HTTP/1.1 200 "), "the silent websocket's slot was not given back"
	waiting.close()
	silent.ws.sock.settimeout(5)
	while silent.ws.sock.recv(65536):  # what it never read, then the end of the connection
		pass
	silent.close()
