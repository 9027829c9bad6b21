"""The accounting behind back-pressure, without a running server: a broadcast's packet
counts once however many client queues hold it, the total returns to 0 once writers take the
packets or the queues are dropped, and the stall clock runs only while packets wait and
nothing moves."""

from __future__ import annotations

import socket
import time
import types
import warnings
from typing import Any

import pytest
from engineio import packet
from harness import wait_for

from excel_restaurant_pos.realtime import backend, detached, transport
from excel_restaurant_pos.realtime.config import load_config
from excel_restaurant_pos.realtime.server import RealtimeServer
from excel_restaurant_pos.realtime.transport import packet_size

with warnings.catch_warnings():
	warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")  # as the server's entry point does
	from engineio.async_drivers import eventlet as eventlet_driver
	from eventlet.semaphore import Semaphore


def client_queues(count: int, budget: int = 1 << 20, on_over_budget=lambda: None) -> tuple[transport.UnsentData, list]:
	"""``count`` queues of the class Engine.IO builds for each client, sharing one total."""
	unsent = transport.UnsentData(budget, on_over_budget)
	client_queue = transport.engineio_overrides(eventlet_driver._async, unsent, backend.Eventlet())["queue"]
	return unsent, [client_queue() for _ in range(count)]


def message(text: str) -> packet.Packet:
	return packet.Packet(packet.MESSAGE, text)


def take_all(queue) -> None:
	while queue.qsize():
		queue.get()
		queue.task_done()


def test_a_broadcast_packet_counts_once_however_many_queues_hold_it():
	unsent, queues = client_queues(3)
	broadcast = [message("x" * 1000) for _ in range(5)]
	own = message("y" * 500)
	for queue in queues:
		for item in broadcast:
			queue.put(item)
	queues[0].put(own)

	assert unsent.total == 5 * packet_size(broadcast[0]) + packet_size(own)
	assert queues[0].unsent_bytes == 5 * packet_size(broadcast[0]) + packet_size(own)  # one client's own view
	assert unsent.queues == set(queues)

	take_all(queues[0])
	take_all(queues[1])
	assert unsent.total == 5 * packet_size(broadcast[0])  # the third queue still holds them
	assert unsent.queues == {queues[2]}

	take_all(queues[2])
	assert unsent.total == 0
	assert unsent.queues == set()


def test_dropped_queues_let_their_packets_go_and_keep_the_end_mark():
	unsent, queues = client_queues(3)
	broadcast = [message("x" * 1000) for _ in range(4)]
	for queue in queues:
		for item in broadcast:
			queue.put(item)
	queues[0].put(None)  # Engine.IO's end of stream, put when a socket closes

	queues[0].discard()
	queues[1].discard()
	assert unsent.total == 4 * packet_size(broadcast[0])

	queues[2].discard()
	assert unsent.total == 0
	assert unsent.queues == set()
	assert list(queues[0].queue) == [None]
	assert queues[1].qsize() == 0
	queues[1].join()  # every dropped packet is done: a close that waits for the queue returns

	queues[1].put(message("late"))  # a cut client takes nothing more
	assert unsent.total == 0 and queues[1].qsize() == 0


def test_passing_the_budget_is_reported_from_the_put():
	reports = []
	unsent, queues = client_queues(2, budget=2500, on_over_budget=lambda: reports.append(unsent.total))
	first, second = message("x" * 1000), message("x" * 1000)
	for queue in queues:
		queue.put(first)
		queue.put(second)
	assert reports == []  # four queued packets, two distinct: 2016 bytes

	queues[0].put(message("z" * 1000))
	assert reports == [3024]


def test_the_stall_clock_runs_only_while_packets_wait():
	unsent, [queue] = client_queues(1)
	assert queue.stalled_for(queue.progress_at + 60) == 0  # idle for a minute: nothing waits

	queue.put(message("a"))
	queue.put(message("b"))
	waiting_since = queue.idle_since()
	assert queue.stalled_for(waiting_since + 5) == pytest.approx(5)

	queue.get()
	assert queue.idle_since() > waiting_since  # a packet taken is progress
	take_all(queue)
	assert queue.stalled_for(queue.idle_since() + 60) == 0


