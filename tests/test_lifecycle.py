"""The process: Redis outages, /health and /metrics, and a graceful SIGTERM that hands every
client back to its own reconnect logic."""

from __future__ import annotations

import os
import signal
import socket
import gc
import subprocess
import sys
import time
import weakref

from engineio import packet
from engineio.socket import Socket as EngineIOSocket
from harness import RedisServer, assert_no_traceback, free_port, wait_for
from test_connect import token

from excel_restaurant_pos.auth import make_token
from excel_restaurant_pos.realtime import collector
from excel_restaurant_pos.realtime.config import load_config
from excel_restaurant_pos.realtime.server import RealtimeServer

APP_NS = "/excel_restaurant_pos/default"


def test_redis_outage_is_survived(realtime, js, own_redis, publish, monkeypatch):
	server = realtime(redis_queue=own_redis.url)
	js.connect("c", server.url + APP_NS, token=token())
	code, body = server.health()
	assert (code, body["status"], body["redis"], body["clients"], body["errors"]) == (200, "ok", "up", 1, [])
	own_redis.stop()
	wait_for(lambda: server.health()[0] == 503, 10, message="/health to turn 503")
	body = server.health()[1]
	assert body["redis"] == "down"
	# logged once, whichever reader noticed first and however its connection failed
	(outage,) = [error for error in body["errors"] if error["message"].startswith(f"redis {own_redis.url} unavailable (")]
	assert (outage["level"], outage["message"].endswith("); retrying with backoff")) == ("ERROR", True)
	own_redis.start()
	wait_for(lambda: server.health()[0] == 200, 15, message="/health back to 200")
	monkeypatch.setenv("FRAPPE_REDIS_QUEUE", own_redis.url)
	publish._standalone_config.cache_clear()
	publish._redis_client.cache_clear()
	assert publish.publish_event("order:new", {"after": "outage"}) == 1
	assert js.wait_event("c", "order:new") == [{"after": "outage"}]
	assert server.metric("excel_pos_realtime_redis_reconnects_total") == 1
	assert server.log().count("unavailable") == 1  # logged once per outage, not per retry


def test_redis_absent_at_start(realtime, tmp_path, js):
	later = RedisServer(tmp_path / "later")
	server = realtime(redis_queue=later.url, wait_healthy=False)
	assert server.health()[0] == 503
	assert js.connect("c", server.url + APP_NS, token=token())["type"] == "connect"  # clients are served meanwhile
	later.start()
	try:
		wait_for(lambda: server.health()[0] == 200, 15, message="redis to be found")
	finally:
		later.stop()


def test_metrics_page(realtime, js, publish):
	server = realtime()
	js.connect("c", server.url + APP_NS, token=token())
	js.connect("bad", server.url + APP_NS, token="nope")
	publish.publish_event("order:new", {})
	js.wait_event("c", "order:new")
	text = server.metrics()
	assert 'excel_pos_realtime_connections{site="default"} 1.0' in text
	assert server.metric("excel_pos_realtime_connects_total", result="ok") == 1
	assert server.metric("excel_pos_realtime_connects_total", result="unauthorized") == 1
	assert server.metric("excel_pos_realtime_deliveries_total") == 1
	assert server.metric("excel_pos_realtime_redis_messages_total", channel="log", result="ok") == 1  # the helper logs it itself
	assert "excel_pos_realtime_auth_seconds_bucket" in text
	assert "excel_pos_realtime_slow_client_disconnects_total" in text


def test_answers_on_a_kept_alive_connection_are_not_held_back(realtime):
	"""Browsers and nginx keep HTTP connections alive, and a long-polling client makes one
	request after another on the same connection. A response written in two pieces (gevent
	sends the headers, then the body) would wait under Nagle's algorithm for the client's
	delayed acknowledgement of the first, at least 40 ms on Linux, on every request."""
	import http.client
	import statistics
	import urllib.parse

	server = realtime()
	url = urllib.parse.urlsplit(server.url)
	connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
	took = []
	for _ in range(20):
		started = time.monotonic()
		connection.request("GET", "/health")
		response = connection.getresponse()
		assert response.status == 200 and b'"status": "ok"' in response.read()
		took.append(time.monotonic() - started)
	connection.close()
	assert statistics.median(took) < 0.02, [f"{t * 1000:.1f} ms" for t in took]


