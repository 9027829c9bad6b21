"""Back-pressure at the Engine.IO transport: what waits for each client, and for the process.

Engine.IO keeps one unbounded queue of packets per client, drained by that client's writer.
A client that stops reading (a tablet on a dying Wi-Fi, a hostile peer) would let its queue
grow with every broadcast until the server runs out of memory. How far behind a client is
says nothing about that: on a busy machine a burst leaves every client far behind while all
of them read. So two other rules bound it, applied by the server (see
:meth:`RealtimeServer.cut_off`):

* **Stalled**: packets wait for a client and nothing moved for ``slow_client_seconds``: its
  writer took no packet and its TCP peer acknowledged no byte. The websocket writer takes one
  packet at a time and comes back for the next only once the socket took the previous one; a
  socket with a full buffer makes it wait until much of that buffer has drained, so a client
  that reads slowly shows its progress in the kernel's count of what it acknowledged (see
  :func:`bytes_acked`). A client that keeps taking data, however far behind, is never stalled.
* **Over budget**: the process's unsent data passes ``max_unsent_bytes``. A broadcast puts
  the same packet object on every queue, so :class:`UnsentData` counts each distinct packet
  once however many queues hold it: that is the memory a burst really costs. The clients that
  have taken nothing for longest are cut first, until the process is back under the budget.

The websocket wrapper remembers each client's TCP socket, so a cut can also unblock a writer
stuck in ``send()`` to a peer that no longer reads.

Direct writes: Engine.IO hands every packet to the client's writer green thread through the
queue, which costs a hub timer and two green-thread switches per packet delivered. When the
writer is idle (waiting on an empty queue) and the socket takes the whole frame at once, the
frame is written straight away instead, with the websocket's send lock held (eventlet's own;
on gevent one the backend adds, see :mod:`~excel_restaurant_pos.realtime.backend`); a frame the
socket takes only part of is finished by a green thread that keeps the lock, so the writer
(which takes the same lock) sends what follows only after it. For a broadcast the frame is
built once and written to every client. A direct write is progress, as a packet taken is.

One send per client per batch: the log reader takes events from Redis in batches, and when
events were published together (a Frappe commit's) or a backlog waits, a batch holds several
for the same client. While a :class:`WriteBatch` is open,
packets that would be written directly are held per client instead, and when it closes each
client's frames go out together in one ``send()``: a system call per client per batch, not
per event. A batch is open only while the reader delivers what one read returned, so it adds
no wait beyond that read's own delivery.

What an idle connection costs: Engine.IO sleeps a green thread per client between two
pings, waits a share of the ping timeout per client in the task that checks the answers,
and runs a reader and a writer green thread for each websocket. :class:`Heartbeat` pings
every client and checks the answers from one green thread. With direct writes the writer
only waits, so :func:`serve_websocket` runs Engine.IO's websocket handler with its reader
alone, and a queue starts a green thread to drain itself only while packets wait (a socket
that is not taking them, or an upgrade under way). The reader goes too: once upgraded, the
websocket leaves its HTTP request (see :mod:`~excel_restaurant_pos.realtime.detached`) and
:class:`WebSocketReader` reads it only when the hub sees something arrive, so an idle
websocket has no green thread at all.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from excel_restaurant_pos.realtime import packets
from excel_restaurant_pos.realtime.detached import DETACH

if TYPE_CHECKING:
	from excel_restaurant_pos.realtime.backend import Backend

logger = logging.getLogger(__name__)


def packet_size(packet: Any) -> int:
	"""What a queued Engine.IO packet will cost on the wire, near enough."""
	data = getattr(packet, "data", None)
	return 8 + (len(data) if isinstance(data, (str, bytes)) else 0)


def bytes_acked(sock: Any) -> int | None:
	"""The bytes a TCP socket's peer has acknowledged so far (Linux's ``tcpi_bytes_acked``);
	``None`` where the kernel does not say (a unix socket, another system)."""
	try:
		info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
	except (AttributeError, OSError):
		return None
	return int.from_bytes(info[120:128], sys.byteorder) if len(info) >= 128 else None


class UnsentData:
	"""The bytes waiting in every client queue, each distinct packet counted once.

	A packet carries the number of queues holding it (``unsent_holders``): its size joins the
	total when the first queue takes it and leaves when the last one lets it go, whether a
	writer took it or its queue was dropped. Past ``budget`` each new distinct packet calls
	``on_over_budget``, from inside the emit that put it.
	"""

	def __init__(self, budget: int, on_over_budget: Callable[[], None]):
		self.budget = budget
		self.on_over_budget = on_over_budget
		self.total = 0
		#: The queues holding at least one packet: the only ones a cut can relieve.
		self.queues: set[Any] = set()

	def hold(self, packet: Any) -> None:
		holders = getattr(packet, "unsent_holders", 0)
		packet.unsent_holders = holders + 1
		if not holders:
			self.total += packet_size(packet)
			if self.total > self.budget:
				self.on_over_budget()

	def release(self, packet: Any) -> None:
		holders = packet.unsent_holders - 1
		packet.unsent_holders = holders
		if not holders:
			self.total -= packet_size(packet)


class WriteBatch:
	"""Packets held for direct writes while a batch of events is delivered, by client queue,
	each client's written in one ``send()`` when the batch closes (see the module's docstring)."""

	def __init__(self) -> None:
		self.open = False
		#: Client queue → the packets held for it, in order.
		self.held: dict[Any, list[Any]] = {}

	@contextlib.contextmanager
	def batch(self) -> Iterator[None]:
		"""Hold direct writes until the block ends."""
		self.open = True
		try:
			yield
		finally:
			self.open = False
			self.flush()

	def flush(self) -> None:
		"""Write what every client queue holds."""
		held, self.held = self.held, {}
		for queue, packets in held.items():
			try:
				queue.write_held(packets)
			except Exception:  # one broken client must not keep the others' packets
				logger.exception("held packets not written")


def engineio_overrides(async_drivers: dict, unsent: UnsentData, backend: Backend, writes: WriteBatch | None = None) -> dict:
	"""A copy of Engine.IO's driver table with the client queue and the websocket wrapper in
	place; Engine.IO builds each client's queue and websocket from this table. Direct writes
	(and with them one green thread per websocket) need the backend's websocket to be one
	whose frames can be written here; without it every packet goes through Engine.IO's writer.
	Direct writes are held while ``writes`` has a batch open."""
	writes = writes if writes is not None else WriteBatch()
	queue_class = async_drivers["queue"]
	queue_empty = async_drivers["queue_empty"]
	websocket_class = async_drivers["websocket"]
	thread_class = async_drivers["thread"]

	def spawn(function: Callable, *args: Any) -> Any:
		thread = thread_class(target=function, args=args)
		thread.start()
		return thread

	class ClientQueue(queue_class):
		"""Counts what waits into ``unsent`` and keeps the clock of the stall rule: when its
		writer last made progress, and since when packets have waited."""

		def __init__(self, *args: Any, **kwargs: Any):
			super().__init__(*args, **kwargs)
			self.unsent_bytes = 0
			self.unsent_packets = 0
			self.progress_at = self.waiting_since = time.monotonic()
			#: What the websocket's TCP peer had acknowledged at the last :meth:`look_at_peer`.
			self.peer_acked: int | None = None
			#: Set once the client is cut or its socket gone: nothing here will be sent.
			self.discarded = False
			#: The Engine.IO socket, once a websocket writer drains this queue, and the
			#: websocket when packets may be written to it directly.
			self.owner: Any = None
			self.websocket: Any = None
			#: No writer waits on this queue (:func:`serve_websocket`): it drains itself.
			self.self_draining = False
			#: The green thread draining it, while packets wait.
			self.drainer: Any = None
			#: Writers (or polls) waiting in :meth:`get` for a packet.
			self.waiting = 0
			#: The websocket's connection once detached from its HTTP request.
			self.connection: Any = None

		def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
			if item is None:  # Engine.IO's end-of-stream mark: always let it through, after what is held
				held = writes.held.pop(self, None)
				if held:
					self.write_held(held)
			else:
				if self.discarded:
					return
				held = writes.held.get(self)
				if held is not None:
					held.append(item)
					return
				if self.can_write_now():
					if writes.open:
						writes.held[self] = [item]
						return
					if self.write_now([item]):
						return
			self.enqueue(item)

		def enqueue(self, item: Any) -> None:
			"""Engine.IO's way: the packet waits here for the writer or the drainer."""
			queue_class.put(self, item)
			if self.self_draining:
				self.drain()

		def write_held(self, packets: list[Any]) -> None:
			"""Write the packets a batch held, at once when the socket is still free for a
			direct write, otherwise through the queue, in order either way."""
			if self.discarded:
				return
			if self.can_write_now() and self.write_now(packets):
				return
			for item in packets:
				self.enqueue(item)

		def can_write_now(self) -> bool:
			"""A websocket that takes direct writes, with nothing waiting here and nothing
			being sent from here, so a packet may go straight out."""
			idle = self.drainer is None if self.self_draining else self.waiting > 0
			return self.websocket is not None and not self.queue and idle

		def drain(self) -> None:
			"""Start a green thread that sends what waits here, unless one runs or the
			websocket is still being upgraded (Engine.IO holds sends until it is)."""
			owner = self.owner  # none once Engine.IO has forgotten the socket (let_go)
			if self.drainer is None and owner is not None and owner.upgraded and not owner.upgrading:
				self.drainer = spawn(self._drain, self.websocket)

		def _drain(self, websocket: Any) -> None:
			"""Send packets in order until none waits; at the end mark, close the websocket
			as Engine.IO's writer does. A failed send closes it too. Either way the drainer
			ends for good (:data:`STOPPED`), so nothing else is written to a closed socket."""
			try:
				while self.queue:
					item = queue_class.get(self, False)
					self.task_done()
					if item is None:
						self.close_websocket(websocket)
						self.drainer = STOPPED
						return
					frame = websocket_frame(websocket, item)
					with websocket._sendlock:
						websocket.socket.sendall(frame)
			except Exception as exc:
				logger.debug("websocket write failed: %s", exc)  # the reader sees the closed socket
				self.close_websocket(websocket)
				self.drainer = STOPPED
				return
			self.drainer = None

		def close_websocket(self, websocket: Any) -> None:
			"""Close the websocket as Engine.IO's writer does (the closing frame, then the
			socket); a detached connection also leaves the hub and gives back its slot. A
			websocket that answered the client's closing frame has closed its socket already,
			and closing it again would only log an error for the closed socket."""
			farewell = None if socket_closed(websocket) else websocket.close
			if self.connection is None:
				if farewell is not None:
					farewell()
			else:
				self.connection.close(farewell)

		def drained(self) -> None:
			"""Wait for the drainer to finish (it ends at the end mark)."""
			if self.drainer is not None:
				try:
					self.drainer.join()
				except Exception:
					pass

		def get(self, block: bool = True, timeout: float | None = None) -> Any:
			"""Engine.IO's writer and its long-polls wait here for packets. Engine.IO gives
			each wait a ping interval and a ping timeout (``timeout``) and ends the client
			when it runs out; here a wait has no timer of its own. The :class:`Heartbeat`
			puts a ping in every client's queue each ping interval, and closes a client
			whose pong is late, which puts the end mark here: every wait ends by then
			anyway. With direct writes a websocket's writer waits at every idle moment, and
			a long-poll waits for every event; the timer, scheduled and cancelled in the
			hub each time, cost about 2 µs a wait."""
			if not block:
				if self.websocket is not None:
					# One packet per poll: the writer sends it before it comes back, so what it
					# has not sent stays here, counted, and each get says the socket took the last.
					raise queue_empty
				return super().get(False)
			self.waiting += 1
			try:
				return super().get(True, None)
			finally:
				self.waiting -= 1

		def _put(self, item: Any) -> None:
			if item is not None:
				if not self.unsent_packets:
					self.waiting_since = time.monotonic()
					unsent.queues.add(self)
				self.unsent_packets += 1
				self.unsent_bytes += packet_size(item)
				unsent.hold(item)
			super()._put(item)

		def _get(self) -> Any:
			item = super()._get()
			websocket = self.websocket
			# While a direct write is still being finished the writer may take a packet, and
			# then waits for the send lock: the socket has not taken the frame before it.
			if websocket is None or not websocket._sendlock.locked():
				self.progress_at = time.monotonic()
			if item is not None:
				self._let_go(item)
			return item

		def _let_go(self, item: Any) -> None:
			self.unsent_packets -= 1
			self.unsent_bytes -= packet_size(item)
			if not self.unsent_packets:
				unsent.queues.discard(self)
			unsent.release(item)

		def look_at_peer(self) -> None:
			"""Count as progress the bytes the websocket's peer acknowledged since the last
			look: its writer may be waiting for room in a socket that the client drains."""
			sock = getattr(self.owner, "transport_socket", None)
			acked = bytes_acked(sock) if sock is not None else None
			if acked is not None and acked != self.peer_acked:
				if self.peer_acked is not None:
					self.progress_at = time.monotonic()
				self.peer_acked = acked

		def idle_since(self) -> float:
			"""Since when packets have waited here with no progress."""
			return max(self.progress_at, self.waiting_since)

		def stalled_for(self, now: float) -> float:
			"""How long packets have waited with no progress; 0 when none wait."""
			return now - self.idle_since() if self.unsent_packets else 0.0

		def discard(self) -> None:
			"""Drop every waiting packet and take no more: nothing would send them. The end
			mark stays, so the writer or a poll still sees the end of the stream."""
			self.discarded = True
			writes.held.pop(self, None)
			marks = 0
			while self.queue:
				item = self.queue.popleft()
				if item is None:
					marks += 1
					continue
				self._let_go(item)
				self.task_done()
			self.queue.extend([None] * marks)

		def let_go(self) -> None:
			"""Engine.IO has forgotten the socket: nothing here will be sent, and the socket,
			which holds this queue as it holds the socket, is let go. (A drainer still at work
			keeps its websocket and connection, and closes them at the end mark.)"""
			self.discard()
			self.owner = None

		def write_now(self, packets: list[Any]) -> bool:
			"""Write ``packets`` without the writer, in one ``send()``, when that keeps the
			order; ``False`` when they must go through the queue.

			Nothing between the look at the send lock and the raw socket's ``send()`` lets
			another green thread run (the frame is built in memory, the raw socket never
			waits), so no other writer can come in between: the lock is taken only when the
			socket took part of the frame and a green thread must send the rest. (Taking and
			giving it back around every frame was 3 % of S1's CPU per delivery.)"""
			owner, websocket = self.owner, self.websocket
			sendlock = websocket._sendlock
			if not owner.upgraded or owner.upgrading or owner.closed or sendlock.locked():
				return False
			try:
				if len(packets) == 1:
					frame = websocket_frame(websocket, packets[0])
				else:
					frame = b"".join([websocket_frame(websocket, item) for item in packets])
				try:
					sent = websocket.socket.fd.send(frame)
				except BlockingIOError:
					sent = 0
			except Exception:
				return False  # the writer meets the same error and ends the connection
			if sent != len(frame):
				sendlock.acquire(blocking=False)  # free, as it was: nothing ran since the look
				spawn(finish_frame, websocket, memoryview(frame)[sent:])
			self.progress_at = time.monotonic()
			return True

	class WebSocketHandler:
		"""Runs Engine.IO's websocket handler for ``owner`` with direct writes, or serves the
		websocket with its reader alone where it can. Kept apart from the WSGI wrapper that
		calls it: were it the wrapper's own method, the wrapper would hold itself in a cycle
		with the Engine.IO socket and the connection's socket, which only a full collection
		frees, long after the client left."""

		__slots__ = ("owner", "handler", "detach")

		def __init__(self, owner: Any, handler: Callable[[Any], Any]):
			self.owner, self.handler = owner, handler
			#: How the connection may leave its HTTP request, where the server offers it.
			self.detach: Callable[[], Any] | None = None

		def __call__(self, websocket: Any) -> Any:
			owner, handler = self.owner, self.handler
			direct = backend.direct_websocket(websocket)
			owner.queue.owner = owner
			if direct is not None:
				owner.queue.websocket = direct
			try:
				if direct is not None and getattr(handler, "__name__", "") == "_websocket_handler" and reader_only_possible(owner):
					return serve_websocket(owner, direct, self.detach)
				return handler(websocket)
			finally:
				if owner.queue.connection is None:  # the connection is over, or its upgrade failed and polling goes on
					owner.queue.websocket = None
				else:  # detached and open: the handler that returns now must not close it
					websocket._send_closing_frame = _no_closing_frame

	class TrackedWebSocket(websocket_class):
		"""Remembers the client's TCP socket on its Engine.IO socket, and the websocket on its
		queue for direct writes (:class:`WebSocketHandler`)."""

		def __init__(self, handler: Any, server: Any):
			owner = getattr(handler, "__self__", None)
			self.websocket_handler = WebSocketHandler(owner, handler) if owner is not None else None
			super().__init__(self.websocket_handler or handler, server)

		def __call__(self, environ: dict, start_response: Any) -> Any:
			owner = self.websocket_handler.owner if self.websocket_handler is not None else None
			if owner is not None:
				sock = owner.transport_socket = backend.tcp_socket(environ)
				if sock is not None:  # as Engine.IO sets where it can reach the socket itself
					sock.settimeout(owner.server.ping_interval + owner.server.ping_timeout)
				self.websocket_handler.detach = environ.get(DETACH)
			try:
				return super().__call__(environ, start_response)
			finally:
				websocket = getattr(getattr(owner, "queue", None), "websocket", None)
				if websocket is not None:
					websocket.__dict__.pop("_send_closing_frame", None)  # the drainer closes it at the end

	return {**async_drivers, "queue": ClientQueue, "websocket": TrackedWebSocket}