def test_a_websocket_writer_takes_one_packet_per_poll():
	"""Engine.IO's writer takes what it can before it sends; taking one at a time keeps the
	rest counted here until the socket took the packet before."""
	unsent, [queue] = client_queues(1)
	queue.websocket = types.SimpleNamespace(_sendlock=Semaphore())
	queue.put(message("a"))
	queue.put(message("b"))

	assert queue.get().data == "a"
	with pytest.raises(eventlet_driver._async["queue_empty"]):
		queue.get(block=False)
	assert queue.unsent_packets == 1


def test_a_long_poll_waits_for_its_packet_with_no_timer_of_its_own():
	"""Engine.IO gives a poll's wait a timeout; the heartbeat ends every wait before it (a
	ping, or the end mark once the client is closed), so the wait puts no timer in the hub."""
	import eventlet.hubs

	unsent, [queue] = client_queues(1)
	hub = eventlet.hubs.get_hub()
	timeout = 45.125  # as Engine.IO's poll asks: a ping interval and a ping timeout

	def timers() -> list:
		return [timer for _, timer in hub.timers + hub.next_timers if timer.seconds == timeout and not timer.called]

	poll = eventlet.spawn(queue.get, timeout=timeout)
	eventlet.sleep(0)  # the poll starts, and waits
	assert queue.waiting == 1
	assert timers() == []
	queue.put(message("a"))
	assert poll.wait().data == "a"
	assert queue.waiting == 0


def test_a_packet_taken_while_a_frame_is_still_being_finished_is_not_progress():
	"""After a direct write the socket took only part of, the idle writer may take the next
	packet at once and then wait for the send lock: that says nothing about the socket."""
	unsent, [queue] = client_queues(1)
	queue.websocket = types.SimpleNamespace(_sendlock=Semaphore())
	queue.put(message("a"))
	queue.put(message("b"))
	before = queue.progress_at

	queue.websocket._sendlock.acquire()  # the rest of a frame is still being sent
	queue.get()
	assert queue.progress_at == before

	queue.websocket._sendlock.release()
	queue.get()
	assert queue.progress_at > before


def test_bytes_the_peer_acknowledged_are_progress():
	"""A writer waiting for room in a full socket takes nothing while the client drains it:
	what the client's TCP stack acknowledged since the last look counts as progress."""
	unsent, [queue] = client_queues(1)
	with socket.create_server(("127.0.0.1", 0)) as listener:
		peer = socket.create_connection(listener.getsockname())
		server_side, _ = listener.accept()
	with peer, server_side:
		queue.owner = types.SimpleNamespace(transport_socket=server_side)
		queue.put(message("waiting"))
		queue.look_at_peer()  # the first look only learns where the count stands
		before = queue.progress_at

		queue.look_at_peer()
		assert queue.progress_at == before  # nothing acknowledged since

		acked = transport.bytes_acked(server_side)
		server_side.sendall(b"x" * 10_000)
		assert len(peer.recv(20_000)) > 0
		wait_for(lambda: transport.bytes_acked(server_side) > acked, message="the peer's acknowledgement")
		queue.look_at_peer()
		assert queue.progress_at > before


def test_time_the_process_was_blocked_does_not_count_against_a_client(tmp_path):
	"""A sweep that finds packets waiting ten seconds, right after the process itself could
	not run for a while, gives the client its full grace again before it cuts."""
	server = RealtimeServer(load_config(env={"EXCEL_RESTAURANT_POS_JWT_SECRET": "x" * 32}, cwd=tmp_path))
	queue = server.sio.eio._async["queue"]()
	closes = []
	server.sio.eio.sockets["eio1"] = types.SimpleNamespace(
		sid="eio1", queue=queue, upgraded=True, closed=False, close=lambda **how: closes.append(how)
	)
	queue.put(message("waiting"))
	queue.progress_at = queue.waiting_since = time.monotonic() - 10

	server.loop_blocked_until = time.monotonic()
	server.sweep_slow_clients()
	assert closes == [] and queue.unsent_packets == 1

	server.loop_blocked_until = time.monotonic() - server.config.slow_client_seconds
	server.sweep_slow_clients()
	assert closes == [{"wait": False, "abort": True}]
	assert server.unsent.total == 0