def test_answers_to_a_websocket_call_are_not_held_back(realtime):
	"""A tablet joining a room waits for the answer. The server answers a join with more than
	one frame, and under Nagle's algorithm the second would wait for the client's delayed
	acknowledgement of the first: 44 ms for every call, measured before it was switched off."""
	import statistics

	import socketio

	server = realtime()
	client = socketio.Client(reconnection=False)
	client.connect(server.url, namespaces=[APP_NS], auth={"token": token()}, transports=["websocket"], wait_timeout=10)
	took = []
	try:
		for table in range(15):
			started = time.monotonic()
			assert client.call("room:join", f"table:{table}", namespace=APP_NS, timeout=10)["ok"] is True
			took.append(time.monotonic() - started)
	finally:
		client.disconnect()
	assert statistics.median(took) < 0.02, [f"{t * 1000:.1f} ms" for t in took]


def test_sigterm_when_idle_exits_zero_quickly(realtime):
	server = realtime()
	started = time.monotonic()
	server.signal(signal.SIGTERM)
	assert server.wait(10) == 0
	assert time.monotonic() - started < 10


def test_sigterm_hands_clients_back_to_their_reconnect_logic(realtime, js, publish, tmp_path):
	port = free_port()
	first = realtime(port=port)
	for transport in ("websocket", "polling"):
		js.connect(transport, first.url + APP_NS, token=token(), transport=transport, reconnection=True, reconnectionDelay=100, reconnectionDelayMax=500)
	started = time.monotonic()
	first.signal(signal.SIGINT)
	assert first.wait(10) == 0
	assert time.monotonic() - started < 10
	for transport in ("websocket", "polling"):
		gone = js.wait(lambda item, t=transport: item.get("id") == t and item["type"] == "disconnect", 5, f"{transport} disconnect")
		assert gone["reason"] == "transport close"
	second = realtime(port=port)  # the replacement process on the same port
	for transport in ("websocket", "polling"):
		js.wait(lambda item, t=transport: item.get("id") == t and item["type"] == "reconnect", 15, f"{transport} reconnect")
	# "reconnect" is the transport; the namespace connect (and its token check) follows it
	wait_for(lambda: second.health()[1]["clients"] == 2, 10, message="both clients back on the new server")
	publish.publish_event("order:new", {"after": "restart"})
	for transport in ("websocket", "polling"):
		assert js.wait_event(transport, "order:new") == [{"after": "restart"}]


#: Two recovering clients' events (with their offsets) waiting for a long-poll.
WAITING_EVENTS = [f'2/excel_restaurant_pos/default,["seq",{{"n":{n}}},"1-{n}"]' for n in (1, 2)]


def in_process_server(tmp_path, redis_url: str) -> RealtimeServer:
	"""A server built in this process, whose Engine.IO sockets a test registers by hand."""
	return RealtimeServer(load_config(env={"EXCEL_RESTAURANT_POS_JWT_SECRET": "x" * 32, "FRAPPE_REDIS_QUEUE": redis_url}, cwd=tmp_path))


def test_a_long_poll_gets_the_events_waiting_for_it_without_a_close_packet_behind_them(tmp_path, redis_url):
	"""socket.io-client keeps the events it reads together with a close packet until its next
	connection, whose CONNECT names the offset before them: a recovering client then gets them
	again in its replay (the rolling restart behind nginx, in ``test_processes``, showed it
	once in about twenty runs). Stopping, the server answers a long-poll with the events
	waiting for it alone, and the client's next poll, refused, sends it to reconnect; a
	long-poll with nothing waiting gets the close packet."""
	server = in_process_server(tmp_path, redis_url)
	waiting, idle = EngineIOSocket(server.sio.eio, "waiting"), EngineIOSocket(server.sio.eio, "idle")
	for eio_socket in (waiting, idle):  # as Engine.IO registers them, through its socket table's own __setitem__
		server.sio.eio.sockets[eio_socket.sid] = eio_socket
	events = WAITING_EVENTS
	for event in events:
		waiting.send(packet.Packet(packet.MESSAGE, event))

	server.drain()
	assert (waiting.closed, idle.closed) == (True, True)
	assert [(answer.packet_type, answer.data) for answer in waiting.poll()] == [(packet.MESSAGE, event) for event in events]
	assert [answer.packet_type for answer in idle.poll()] == [packet.CLOSE]