def _no_closing_frame(*args: Any, **kwargs: Any) -> None:
	"""Stands for a detached websocket's ``_send_closing_frame`` while eventlet's handler returns."""


def reader_only_possible(eio_socket: Any) -> bool:
	"""Whether an Engine.IO socket has what :func:`serve_websocket` uses; without it (an
	Engine.IO release that changed them) Engine.IO's own handler and writer run."""
	names = ("sid", "connected", "upgraded", "upgrading", "closed", "receive", "close", "queue")
	server = getattr(eio_socket, "server", None)
	return all(hasattr(eio_socket, name) for name in names) and all(
		hasattr(server, name) for name in ("max_http_buffer_size", "ping_interval", "ping_timeout", "reason", "logger", "sockets")
	)


def serve_websocket(eio_socket: Any, websocket: Any, detach: Callable[[], Any] | None = None) -> list:
	"""Engine.IO's websocket handler with a reader and no writer: the probe and upgrade of
	a polling session (or a websocket from the start), then every packet the client sends,
	until the connection ends. What the server sends goes straight out from the emit, or
	through the queue's own drainer while the socket is not taking it (see
	``ClientQueue.drain``). Given ``detach`` (both backends' servers offer it, see
	:mod:`~excel_restaurant_pos.realtime.detached`), the connection leaves its request once
	upgraded, where it can, and is read only when the client sends something."""
	reader = WebSocketReader(eio_socket, websocket)
	websocket.socket.settimeout(eio_socket.server.ping_interval + eio_socket.server.ping_timeout)
	if not reader.upgrade():
		return []
	queue = eio_socket.queue
	queue.self_draining = True
	queue.drain()  # what waited for the upgrade to finish
	connection = detach() if detach is not None else None
	if connection is not None:
		reader.detach(connection)
	else:
		reader.read()
	return []