def test_a_long_polling_client_is_not_cut_as_stalled(tmp_path):
	"""A long-poll takes everything at once and shows no progress while its response is
	written: Engine.IO's ping check closes a poller that stops polling, not the stall rule."""
	server = RealtimeServer(load_config(env={"EXCEL_RESTAURANT_POS_JWT_SECRET": "x" * 32}, cwd=tmp_path))
	queue = server.sio.eio._async["queue"]()
	closes = []
	server.sio.eio.sockets["eio1"] = types.SimpleNamespace(
		sid="eio1", queue=queue, upgraded=False, closed=False, close=lambda **how: closes.append(how)
	)
	queue.put(message("waiting"))
	queue.progress_at = queue.waiting_since = time.monotonic() - 10 * server.config.slow_client_seconds

	server.sweep_slow_clients()
	assert closes == [] and queue.unsent_packets == 1


def test_direct_writes_need_eventlets_private_parts_and_do_without_them():
	"""A websocket without them (another eventlet release) is left to Engine.IO's writer."""
	import eventlet.websocket

	websocket = eventlet.websocket.RFC6455WebSocket.__new__(eventlet.websocket.RFC6455WebSocket)
	websocket._sendlock, websocket.extensions = object(), {}
	websocket.socket = type("Green", (), {"fd": object()})()
	assert transport.direct_writes_possible(websocket)
	del websocket._sendlock
	assert not transport.direct_writes_possible(websocket)


def test_the_reader_only_handler_needs_engineios_socket_and_does_without_it():
	"""An Engine.IO socket without what it uses (another release) keeps Engine.IO's own
	handler, with its writer."""
	import engineio

	server = engineio.Server(async_mode="threading")
	real = engineio.socket.Socket(server, "sid")
	assert transport.reader_only_possible(real)
	del real.upgrading
	assert not transport.reader_only_possible(real)
	assert not transport.reader_only_possible(types.SimpleNamespace(server=server))


def test_detaching_needs_the_hubs_readiness_listeners_and_does_without_them():
	"""A hub without readiness listeners (another eventlet release) offers websockets no way
	out of the HTTP server: they are read by their connection's green thread."""
	from eventlet import hubs

	assert detached.EventletDetached.possible()
	assert detached.EventletDetached.possible(hubs.get_hub())
	assert not detached.EventletDetached.possible(types.SimpleNamespace(READ="read", add=print))


class FakeEngineIO:
	"""The part of an Engine.IO server the heartbeat uses: its interval and timeout, its
	sockets, events and tasks."""

	def __init__(self, ping_interval: float, ping_timeout: float = 60.0):
		import threading

		self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
		self.create_event = threading.Event
		self.tasks: list = []
		self.start_service_task = True  # Engine.IO's, until the heartbeat takes its work over

	def start_background_task(self, target):
		import threading

		task = threading.Thread(target=target, daemon=True)
		self.tasks.append(task)
		task.start()
		return task


class FakeSocket:
	def __init__(self, name: str, ping_timeout: float = 60.0):
		self.name, self.sent, self.closing, self.closed = name, [], False, False
		self.sid, self.ping_timeout = name, ping_timeout
		self.last_ping = time.time()  # Engine.IO's state right after the handshake

	def check_ping_timeout(self) -> bool:  # Engine.IO's, which closes a client whose pong is late
		if self.last_ping and time.time() - self.last_ping > self.ping_timeout:
			self.closed = True
			return False
		return True

	def _send_ping(self):  # Engine.IO's per-client pinger, which the heartbeat replaces
		raise AssertionError("Engine.IO's own ping task ran")

	def send(self, pkt):
		self.sent.append((pkt.packet_type, time.monotonic()))