def test_a_late_pong_closes_a_long_poll_that_still_gets_the_events_waiting_for_it_alone(tmp_path, redis_url):
	"""A long-polling client whose pong is later than the ping timeout is closed by
	Engine.IO's ping check (the heartbeat's pass, or Engine.IO before a packet it sends). Events
	already waiting for the client's poll must then reach it alone, with no close packet
	behind them, or a recovering client would get them again in its replay (see the test
	above). Engine.IO's close sends that packet through its own ping check, which refuses
	it; this holds the capped Engine.IO to that, so a release that changes it is seen."""
	server = in_process_server(tmp_path, redis_url)
	late = EngineIOSocket(server.sio.eio, "late")
	server.sio.eio.sockets[late.sid] = late
	late.last_ping = time.time() - server.sio.eio.ping_timeout - 1  # pinged, and no pong since
	events = WAITING_EVENTS
	for event in events:
		late.queue.put(packet.Packet(packet.MESSAGE, event))  # as the manager delivers

	late.send(packet.Packet(packet.MESSAGE, "2/excel_restaurant_pos/default,[\"presence\"]"))  # checks before it sends
	assert late.closed
	assert [(answer.packet_type, answer.data) for answer in late.poll()] == [(packet.MESSAGE, event) for event in events]


def test_bad_configuration_stops_start_up_with_one_clear_line(tmp_path):
	taken = free_port()
	with socket.socket() as holder:
		holder.bind(("127.0.0.1", taken))
		holder.listen()
		cases = {
			"--port": (["--port", str(taken), "--host", "127.0.0.1"], f"cannot listen on 127.0.0.1:{taken} (excel_restaurant_pos_socketio_port): "),
			"--redis-queue": (["--redis-queue", "http://nope"], "option --redis-queue: invalid value 'http://nope'"),
			"--auth-mode": (["--auth-mode", "cookies"], "option --auth-mode: invalid value 'cookies' (expected one of frappe, jwt)"),
		}
		for flag, (args, expected) in cases.items():
			result = subprocess.run([sys.executable, "-m", "excel_restaurant_pos.realtime", *args], cwd=tmp_path, capture_output=True, text=True, timeout=20)
			assert result.returncode == 2, flag
			assert expected in result.stderr, (flag, result.stderr)
			assert_no_traceback(result.stderr)
	bench = tmp_path / "bench"
	(bench / "sites").mkdir(parents=True)
	(bench / "sites" / "common_site_config.json").write_text("{broken")
	result = subprocess.run([sys.executable, "-m", "excel_restaurant_pos.realtime", "--bench", str(bench)], cwd=tmp_path, capture_output=True, text=True, timeout=20)
	assert result.returncode == 2
	assert f"{bench / 'sites' / 'common_site_config.json'}: invalid JSON at line 1" in result.stderr


def test_start_up_log_says_where_it_listens(realtime, request):
	server = realtime(env={"EXCEL_RESTAURANT_POS_SITES": "site1.local"})
	line = next(line for line in server.log().splitlines() if "listening on 127.0.0.1" in line)
	assert f"127.0.0.1:{server.port} (standalone)" in line
	assert "sites site1.local" in line and "auth jwt" in line and "redis redis://127.0.0.1:" in line
	# the backend this test run chose, as the operator would read it
	assert f"; {request.config.getoption('--async-mode')};" in line


def test_a_backend_that_is_not_installed_is_named_with_what_to_install(tmp_path):
	"""Picking gevent on a Python that lacks gevent-websocket (hidden from the import
	system here) stops start-up with one line that says what to install."""
	env = {**os.environ, "EXCEL_RESTAURANT_POS_SOCKETIO_ASYNC_MODE": "gevent"}
	code = (
		"import importlib.util, sys\n"
		"real = importlib.util.find_spec\n"
		"importlib.util.find_spec = lambda name, *a: None if name == 'geventwebsocket' else real(name, *a)\n"
		"from excel_restaurant_pos.realtime.__main__ import main\n"
		"sys.exit(main(['--port', '0']))\n"
	)
	result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20)
	assert result.returncode == 2
	assert (
		"configuration error: async mode gevent (excel_restaurant_pos_socketio_async_mode) needs gevent gevent-websocket: "
		"pip install 'excel_restaurant_pos[gevent]'"
	) in result.stderr
	assert_no_traceback(result.stderr)