class WebSocketReader:
	"""What a client sends on its websocket, handed to Engine.IO one message at a time.

	Either the connection's own green thread reads until the end, blocked in ``recv``
	between messages, or, once the connection is detached, the hub watches the socket and a
	green thread exists only while something arrives (both :meth:`read`): an
	idle websocket then costs no green thread at all. A message that arrives in pieces is
	waited for with the socket's timeout either way.
	"""

	def __init__(self, eio_socket: Any, websocket: Any):
		self.eio_socket = eio_socket
		self.websocket = websocket
		self.server = eio_socket.server
		#: The detached connection, once its request has ended.
		self.connection: Any = None

	def wait(self) -> Any:
		data = self.websocket.wait()
		if data and len(data) > self.server.max_http_buffer_size:
			raise ValueError("packet is too large")
		return data

	def upgrade(self) -> bool:
		"""The probe and upgrade of a polling session, as Engine.IO's handler does them, or
		the start of a websocket-only one; ``False`` when the client fails the upgrade."""
		from engineio import packet

		eio_socket, server = self.eio_socket, self.server
		if not eio_socket.connected:
			eio_socket.connected = eio_socket.upgraded = True
			return True
		eio_socket.upgrading = True  # Engine.IO holds sends until the upgrade is done
		probe = packet.Packet(encoded_packet=self.wait())
		if probe.packet_type != packet.PING or probe.data != "probe":
			server.logger.info("%s: Failed websocket upgrade, no PING packet", eio_socket.sid)
			eio_socket.upgrading = False
			return False
		self.websocket.send(packet.Packet(packet.PONG, data="probe").encode())
		eio_socket.queue.put(packet.Packet(packet.NOOP))  # ends the poll under way
		if packet.Packet(encoded_packet=self.wait()).packet_type != packet.UPGRADE:
			server.logger.info("%s: Failed websocket upgrade, expected UPGRADE packet", eio_socket.sid)
			eio_socket.upgraded = eio_socket.upgrading = False
			return False
		eio_socket.upgraded, eio_socket.upgrading = True, False
		return True

	def receive(self) -> bool:
		"""Read one message and hand it to Engine.IO; ``False`` once the connection is over."""
		from engineio import exceptions, packet

		eio_socket = self.eio_socket
		try:
			data = self.wait()
		except Exception as exc:
			if not eio_socket.closed:
				self.server.logger.info('%s: Unexpected error "%s", closing connection', eio_socket.sid, exc)
			return False
		if data is None:  # closed by the client
			return False
		try:
			received = packet.Packet(encoded_packet=data)
		except (ValueError, TypeError, IndexError) as exc:  # not an Engine.IO packet: the connection ends
			packets.report(eio_socket.sid, exc)
			return False
		try:
			eio_socket.receive(received)
		except exceptions.UnknownPacketError:
			pass
		except exceptions.SocketIsClosedError:
			return False
		except Exception:
			self.server.logger.exception("Unknown receive error")
			return False
		return not eio_socket.closed  # the message may have closed it (a malformed packet does)

	def detach(self, connection: Any) -> None:
		"""Hand the reading to the hub: the request's green thread may end. What arrived
		with the upgrade (a buffered reader may hold it, out of the hub's sight) is read
		first."""
		self.connection = self.eio_socket.queue.connection = connection
		if connection.readable():
			self.read()
		else:
			connection.watch(self.read)

	def read(self) -> None:
		"""Hand Engine.IO what the client sends until the connection ends; once detached,
		only until a read would wait, and then the hub watches the socket again."""
		watched = False
		try:
			while self.receive():
				if self.connection is not None and not self.connection.readable():
					self.connection.watch(self.read)
					watched = True
					return
		finally:
			if not watched:
				self.end()

	def end(self) -> None:
		"""The connection is over: what waits is sent and the websocket closed (by the
		drainer, at the end mark), Engine.IO forgets the client, a detached socket closes.

		Engine.IO drops a closed socket from its table when its websocket handler returns,
		or else the heartbeat's check does, up to a quarter of ``ping_timeout`` later; a
		detached connection's handler returned long ago, so it is dropped here, or every
		client that left would be kept that much longer."""
		eio_socket, queue = self.eio_socket, self.eio_socket.queue
		queue.put(None)
		queue.drained()
		queue.self_draining = False
		eio_socket.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
		forget_socket(self.server, eio_socket)
		if self.connection is not None:
			queue.websocket = None
			self.connection.close()