def test_one_heartbeat_pings_every_client_once_per_interval_in_order():
	eio = FakeEngineIO(ping_interval=0.2)
	heartbeat = transport.Heartbeat(eio)
	sockets = eio.sockets = transport.WatchedSockets(heartbeat)
	a, b, closed = FakeSocket("a"), FakeSocket("b"), FakeSocket("closed")
	foreign = types.SimpleNamespace(sid="foreign", schedule_ping=lambda: None, closing=False, closed=False, check_ping_timeout=lambda: True)
	started = time.monotonic()
	for sid, eio_socket in (("a", a), ("b", b), ("closed", closed), ("foreign", foreign)):
		sockets[sid] = eio_socket
		eio_socket.schedule_ping()  # what Engine.IO does right after it stores a new socket
	closed.closed = True
	a.schedule_ping()  # a second schedule before the ping was answered changes nothing
	wait_for(lambda: a.sent and b.sent, 5, message="the first pings")
	assert [p for p, _ in a.sent] == [p for p, _ in b.sent] == [packet.PING]
	assert min(at for _, at in a.sent + b.sent) - started >= 0.2
	assert closed.sent == []
	assert a.last_ping and b.last_ping  # waiting for the pong, as Engine.IO's check expects

	a.schedule_ping()  # a's pong arrived; b's did not
	wait_for(lambda: len(a.sent) == 2, 5, message="a's second ping")
	assert len(b.sent) == 1
	assert len(eio.tasks) == 1, "one green thread for every client"
	assert not eio.start_service_task, "Engine.IO's task checking the answers is not started"
	heartbeat.stop()
	eio.tasks[0].join(5)
	assert not eio.tasks[0].is_alive()


def test_the_heartbeat_closes_a_client_whose_pong_is_late_and_drops_closed_ones():
	"""Engine.IO's check of the answers, made by the heartbeat in one pass a quarter of the
	ping timeout: a client that stopped answering (a tablet whose Wi-Fi went, its TCP
	connection still open) is closed at most that much after ``ping_timeout``, and a socket
	that closed leaves the table, as Engine.IO's own task did it."""
	eio = FakeEngineIO(ping_interval=0.2, ping_timeout=0.4)
	heartbeat = transport.Heartbeat(eio)
	sockets = eio.sockets = transport.WatchedSockets(heartbeat)
	answering, silent, gone = (FakeSocket(name, ping_timeout=0.4) for name in ("answering", "silent", "gone"))
	for eio_socket in (answering, silent, gone):
		sockets[eio_socket.sid] = eio_socket
		eio_socket.schedule_ping()
	gone.closed = True
	wait_for(lambda: "gone" not in sockets, 5, message="the closed socket dropped")
	wait_for(lambda: silent.sent, 5, message="the first ping")
	pinged = time.time()

	def answer() -> bool:
		if answering.last_ping:  # answered as soon as pinged
			answering.schedule_ping()
		return silent.closed

	wait_for(answer, 5, message="the silent client closed", interval=0.01)
	late_by = time.time() - pinged - 0.4
	assert late_by <= 0.1 + 0.2, late_by  # a quarter of the timeout, and some scheduling
	wait_for(lambda: "silent" not in sockets, 5, message="the silent client dropped")
	assert not answering.closed and "answering" in sockets
	assert len(answering.sent) >= 2
	heartbeat.stop()
	eio.tasks[0].join(5)


# -- one send per client per batch ---------------------------------------------------------


class CountingSocket:
	"""A real socket whose sends are counted: what the kernel is asked to do per client."""

	def __init__(self, sock: socket.socket):
		self.sock = sock
		self.sends = 0

	def send(self, data: bytes) -> int:
		self.sends += 1
		return self.sock.send(data)

	def sendall(self, data: bytes) -> None:
		self.sends += 1
		self.sock.sendall(data)