def test_importing_the_realtime_package_has_no_side_effects():
	"""Every module but the entry point imports without patching anything or loading a
	green-thread library: only ``__main__`` patches, once, for the backend configured."""
	code = (
		"import importlib, pkgutil, socket, sys, threading, time\n"
		"before = (socket.socket, threading.Thread, threading.Lock, time.sleep)\n"
		"import excel_restaurant_pos.realtime as realtime\n"
		"for module in pkgutil.iter_modules(realtime.__path__):\n"
		"    if module.name != '__main__':\n"
		"        importlib.import_module('excel_restaurant_pos.realtime.' + module.name)\n"
		"assert (socket.socket, threading.Thread, threading.Lock, time.sleep) == before, 'monkey-patched'\n"
		"loaded = [name for name in ('frappe', 'eventlet', 'gevent', 'geventwebsocket') if name in sys.modules]\n"
		"assert not loaded, loaded\n"
		"print('clean')\n"
	)
	result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
	assert result.stdout.strip() == "clean", result.stderr


def test_handlers_import_without_eventlet_or_socketio():
	"""Newest Frappe imports <app>.realtime.handlers into its own (gevent) process."""
	code = "import sys; import excel_restaurant_pos.realtime.handlers; print(sorted(m for m in ('eventlet', 'socketio', 'frappe', 'redis') if m in sys.modules))"
	result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
	assert result.stdout.strip() == "[]", result.stderr


def test_listens_on_a_unix_socket(tmp_path, redis_url):
	"""Behind nginx on the same host: ``excel_restaurant_pos_socketio_uds``."""
	import http.client
	import json as jsonlib

	path = tmp_path / "realtime.sock"
	env = {**os.environ, "EXCEL_RESTAURANT_POS_JWT_SECRET": "x" * 40}
	log = tmp_path / "realtime.log"
	with open(log, "wb") as output:
		process = subprocess.Popen(
			[sys.executable, "-m", "excel_restaurant_pos.realtime", "--uds", str(path), "--redis-queue", redis_url],
			cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
		)

	class UnixConnection(http.client.HTTPConnection):
		def connect(self):
			self.sock = socket.socket(socket.AF_UNIX)
			self.sock.connect(str(path))

	def health():
		try:
			connection = UnixConnection("localhost", timeout=2)
			connection.request("GET", "/health")
			response = connection.getresponse()
			return response.status, jsonlib.loads(response.read())
		except OSError:
			return None

	websockets: list[socket.socket] = []
	try:
		wait_for(lambda: (health() or (None,))[0] == 200, 15, message="a healthy server on the unix socket")
		code, body = health()
		assert (code, body["status"], body["redis"], body["clients"]) == (200, "ok", "up", 0)
		status = subprocess.run(
			[sys.executable, "-m", "excel_restaurant_pos.realtime", "status"],
			capture_output=True, text=True, timeout=30, env={**env, "FRAPPE_REDIS_QUEUE": redis_url},
		)
		assert status.stdout.startswith(f"unix:{path}: ok, redis up, 0 clients, process {body['process']}"), status.stdout + status.stderr
		connection = UnixConnection("localhost", timeout=2)
		connection.request("GET", "/socket.io/?EIO=4&transport=polling")
		assert connection.getresponse().read().startswith(b"0{")  # an Engine.IO handshake
		# Two websockets at once, which share the unix socket's one (empty) peer address.
		for _ in range(2):
			sock = socket.socket(socket.AF_UNIX)
			sock.settimeout(5)
			sock.connect(str(path))
			sock.sendall(
				b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
				b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
			)
			websockets.append(sock)
		for sock in websockets:
			answer = b""
			while b'"sid"' not in answer:  # the 101, then Engine.IO's open packet in a frame
				answer += sock.recv(4096)
			assert answer.startswith(b"HTTP/1.1 101")
			connect = f'40/excel_restaurant_pos/default,{{"token":"{make_token("cook@example.com", "x" * 40)}"}}'.encode()
			sock.sendall(masked_text_frame(connect))
		wait_for(lambda: health()[1]["clients"] == 2, 10, message="two clients over the unix socket")
		for sock in websockets:
			sock.close()
		wait_for(lambda: health()[1]["clients"] == 0, 10, message="both clients gone")
	finally:
		process.terminate()
		assert process.wait(15) == 0
		for sock in websockets:
			sock.close()
	assert_no_traceback(log.read_text())


def masked_text_frame(payload: bytes) -> bytes:
	"""A websocket text frame as a client sends it (masked; payloads under 64 KiB)."""
	mask = os.urandom(4)
	length = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
	return b"\x81" + length + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))


