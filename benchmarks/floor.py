"""The floor under S1's and S2's CPU per delivery: one ``send()`` per client per event from
CPython, and nothing else.

    .venv/bin/python benchmarks/floor.py [--quick] [--scenarios S1,S2] [--repeat 3]

At a steady rate a websocket server writes each client's frame with a system call of its
own, Node's reference as much as the product (the product merges a client's frames only
when one read of its log returns several events, S1b). This measures what those calls
alone cost from CPython, with none of a server's other work: no Redis, no Socket.IO, no
event loop. The scenario's clients are loopback TCP connections with Nagle's algorithm off
(a child process reads them all, as the load generator does); its events go out at its
rate, each the websocket frame the product sends for it, written to every client of its
room with ``socket.send``. The CPU is the writing process's, from ``getrusage``, split
into user and system time as ``run.py`` reports the servers'.

What the figures mean: a Python server can cost no less per delivery at this rate unless it
writes fewer times, so a target below ``floor ÷ reference`` is out of reach for any of
them. Compare with the reference's CPU from a ``run.py`` run in the same hour: the
machine's speed moves between runs, as ``benchmarks/README.md`` says.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import socketio
from geventwebsocket.websocket import Header

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import EVENT, ORDER, Scenario, raise_nofile, scenarios  # noqa: E402

#: The scenarios whose CPU per delivery this bounds: websocket clients at a steady rate.
FLOORED = ("S1", "S2")


def frame_for(scenario: Scenario, seq: int) -> bytes:
	"""The frame the product sends a client for the scenario's event ``seq``: an Engine.IO
	message holding the Socket.IO event, with the payload ``run.py`` publishes."""
	message = {"seq": seq, "sent_at": time.time() * 1000, "order": ORDER}
	packet = socketio.packet.Packet(socketio.packet.EVENT, namespace=scenario.namespace, data=[EVENT, message])
	payload = ("4" + packet.encode()).encode()
	return Header.encode_header(True, 0x1, b"", len(payload), 0) + payload  # a final, unmasked text frame


def rooms_of(scenario: Scenario) -> list[range]:
	"""Each room's clients, as ``run.py`` deals them out (client *i* in room *i mod R*); one
	room of every client for a namespace broadcast."""
	if not scenario.room_events:
		return [range(scenario.clients)]
	return [range(r, scenario.clients, scenario.rooms) for r in range(scenario.rooms)]


def paced(scenario: Scenario) -> Iterator[int]:
	"""Each event's number when it is due, at the scenario's rate."""
	start = time.monotonic()
	for seq in range(scenario.events):
		delay = start + seq / scenario.rate - time.monotonic()
		if delay > 0:
			time.sleep(delay)
		yield seq


def drain(port: int, clients: int) -> None:
	"""The clients: connect, then read everything until the writer closes each connection."""
	connections = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
	poller = select.epoll()
	by_fd = {}
	for conn in connections:
		conn.setblocking(False)
		poller.register(conn.fileno(), select.EPOLLIN)
		by_fd[conn.fileno()] = conn
	while by_fd:
		for fd, _ in poller.poll(1.0):
			try:
				data = by_fd[fd].recv(65536)
			except BlockingIOError:
				continue
			if not data:
				poller.unregister(fd)
				by_fd.pop(fd).close()


def run_once(scenario: Scenario) -> dict:
	"""One run: the scenario's events to its clients, each frame written once per client."""
	listener = socket.socket()
	listener.bind(("127.0.0.1", 0))
	listener.listen(4096)
	child = os.fork()
	if child == 0:
		try:
			drain(listener.getsockname()[1], scenario.clients)
		finally:
			os._exit(0)
	clients = [listener.accept()[0] for _ in range(scenario.clients)]
	listener.close()
	for conn in clients:
		conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
		conn.setblocking(False)
	rooms = [[clients[i] for i in room] for room in rooms_of(scenario)]
	deliveries = partial = 0
	before = resource.getrusage(resource.RUSAGE_SELF)
	for seq in paced(scenario):
		frame = frame_for(scenario, seq)
		for conn in rooms[seq % len(rooms)]:
			sent = conn.send(frame)
			if sent != len(frame):  # a full socket buffer: finish it as a server would, waiting
				partial += 1
				conn.setblocking(True)
				conn.sendall(frame[sent:])
				conn.setblocking(False)
			deliveries += 1
	after = resource.getrusage(resource.RUSAGE_SELF)
	for conn in clients:
		conn.close()
	os.waitpid(child, 0)
	return {
		"deliveries": deliveries,
		"partial_writes": partial,
		"frame_bytes": len(frame_for(scenario, 0)),
		"cpu_us_per_delivery": 1e6 * (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / deliveries,
		"sys_us_per_delivery": 1e6 * (after.ru_stime - before.ru_stime) / deliveries,
	}


def main(argv: list[str] | None = None) -> int:
	parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
	parser.add_argument("--quick", action="store_true", help="one run with a tenth of the clients and events: a smoke check")
	parser.add_argument("--scenarios", default=",".join(FLOORED), help=f"any of {','.join(FLOORED)}")
	parser.add_argument("--repeat", type=int, default=3, help="runs per scenario; the table shows medians")
	args = parser.parse_args(argv)
	wanted = [name.strip() for name in args.scenarios.split(",") if name.strip()]
	if not wanted or set(wanted) - set(FLOORED):
		parser.error(f"--scenarios takes any of {', '.join(FLOORED)}")
	raise_nofile()
	catalogue = scenarios(args.quick)
	repeat = 1 if args.quick else max(1, args.repeat)
	rows = []
	for name in wanted:
		runs = [run_once(catalogue[name]) for _ in range(repeat)]
		print(f"  {name}: {json.dumps(runs)}", file=sys.stderr, flush=True)
		rows.append(
			f"| {name} | {runs[0]['frame_bytes']} | {statistics.median(r['cpu_us_per_delivery'] for r in runs):.2f}"
			f" | {statistics.median(r['sys_us_per_delivery'] for r in runs):.2f} | {sum(r['partial_writes'] for r in runs)} |"
		)
	print("| scenario | frame bytes | CPU µs per delivery | of which system | partial writes |")
	print("|---|---:|---:|---:|---:|")
	print("\n".join(rows))
	return 0


if __name__ == "__main__":
	sys.exit(main())