def websocket_client(writes: transport.WriteBatch) -> tuple[Any, CountingSocket, socket.socket]:
	"""A client queue on an upgraded websocket that takes direct writes, as
	:func:`transport.serve_websocket` leaves it, with eventlet's own framing; the peer end of
	its socket, to read what the client would."""
	import eventlet.websocket

	unsent = transport.UnsentData(1 << 20, lambda: None)
	queue = transport.engineio_overrides(eventlet_driver._async, unsent, backend.Eventlet(), writes)["queue"]()
	ours, peer = socket.socketpair()
	ours.setblocking(False)
	peer.settimeout(5)
	counting = CountingSocket(ours)
	framing = eventlet.websocket.RFC6455WebSocket(ours, {})
	queue.websocket = types.SimpleNamespace(
		_sendlock=Semaphore(), extensions=None, _pack_message=framing._pack_message, socket=types.SimpleNamespace(fd=counting, sendall=counting.sendall), close=peer.shutdown
	)
	queue.owner = types.SimpleNamespace(upgraded=True, upgrading=False, closed=False)
	queue.self_draining = True
	return queue, counting, peer


def frames(peer: socket.socket, count: int) -> list[str]:
	"""Read ``count`` short unmasked text frames, as the client would."""
	data = b""
	texts: list[str] = []
	while len(texts) < count:
		while len(data) < 2 or len(data) < 2 + data[1]:
			data += peer.recv(4096)
		assert data[0] == 0x81 and data[1] < 126, data
		texts.append(data[2 : 2 + data[1]].decode())
		data = data[2 + data[1] :]
	return texts


def drainer_done(queue: Any) -> None:
	"""Let eventlet's hub run the queue's drainer (this test process is not monkey-patched)
	until it has taken everything."""
	import eventlet

	wait_for(lambda: eventlet.sleep(0) or not queue.queue, 5, message="the drainer took every packet")


def nothing_waiting(peer: socket.socket) -> bool:
	peer.setblocking(False)
	try:
		peer.recv(1)
	except BlockingIOError:
		return True
	finally:
		peer.settimeout(5)
	return False


def test_a_batch_writes_each_clients_packets_in_one_send_in_order():
	writes = transport.WriteBatch()
	(first, first_sends, first_peer), (second, second_sends, second_peer) = websocket_client(writes), websocket_client(writes)
	broadcast = message("to everyone")

	with writes.batch():
		for queue in (first, second):
			queue.put(broadcast)
		first.put(message("a"))
		first.put(message("b"))
		assert nothing_waiting(first_peer) and nothing_waiting(second_peer)

	assert frames(first_peer, 3) == ["4to everyone", "4a", "4b"]
	assert frames(second_peer, 1) == ["4to everyone"]
	assert (first_sends.sends, second_sends.sends) == (1, 1)
	assert nothing_waiting(first_peer)

	first.put(message("after the batch"))  # goes out at once again
	assert frames(first_peer, 1) == ["4after the batch"] and first_sends.sends == 2


def test_the_end_of_a_stream_in_a_batch_comes_after_what_the_batch_held():
	writes = transport.WriteBatch()
	queue, counting, peer = websocket_client(writes)
	queue.websocket.close = lambda: counting.sock.send(b"closed")  # what the client sees of the end

	with writes.batch():
		queue.put(message("a"))
		queue.put(None)

	drainer_done(queue)
	assert peer.recv(100) == b"\x81\x024a" + b"closed"


def test_a_client_cut_during_a_batch_is_sent_nothing_it_held():
	writes = transport.WriteBatch()
	queue, counting, peer = websocket_client(writes)

	with writes.batch():
		queue.put(message("a"))
		queue.discard()
		queue.put(message("b"))

	assert counting.sends == 0 and nothing_waiting(peer)


def test_a_batch_whose_socket_is_busy_when_it_closes_leaves_its_packets_queued_in_order():
	"""The rest of an earlier frame is still being sent: what the batch held waits behind it
	and goes out, in order, once the socket is free."""
	writes = transport.WriteBatch()
	queue, counting, peer = websocket_client(writes)

	with writes.batch():
		queue.put(message("a"))
		queue.put(message("b"))
		queue.websocket._sendlock.acquire()

	assert counting.sends == 0
	assert [item.data for item in queue.queue] == ["a", "b"]
	queue.websocket._sendlock.release()
	drainer_done(queue)
	assert frames(peer, 2) == ["4a", "4b"]
	assert queue.unsent_packets == 0