def direct_writes_possible(websocket: Any) -> bool:
	"""Whether a websocket has what direct writes use: a send lock every writer takes, a frame
	packer and the raw socket (eventlet's has them as private parts; the gevent backend adds
	them around gevent-websocket's). Without them, as in a release that changed them,
	Engine.IO's writer sends every packet, as it does without this module."""
	return all(hasattr(websocket, name) for name in ("_sendlock", "_pack_message", "extensions")) and hasattr(getattr(websocket, "socket", None), "fd")


def websocket_frame(websocket: Any, packet: Any) -> bytes:
	"""The frame Engine.IO's writer would send for ``packet``. Without compression it is the
	same for every client, so a broadcast's packet keeps it for the next client."""
	if websocket.extensions:
		return websocket._pack_message(packet.encode())
	frame = getattr(packet, "websocket_frame", None)
	if frame is None:
		frame = packet.websocket_frame = websocket._pack_message(packet.encode())
	return frame


class _Stopped:
	"""A drainer that has ended for good: nothing more is drained, and no thread is kept
	that would hold its queue in a reference cycle (the thread holds the queue's method)."""

	def join(self) -> None:
		pass


STOPPED = _Stopped()


def socket_closed(websocket: Any) -> bool:
	"""Whether the websocket's own socket is closed (its file descriptor gone); its raw
	socket is ``socket.fd`` on both backends (see :func:`direct_writes_possible`). One
	that cannot say counts as open, and is closed as before."""
	fileno = getattr(getattr(getattr(websocket, "socket", None), "fd", None), "fileno", None)
	return fileno is not None and fileno() < 0


