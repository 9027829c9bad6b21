"""What the event log's Redis work costs a server process per event, on eventlet.

    .venv/bin/python benchmarks/log_calls.py [--quick] [--calls 300] [--rounds 10]

Every event the product delivers goes through the event log (SPEC §13). The process
holding the ingest lease (the only process, or one of several) makes two Redis round trips
an event: the pub/sub read that receives the published message, and the Lua call that
appends it to the site's log and reads it back. Every other process makes the pub/sub read
and a read of the log (``XREAD``). This makes each of these calls as the product does,
through its own code (the bridge's parser, the :class:`Ingester` holding its lease, the log
reader's ``XREAD`` and :func:`log.decode`) on redis-py and eventlet's green sockets, one
event of the benchmark's size at a time, on a Redis of its own; the Lua call also without
the read, as a process that holds some leases but not all makes it. Each is timed with ``getrusage`` over
``--calls`` calls, in rounds that take turns, and the medians are printed: the CPU a
process spends on the log for each event, to set beside ``floor.py``'s sends (divide by the
clients an event reaches for the cost per delivery).

The pub/sub read is timed as a publish and its read, less a publish alone: the publish is
the publisher's cost, made here only to have something to read.
"""

from __future__ import annotations

import eventlet

eventlet.monkey_patch()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis  # noqa: E402
from run import EVENT, ORDER, SITE, frappe_v15_message  # noqa: E402

from excel_restaurant_pos.realtime import log  # noqa: E402
from excel_restaurant_pos.realtime.bridge import FRAPPE_CHANNEL as CHANNEL  # noqa: E402
from excel_restaurant_pos.realtime.bridge import Parser  # noqa: E402
from excel_restaurant_pos.realtime.ingest import Ingester  # noqa: E402
from tests.harness import RedisServer  # noqa: E402


def cpu_s() -> float:
	usage = resource.getrusage(resource.RUSAGE_SELF)
	return usage.ru_utime + usage.ru_stime


def measure(calls: int, rounds: int, url: str) -> dict[str, float]:
	"""Median µs of CPU per call of each step, over ``rounds`` rounds of ``calls`` calls."""
	client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_keepalive=True, health_check_interval=10)
	parser = Parser((SITE,), SITE)
	ingester = Ingester(client, url, "log-calls", 100_000, parser.parse, lambda *args: None)
	ingester.check_lease()  # takes the free lease: it logs what it receives
	raw = frappe_v15_message(EVENT, {"seq": 1, "sent_at": 0, "order": ORDER}, "kitchen", SITE)
	key = log.log_key(SITE)
	ingester.receive([(CHANNEL, raw)])
	ingester.receive([(CHANNEL, raw)])
	after = ""  # the entry before the one each read returns, set for each round
	delivered = ""  # where the leading process's reads start, moved on by each
	subscription = client.pubsub(ignore_subscribe_messages=True)
	subscription.subscribe(CHANNEL)
	while subscription.get_message(timeout=0.2):
		pass

	def read_log() -> None:
		read = client.xread({key: after}, count=log.BATCH, block=1000)
		if [len(entries) for _, entries in read] != [1]:
			raise RuntimeError(f"the read returned {read!r}, not the one entry")
		for entry_id, fields in read[0][1]:
			log.decode(SITE, log.text(entry_id), fields)

	def append_and_read_back() -> None:
		nonlocal delivered
		read = ingester.receive([(CHANNEL, raw)], {SITE: delivered})
		if [len(entries) for _, entries in read or ()] != [1]:
			raise RuntimeError(f"the call returned {read!r}, not the one entry it appended")
		for entry_id, fields in read[0][1]:
			delivered = log.text(entry_id)
			log.decode(SITE, delivered, fields)

	def publish_and_read() -> None:
		client.publish(CHANNEL, raw)
		if subscription.get_message(timeout=1) is None:
			raise RuntimeError("the published message was not read")

	steps: dict[str, Callable[[], None]] = {
		"read of the log (XREAD, decode)": read_log,
		"append to the log (Lua, lease held)": lambda: ingester.receive([(CHANNEL, raw)]),
		"append and read back (Lua, leading, decode)": append_and_read_back,
		"publish": lambda: client.publish("elsewhere", raw),
		"publish and pub/sub read": publish_and_read,
	}
	timings: dict[str, list[float]] = {name: [] for name in steps}
	for _ in range(rounds):
		client.xtrim(key, maxlen=2, approximate=False)  # each read returns the one entry after the first
		after = log.text(client.xrange(key, count=1)[0][0])
		for name, step in steps.items():
			# The lease lasts seconds and the server renews it twice a second; so does this,
			# outside the timing, or a slow machine's rounds would outlast it.
			ingester.check_lease()
			if not ingester.holding:
				raise RuntimeError("lost the ingest lease: another process holds it")
			delivered = log.text(client.xrevrange(key, count=1)[0][0])
			start = cpu_s()
			for _ in range(calls):
				step()
			timings[name].append(1e6 * (cpu_s() - start) / calls)
		if client.xlen(key) != 2 + 2 * calls:
			raise RuntimeError("the ingester did not log every message it received")
	subscription.close()
	medians = {name: statistics.median(values) for name, values in timings.items()}
	medians["pub/sub read"] = medians.pop("publish and pub/sub read") - medians.pop("publish")
	return medians


def main(argv: list[str] | None = None) -> int:
	parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
	parser.add_argument("--quick", action="store_true", help="a tenth of the calls, three rounds: a smoke check")
	parser.add_argument("--calls", type=int, default=300, help="calls of each step per round")
	parser.add_argument("--rounds", type=int, default=10, help="rounds; the table shows medians")
	args = parser.parse_args(argv)
	calls, rounds = (max(1, args.calls // 10), 3) if args.quick else (args.calls, args.rounds)
	with tempfile.TemporaryDirectory() as folder:
		server = RedisServer(Path(folder))
		server.start()
		try:
			medians = measure(calls, rounds, server.url)
		finally:
			server.stop()
	print(json.dumps(medians), file=sys.stderr)
	print("| step | CPU µs per event |")
	print("|---|---:|")
	for name, value in medians.items():
		print(f"| {name} | {value:.1f} |")
	print(f"| the leading process: pub/sub read, append and read back | {medians['pub/sub read'] + medians['append and read back (Lua, leading, decode)']:.1f} |")
	print(f"| any other process: pub/sub read, read of the log | {medians['pub/sub read'] + medians['read of the log (XREAD, decode)']:.1f} |")
	return 0


if __name__ == "__main__":
	sys.exit(main())