@pytest.mark.parametrize("length", [0, 5, 125, 126, 200, 65535, 65536, 70000])
def test_gevent_frames_are_gevent_websockets_own(length):
	"""Direct writes on gevent frame a packet as gevent-websocket itself would, at every
	length encoding (RFC 6455 §5.2: 7 bits, 16 bits, 64 bits)."""
	from geventwebsocket.websocket import Header

	green = types.SimpleNamespace(_sock=object(), sendall=None, settimeout=None)
	frames = types.SimpleNamespace(raw_write=None, handler=types.SimpleNamespace(socket=green))
	direct = backend.Gevent().direct_websocket(types.SimpleNamespace(_sock=frames))
	text = "x" * length
	assert direct._pack_message(text) == Header.encode_header(True, 0x1, b"", length, 0) + text.encode()
	data = b"\x00" * length
	assert direct._pack_message(data) == Header.encode_header(True, 0x2, b"", length, 0) + data


def test_gevent_websockets_own_writes_wait_for_a_direct_write_and_without_its_parts_there_are_none():
	"""A pong or close gevent-websocket writes itself must not land inside a frame a direct
	write is still finishing: they take the same send lock. Without the parts the backend
	wraps (another release), Engine.IO's writer sends every packet."""
	import gevent

	written: list[bytes] = []
	green = types.SimpleNamespace(_sock=object(), sendall=written.append, settimeout=lambda timeout: None)
	frames = types.SimpleNamespace(raw_write=written.append, handler=types.SimpleNamespace(socket=green))
	direct = backend.Gevent().direct_websocket(types.SimpleNamespace(_sock=frames))
	assert transport.direct_writes_possible(direct)

	direct._sendlock.acquire()  # a direct write is being finished
	pong = gevent.spawn(frames.raw_write, b"pong")
	gevent.sleep(0)
	assert written == []
	direct._sendlock.release()
	pong.join(5)
	assert written == [b"pong"]

	assert backend.Gevent().direct_websocket(types.SimpleNamespace()) is None
	assert backend.Gevent().direct_websocket(types.SimpleNamespace(_sock=types.SimpleNamespace(raw_write=None, handler=types.SimpleNamespace(socket=object())))) is None


def test_detaching_on_gevent_needs_the_loops_io_watchers_and_does_without_them():
	"""A gevent loop without io watchers (another release) offers websockets no way out of
	the HTTP server: they are read by their request's green thread."""
	assert detached.GeventDetached.possible(types.SimpleNamespace(loop=types.SimpleNamespace(io=print)))
	assert not detached.GeventDetached.possible(types.SimpleNamespace(loop=object()))
	assert not detached.GeventDetached.possible(object())


GEVENT_DETACHED = """
from gevent import monkey

monkey.patch_all()
import socket

from gevent.event import Event

from excel_restaurant_pos.realtime.detached import GeventDetached

assert GeventDetached.possible(), "this gevent's loop has no io watchers"
ours, peer = socket.socketpair()
ours.settimeout(7)
rfile = ours.makefile("rb", -1)
released = []
connection = GeventDetached(ours, rfile, lambda: released.append(True))
assert not connection.readable(), "readable before the peer sent anything"
assert ours.gettimeout() == 7, "the socket's timeout was not restored"

arrived = Event()
connection.watch(arrived.set)
peer.sendall(b"ab")
assert arrived.wait(5), "the watcher never called back"
assert rfile.read(1) == b"a"
assert connection.readable(), "a byte the buffered reader holds did not count"
assert rfile.read(1) == b"b"
assert not connection.readable()

connection.watch(arrived.set)  # closed while watched, as an idle websocket is
connection.close()
connection.close()
assert released == [True], released
assert ours.fileno() == -1, "the descriptor outlived the close"
peer.settimeout(5)
assert peer.recv(1) == b""
print("ok")
"""


def test_a_detached_gevent_connection_is_watched_counts_what_its_reader_holds_and_closes_once():
	"""gevent-websocket reads through a buffered reader that may already hold the next
	message: the connection counts it as readable, and its close ends the descriptor the
	reader keeps open, and frees the slot once."""
	import subprocess
	import sys

	result = subprocess.run([sys.executable, "-c", GEVENT_DETACHED], capture_output=True, text=True, timeout=60)
	assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