def finish_frame(websocket: Any, rest: memoryview) -> None:
	"""Send the rest of a frame the socket took only part of, then let the writer go on."""
	try:
		websocket.socket.sendall(rest)
	except OSError as exc:
		logger.debug("websocket write failed: %s", exc)  # the reader sees the closed socket
	finally:
		websocket._sendlock.release()


def forget_socket(eio_server: Any, eio_socket: Any) -> None:
	"""Drop a closed socket from Engine.IO's table, unless its sid has been taken again."""
	if eio_server.sockets.get(eio_socket.sid) is eio_socket:
		del eio_server.sockets[eio_socket.sid]


class Heartbeat:
	"""Engine.IO's pings for every client, and its check of the answers, from one green thread.

	Engine.IO schedules each client's next ping by sleeping a green thread of its own for a
	ping interval. All clients share one interval, so their pings fall due in the order they
	were scheduled: one queue in that order and one green thread that sleeps until the next
	is due do the same work. What Engine.IO does when a ping is due is unchanged: this only
	replaces its per-client ``schedule_ping``, on sockets that have the attributes it uses;
	others keep Engine.IO's own.

	Engine.IO checks the answers in a task that passes over its clients one at a time,
	waiting ``ping_timeout`` divided by their number between two: with 10,000 clients 500
	timed waits a second, two fifths of what an idle server spent. The same check
	(``check_ping_timeout``, and dropping sockets that closed) is made here in one pass over
	every client each :data:`CHECKS_PER_TIMEOUT`-th of the ping timeout, and Engine.IO's task
	is not started: a client whose pong is late is closed at most that much later than
	``ping_timeout`` (Engine.IO: up to ``ping_timeout`` later), or at once by anything sent to it.
	"""

	#: Passes of the answers' check in each ping timeout.
	CHECKS_PER_TIMEOUT = 4

	def __init__(self, eio_server: Any):
		self.server = eio_server
		self.due: collections.deque[tuple[float, Any]] = collections.deque()
		self.wake = eio_server.create_event()
		self.running = False
		eio_server.start_service_task = False  # the check below makes it

	def watch(self, eio_socket: Any) -> None:
		"""Take over the pings of a socket Engine.IO has just made; check its answers."""
		if hasattr(eio_socket, "last_ping") and hasattr(eio_socket, "_send_ping"):
			eio_socket.schedule_ping = lambda: self.schedule(eio_socket)
		self._start()

	def forget(self, eio_socket: Any) -> None:
		"""Give a socket Engine.IO has forgotten its own ``schedule_ping`` back (ours holds
		the socket: a cycle)."""
		vars(eio_socket).pop("schedule_ping", None)

	def schedule(self, eio_socket: Any) -> None:
		"""As Engine.IO's: a new ping only once the last one was answered."""
		if eio_socket.last_ping:
			eio_socket.last_ping = None
			was_empty = not self.due
			self.due.append((time.monotonic() + self.server.ping_interval, eio_socket))
			if not self._start() and was_empty:  # otherwise the loop already sleeps until an earlier ping
				self.wake.set()

	def _start(self) -> bool:
		"""Start the green thread unless it runs; whether it was started now."""
		if self.running:
			return False
		self.running = True
		self.server.start_background_task(self._run)
		return True

	def _run(self) -> None:
		from engineio import packet

		next_check = time.monotonic()
		while self.running:
			now = time.monotonic()
			while self.due and self.due[0][0] <= now:
				eio_socket = self.due.popleft()[1]
				if not eio_socket.closing and not eio_socket.closed:
					eio_socket.last_ping = time.time()
					try:
						eio_socket.send(packet.Packet(packet.PING))
					except Exception:  # a socket closing under it; the check ends it
						logger.debug("ping not sent", exc_info=True)
			if now >= next_check:
				self.check()
				next_check = now + self.server.ping_timeout / self.CHECKS_PER_TIMEOUT
			self.wake.clear()
			self.wake.wait(min(self.due[0][0], next_check) - now if self.due else next_check - now)

	def check(self) -> None:
		"""Engine.IO's check of every client, in one pass: a socket that closed leaves the
		table, one whose pong is later than ``ping_timeout`` is closed."""
		for eio_socket in list(self.server.sockets.values()):
			try:
				if eio_socket.closed:
					forget_socket(self.server, eio_socket)
				elif not eio_socket.closing:
					eio_socket.check_ping_timeout()
			except Exception:  # one client's failure is not the others'
				logger.exception("ping check of %s failed", getattr(eio_socket, "sid", "?"))

	def stop(self) -> None:
		self.running = False
		self.wake.set()


class WatchedSockets(dict):
	"""Engine.IO's sid → socket table, handing each new socket to the :class:`Heartbeat`
	before Engine.IO schedules its first ping, and letting go of what a socket holds in
	reference cycles once Engine.IO forgets it (every ``del`` of the table): its ping
	schedule, its queue's writer and websocket. Left to the cyclic collector, a client that
	left would be freed only by a full collection, with its connection and buffers."""

	def __init__(self, heartbeat: Heartbeat, *args: Any):
		super().__init__(*args)
		self.heartbeat = heartbeat

	def __setitem__(self, sid: str, eio_socket: Any) -> None:
		if sid not in self:
			self.heartbeat.watch(eio_socket)
		super().__setitem__(sid, eio_socket)

	def __delitem__(self, sid: str) -> None:
		eio_socket = self[sid]
		super().__delitem__(sid)
		self.heartbeat.forget(eio_socket)
		let_go = getattr(getattr(eio_socket, "queue", None), "let_go", None)
		if let_go is not None:
			let_go()