def test_the_start_up_heap_is_frozen_without_its_garbage():
	"""What start-up built leaves the collections (``get_objects`` lists what they walk); a
	reference cycle already dropped by then is freed, not frozen for the process's life. In
	a process of its own: freezing is for good."""
	script = """
import gc, weakref
from excel_restaurant_pos.realtime.collector import freeze_start_up_heap

class Node:
	pass

kept, dropped = Node(), Node()
dropped.me = dropped
gone = weakref.ref(dropped)
del dropped
freeze_start_up_heap()
print(gc.get_freeze_count() > 1000, gone() is None, not any(o is kept for o in gc.get_objects()))
"""
	result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
	assert result.returncode == 0, result.stderr
	assert result.stdout.split() == ["True", "True", "True"]


class Node:
	"""An object that can be put in a reference cycle."""


def cycle() -> Node:
	node = Node()
	node.me = node
	return node


class Heap:
	"""A clock and a heap size for a :class:`collector.Collector` the test moves by hand."""

	def __init__(self) -> None:
		self.now, self.size = 1000.0, 100_000
		self.collector = collector.Collector(sleep=lambda seconds: None, clock=lambda: self.now, heap=lambda: self.size)


def test_the_collector_frees_young_cycles_each_tick_and_old_ones_once_the_heap_has_grown():
	"""A cycle dropped since the last tick is freed by the next one; a cycle whose objects
	lived long enough to reach the oldest generation (a client's, when it leaves) waits for
	a full collection, which a heap of the same size does not get (an idle server, one
	whose clients come and go) and one grown by ``FULL_GROWTH`` does, ``FULL_EVERY`` after
	the last at the soonest."""
	heap = Heap()
	gc.disable()  # nothing but the ticks collects during the test
	try:
		old = cycle()
		gc.collect()  # survives: in the oldest generation from now on
		old_ref = weakref.ref(old)
		del old
		young_ref = weakref.ref(cycle())
		assert young_ref() is not None

		heap.collector.collect()
		assert young_ref() is None
		assert old_ref() is not None

		heap.now += 5 * collector.FULL_EVERY
		heap.collector.collect()
		assert old_ref() is not None  # the same heap: nothing is due

		heap.size = int(100_000 * (1 + collector.FULL_GROWTH))
		heap.collector.collect()
		assert old_ref() is None
		assert (heap.collector.base, heap.collector.last_full) == (heap.size, heap.now)
	finally:
		gc.enable()


def test_a_full_collection_is_due_on_growth_from_the_heaps_smallest_size_and_at_least_every_full_max():
	"""Clients that leave shrink the heap: growth is counted from there. A heap that never
	grows still gets a full collection every ``FULL_MAX``."""
	heap = Heap()
	heap.now += collector.FULL_EVERY
	heap.size = 60_000  # most clients left
	heap.collector.collect()
	heap.size = 74_000  # 23 % up from there
	heap.collector.collect()
	assert heap.collector.last_full == 1000.0
	heap.size = 75_000
	heap.collector.collect()
	assert heap.collector.last_full == heap.now

	full_at = heap.now
	heap.now = full_at + collector.FULL_MAX - 1
	heap.collector.collect()
	assert heap.collector.last_full == full_at
	heap.now = full_at + collector.FULL_MAX
	heap.collector.collect()
	assert heap.collector.last_full == heap.now


def test_a_slow_full_collection_spaces_the_next_one_out():
	"""Full collections take at most ``FULL_SHARE`` of the time: one that took half a
	second (a heap of many clients) is followed by the next fifty seconds later, not ten."""
	heap = Heap()
	heap.size *= 2
	times = iter([2000.0, 2000.5])
	heap.collector.clock = lambda: next(times)
	heap.collector.collect()
	assert heap.collector.next_full == 2000.0 + 0.5 + 0.5 / collector.FULL_SHARE


def test_the_collector_takes_over_from_allocation_counts_and_collects_every_interval():
	"""Once it runs, Python starts a young collection only at ``YOUNG_LIMIT`` objects, and
	each interval's tick frees the cycles dropped since the one before."""
	saved = gc.get_threshold()
	dropped: list[weakref.ref] = []
	slept: list[float] = []

	def sleep(seconds: float) -> None:
		if len(slept) == 3:
			raise StopIteration  # ends run(), which otherwise runs for the process's life
		slept.append(seconds)
		dropped.append(weakref.ref(cycle()))
		assert gc.get_threshold()[0] == collector.YOUNG_LIMIT

	try:
		try:
			collector.Collector(sleep).run()
		except StopIteration:
			pass
	finally:
		gc.set_threshold(*saved)
	assert slept == [collector.INTERVAL] * 3
	assert [ref() for ref in dropped] == [None, None, None]
