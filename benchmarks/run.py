"""Benchmarks of the realtime server against a Node reference server.

    bash scripts/bench [--quick] [--scenarios S1,S2] [--repeat 3] [--servers product,gevent,reference,baseline]

For every scenario and every repetition it starts a fresh Redis and a fresh server (the
product on eventlet, with ``--servers ...,gevent`` the product on gevent, then the reference,
then with ``--servers ...,baseline`` a straightforward python-socketio server), connects the clients with ``benchmarks/loadgen``, publishes
events through Redis in Frappe's and the app's wire formats, and reads the server's CPU time
and memory from /proc. It prints a markdown table of medians and writes every figure to
``benchmarks/results/<timestamp>.json``. Everything runs on 127.0.0.1; every process it starts
is stopped by its PID before it exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from excel_restaurant_pos.auth import make_token  # noqa: E402
from excel_restaurant_pos.realtime.utils import encode_message  # noqa: E402
from tests.harness import FrappeStandIn, RedisServer, free_port  # noqa: E402

SECRET = "benchmark-secret-0123456789abcdef0123456789abcdef"
SITE = "default"
APP_NAMESPACE = f"/excel_restaurant_pos/{SITE}"
FRAPPE_NAMESPACE = f"/{SITE}"
EVENT = "bench_tick"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOADGEN = HERE / "loadgen" / "loadgen.mjs"
REFERENCE = HERE / "reference" / "server.mjs"
BASELINE = HERE / "baseline" / "server.py"
SERVERS = ("product", "gevent", "reference")
#: Every server the runner knows; the baseline runs only when asked for. ``gevent`` is the
#: product on its second backend.
KNOWN_SERVERS = (*SERVERS, "baseline")
PRODUCTS = ("product", "gevent")

#: A payload of the size of a small order update, so compression has something to work on.
ORDER = {
	"doctype": "POS Order",
	"name": "ORD-2024-000123",
	"status": "Preparing",
	"table": "T-07",
	"items": [
		{"item_code": "PIZZA-MARGHERITA", "qty": 2, "rate": 9.5, "notes": "no basil"},
		{"item_code": "SODA-LEMON", "qty": 3, "rate": 2.25, "notes": ""},
	],
	"modified_by": "waiter@example.com",
}


@dataclasses.dataclass
class Scenario:
	name: str
	title: str
	clients: int
	rooms: int = 10
	events: int = 0
	rate: float = 0.0  # events per second
	room_events: bool = True  # False: namespace broadcast (room null)
	channel: str = "app"  # app: excel_restaurant_pos_events; frappe: events (v15 shape)
	transport: str = "websocket"
	auth_mode: str = "jwt"
	compression: bool = False
	join: bool = True
	concurrency: int = 0  # connects in flight per loadgen worker; 0 = all at once
	settle_s: float = 0.0  # wait before reading RSS after the connect phase
	recover: bool = False  # every client asks for connection state recovery
	processes: int = 1  # product server processes on one Redis, the clients dealt out among them
	keep_alive: bool = False  # long-polling clients keep their HTTP connections, as browsers do
	burst: int = 1  # events published together (one Redis pipeline) to one room, as a Frappe commit flushes its events

	@property
	def namespace(self) -> str:
		return FRAPPE_NAMESPACE if self.channel == "frappe" else APP_NAMESPACE

	@property
	def expected(self) -> int:
		if not self.events:
			return 0
		if not self.room_events:
			return self.events * self.clients
		per_room = [len(range(r, self.clients, self.rooms)) for r in range(self.rooms)]
		return sum(per_room[(i // self.burst) % self.rooms] for i in range(self.events))


def scenarios(quick: bool) -> dict[str, Scenario]:
	k = 0.1 if quick else 1.0

	def n(value: int) -> int:
		return max(10, int(value * k))

	return {
		"S1": Scenario("S1", "room events, app channel", n(1000), 10, n(2000), 400.0),
		"S1z": Scenario("S1z", "S1 with permessage-deflate offered and enabled", n(1000), 10, n(2000), 400.0, compression=True),
		"S1b": Scenario("S1b", "S1 in bursts of 10 events to one room, as a Frappe commit publishes", n(1000), 10, n(2000), 400.0, burst=10),
		"S1r": Scenario("S1r", "S1 with every client recovering (auth recover: true)", n(1000), 10, n(2000), 400.0, recover=True),
		"S2": Scenario("S2", "namespace broadcasts, Frappe v15 events channel", n(1000), 1, n(200), 10.0, room_events=False, channel="frappe"),
		"S3f": Scenario("S3f", "connection storm, frappe auth", n(2000), 10, auth_mode="frappe", join=False),
		"S3j": Scenario("S3j", "connection storm, jwt auth", n(2000), 10, auth_mode="jwt", join=False),
		"S4": Scenario("S4", "paced room events, websocket", n(500), 10, int(50 * (2 if quick else 10)), 50.0),
		"S4r": Scenario("S4r", "S4 with every client recovering", n(500), 10, int(50 * (2 if quick else 10)), 50.0, recover=True),
		"S5": Scenario("S5", "paced room events, long-polling", n(500), 10, int(50 * (2 if quick else 10)), 50.0, transport="polling"),
		"S5k": Scenario("S5k", "S5 with keep-alive HTTP connections, as browsers poll", n(500), 10, int(50 * (2 if quick else 10)), 50.0, transport="polling", keep_alive=True),
		"S6": Scenario("S6", "idle websocket clients", n(10000), 100, concurrency=500, settle_s=3.0),
		"S8": Scenario("S8", "S6's clients, 10 room events a second for 60 s", n(10000), 100, n(600), 10.0, concurrency=500, settle_s=3.0),
		"S7": Scenario("S7", "room events at 1,000/s to rooms of 100, one product process", n(1000), 10, n(6000), 1000.0),
		"S7x2": Scenario("S7x2", "S7 with two product processes on one Redis", n(1000), 10, n(6000), 1000.0, processes=2),
	}


ORDER_OF_SCENARIOS = ("S1", "S1b", "S1z", "S1r", "S2", "S3f", "S3j", "S4", "S4r", "S5", "S5k", "S6", "S7", "S7x2", "S8")
#: Scenarios of the product alone: the reference has no multi-process mode to compare.
PRODUCT_ONLY = {"S7", "S7x2"}
#: Product-only comparisons printed under the table: (base, variant, what the variant turns on).
VARIANTS = (("S1", "S1z", "permessage-deflate"), ("S1", "S1r", "recovery"), ("S4", "S4r", "recovery"), ("S7", "S7x2", "a second process"))


# -- processes ---------------------------------------------------------------------------


def proc_times_s(pid: int) -> tuple[float, float]:
	"""utime and stime of a process, in seconds."""
	with open(f"/proc/{pid}/stat") as handle:
		fields = handle.read().rpartition(")")[2].split()
	# fields[0] is the state (field 3); utime and stime are fields 14 and 15.
	return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
	"""utime + stime of a process, in seconds."""
	return sum(proc_times_s(pid))


def cpu_and_system_s(pids: list[int]) -> tuple[float, float]:
	"""utime + stime, and stime alone, summed over the server's processes from one read of
	each: stime is the kernel's share (system calls, and on loopback the receiving side of
	TCP), the part no server's own code can shave."""
	times = [proc_times_s(pid) for pid in pids]
	return sum(user + system for user, system in times), sum(system for _, system in times)


def proc_rss_kb(pid: int) -> int:
	with open(f"/proc/{pid}/status") as handle:
		for line in handle:
			if line.startswith("VmRSS:"):
				return int(line.split()[1])
	return 0


def http_status(url: str) -> int | None:
	try:
		with urllib.request.urlopen(url, timeout=2) as response:
			return response.status
	except urllib.error.HTTPError as exc:
		return exc.code
	except OSError:
		return None


class ServerProcess:
	"""The product, the reference or the baseline server on a free loopback port."""

	def __init__(self, kind: str, scenario: Scenario, redis_url: str, frappe_url: str | None, logs: Path):
		self.kind = kind
		self.port = free_port()
		self.scenario = scenario
		self.log_path = logs / f"{scenario.name}-{kind}-{self.port}.log"
		flags = ["--port", str(self.port), "--host", "127.0.0.1", "--redis-queue", redis_url, "--auth-mode", scenario.auth_mode,
			"--websocket-compression", "true" if scenario.compression else "false"]
		if frappe_url:
			flags += ["--frappe-url", frappe_url]
		if kind in PRODUCTS:
			# WARNING keeps errors in the log without one line per connect in the CPU figures.
			self.command = [sys.executable, "-m", "excel_restaurant_pos.realtime", *flags, "--log-level", "WARNING"]
			self.command += ["--async-mode", "gevent" if kind == "gevent" else "eventlet"]
		elif kind == "baseline":
			self.command = [sys.executable, str(BASELINE), *flags]
		else:
			self.command = ["node", str(REFERENCE), *flags]
		self.env = {k: v for k, v in os.environ.items() if not k.startswith("EXCEL_RESTAURANT_POS_")}
		self.env.update({"EXCEL_RESTAURANT_POS_JWT_SECRET": SECRET, "EXCEL_RESTAURANT_POS_SITES": SITE, "PYTHONUNBUFFERED": "1"})
		self.process: subprocess.Popen | None = None

	@property
	def url(self) -> str:
		return f"http://127.0.0.1:{self.port}"

	def start(self) -> None:
		self._log = open(self.log_path, "ab")
		self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile)
		deadline = time.monotonic() + 20
		while time.monotonic() < deadline:
			if self.process.poll() is not None:
				raise RuntimeError(f"{self.kind} server exited with {self.process.returncode}: {self.log()[-2000:]}")
			if http_status(self.url + "/health") == 200:
				return
			time.sleep(0.05)
		raise RuntimeError(f"{self.kind} server not healthy within 20 s: {self.log()[-2000:]}")

	@property
	def pid(self) -> int:
		assert self.process is not None
		return self.process.pid

	def log(self) -> str:
		return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

	def stop(self) -> int | None:
		if not self.process:
			return None
		if self.process.poll() is None:
			self.process.send_signal(signal.SIGTERM)
			try:
				self.process.wait(20)
			except subprocess.TimeoutExpired:
				self.process.kill()
				self.process.wait(10)
		self._log.close()
		return self.process.returncode


def raise_nofile() -> None:
	soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
	try:
		resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
	except (ValueError, OSError):
		pass


class LoadGen:
	"""The Node load generator: JSON lines out, JSON commands in."""

	def __init__(self, scenario: Scenario, server_urls: list[str], tokens: list[str], log: Path):
		workers = max(1, -(-scenario.clients // 5000))
		self.command = [
			"node", str(LOADGEN), "--url", ",".join(url + scenario.namespace for url in server_urls), "--tokens", "-", "--transport", scenario.transport,
			"--rooms", str(scenario.rooms), "--event", EVENT, "--workers", str(workers), "--concurrency", str(scenario.concurrency),
			"--connect-timeout", "60", "--max-seconds", "600",
		]
		if scenario.compression:
			self.command.append("--deflate")
		if not scenario.join:
			self.command.append("--no-join")
		if scenario.recover:
			self.command.append("--recover")
		if scenario.keep_alive:
			self.command.append("--keep-alive")
		self._err = open(log, "ab")
		self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1, preexec_fn=raise_nofile)
		self.lines: queue.Queue[dict | None] = queue.Queue()
		threading.Thread(target=self._read, daemon=True).start()
		self.send_raw(json.dumps(tokens))

	def _read(self) -> None:
		assert self.process.stdout is not None
		for line in self.process.stdout:
			try:
				self.lines.put(json.loads(line))
			except ValueError:
				continue
		self.lines.put(None)

	def send_raw(self, text: str) -> None:
		assert self.process.stdin is not None
		self.process.stdin.write(text + "\n")
		self.process.stdin.flush()

	def send(self, **command: Any) -> None:
		self.send_raw(json.dumps(command))

	def expect(self, kind: str, timeout: float) -> dict:
		deadline = time.monotonic() + timeout
		while True:
			remaining = deadline - time.monotonic()
			if remaining <= 0:
				raise TimeoutError(f"load generator: no {kind!r} within {timeout:g} s")
			try:
				item = self.lines.get(timeout=remaining)
			except queue.Empty:
				continue
			if item is None:
				raise RuntimeError(f"load generator exited (code {self.process.poll()}) before {kind!r}")
			if item.get("type") == "error":
				raise RuntimeError(f"load generator: {item.get('error')}")
			if item.get("type") == kind:
				return item

	def stop(self) -> None:
		if self.process.poll() is None:
			try:
				self.send(cmd="exit")
				self.process.wait(10)
			except (OSError, ValueError, subprocess.TimeoutExpired):
				self.process.kill()
				self.process.wait(10)
		self._err.close()


class StormStandIn(FrappeStandIn):
	"""The tests' Frappe stand-in with a listen backlog fit for a connection storm
	(``socketserver``'s default of 5 would measure the stand-in, not the servers)."""

	def start(self) -> None:
		super().start()
		# Re-create the listening server with a deep backlog; the handler class is kept.
		handler = self.httpd.RequestHandlerClass
		self.stop()

		class Deep(ThreadingHTTPServer):
			request_queue_size = 4096
			daemon_threads = True

		self.httpd = Deep(("127.0.0.1", self.port), handler)
		threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


# -- publishing --------------------------------------------------------------------------


def frappe_v15_message(event: str, message: Any, room: str | None, site: str) -> str:
	"""What ``frappe.publish_realtime`` puts on ``events`` in v15: ``frappe.as_json`` of the
	four keys (indent 1, keys sorted)."""
	return json.dumps({"event": event, "message": message, "room": room, "namespace": site}, indent=1, sort_keys=True, separators=(",", ": "))


def publish(scenario: Scenario, redis_url: str) -> tuple[float, float, int]:
	"""Publish ``scenario.events`` events at ``scenario.rate`` per second; return the epoch ms
	of the first publish, the achieved rate and Redis's total subscriber count."""
	client = redis.Redis.from_url(redis_url)
	interval = scenario.burst / scenario.rate
	start = time.monotonic()
	start_ms = time.time() * 1000
	receivers = 0
	for first in range(0, scenario.events, scenario.burst):
		delay = start + (first // scenario.burst) * interval - time.monotonic()
		if delay > 0:
			time.sleep(delay)
		room = f"bench-room-{(first // scenario.burst) % scenario.rooms}" if scenario.room_events else None
		pipe = client.pipeline(transaction=False)
		for seq in range(first, min(first + scenario.burst, scenario.events)):
			message = {"seq": seq, "sent_at": time.time() * 1000, "order": ORDER}
			if scenario.channel == "frappe":
				pipe.publish("events", frappe_v15_message(EVENT, message, room, SITE))
			else:
				pipe.publish("excel_restaurant_pos_events", encode_message(EVENT, APP_NAMESPACE, room, message))
		receivers += sum(pipe.execute())
	elapsed = time.monotonic() - start
	client.close()
	return start_ms, scenario.events / elapsed if elapsed > 0 else 0.0, receivers


# -- one run -----------------------------------------------------------------------------


def tokens_for(count: int) -> list[str]:
	return [make_token(f"bench-{i}@example.com", SECRET, ttl=3 * 3600, user_type="System User") for i in range(count)]


def total(read: Any, pids: list[int]) -> Any:
	"""A /proc figure summed over the server's processes."""
	return sum(read(pid) for pid in pids)


def log_problems(text: str) -> list[str]:
	keys = ("ERROR", "Traceback", "CRITICAL", "WARNING", "Error", "error")
	lines = [line for line in text.splitlines() if any(key in line for key in keys)]
	return lines[:20]


def run_case(kind: str, scenario: Scenario, tokens: list[str], work: Path) -> dict[str, Any]:
	result: dict[str, Any] = {"server": kind, "scenario": scenario.name}
	redis_server = RedisServer(work / "redis")
	standin = None
	servers: list[ServerProcess] = []
	loadgen = None
	try:
		redis_server.start()
		frappe_url = None
		if scenario.auth_mode == "frappe":
			standin = StormStandIn({SITE: SECRET})
			for i in range(scenario.clients):
				standin.users[f"bench-{i}@example.com"] = {"enabled": 1, "user_type": "System User"}
			standin.start()
			frappe_url = standin.url
		for _ in range(scenario.processes if kind in PRODUCTS else 1):
			servers.append(ServerProcess(kind, scenario, redis_server.url, frappe_url, work))
			servers[-1].start()
		time.sleep(0.5)
		pids = [server.pid for server in servers]
		rss0, cpu0 = total(proc_rss_kb, pids), total(proc_cpu_s, pids)
		result["rss_idle_kb"] = rss0

		loadgen = LoadGen(scenario, [server.url for server in servers], tokens, work / f"{scenario.name}-{kind}-loadgen.log")
		connected = loadgen.expect("connected", 240)
		cpu1 = total(proc_cpu_s, pids)
		if scenario.settle_s:
			time.sleep(scenario.settle_s)
		rss1 = total(proc_rss_kb, pids)
		result["connect"] = connected
		result["connect_cpu_s"] = cpu1 - cpu0
		result["cpu_ms_per_connect"] = 1000 * (cpu1 - cpu0) / connected["connected"] if connected["connected"] else None
		result["rss_after_connect_kb"] = rss1
		result["rss_kb_per_connection"] = (rss1 - rss0) / connected["connected"] if connected["connected"] else None
		if standin is not None:
			result["frappe_calls"] = len(standin.calls("frappe.realtime.get_user_info"))

		if scenario.events:
			loadgen.send(cmd="arm")
			loadgen.expect("armed", 30)
			cpu2, sys2 = cpu_and_system_s(pids)
			start_ms, rate, receivers = publish(scenario, redis_server.url)
			result["publish_rate"] = rate
			result["redis_receivers"] = receivers
			timeout = 60 + scenario.events / max(scenario.rate, 1)
			loadgen.send(cmd="collect", expected=scenario.expected, publish_start_ms=start_ms, timeout_s=timeout, idle_s=5)
			deliveries = loadgen.expect("deliveries", timeout + 30)
			cpu3, sys3 = cpu_and_system_s(pids)
			result["deliveries"] = deliveries
			result["delivery_cpu_s"] = cpu3 - cpu2
			received = deliveries["received"]
			result["cpu_us_per_delivery"] = 1e6 * (cpu3 - cpu2) / received if received else None
			result["sys_us_per_delivery"] = 1e6 * (sys3 - sys2) / received if received else None
			result["rss_after_deliveries_kb"] = total(proc_rss_kb, pids)
	except Exception as exc:  # one failed case must not lose the others
		result["error"] = f"{type(exc).__name__}: {exc}"
	finally:
		if loadgen:
			loadgen.stop()
		if servers:
			stopping = time.monotonic()
			codes = [server.stop() for server in servers]
			result["exit_code"] = next((code for code in codes if code), codes[0])
			result["stop_s"] = time.monotonic() - stopping
			result["log_problems"] = [line for server in servers for line in log_problems(server.log())][:20]
		if standin:
			standin.stop()
		redis_server.stop()
	return result


# -- report ------------------------------------------------------------------------------

#: (scenario, label, path into a case result, format)
METRICS = [
	("connected", ("connect", "connected"), "{:.0f}"),
	("failed connects", ("connect", "failed"), "{:.0f}"),
	("connects/s", ("connect", "connects_per_s"), "{:.0f}"),
	("connect phase s", ("connect", "connect_duration_s"), "{:.2f}"),
	("server CPU ms/connect", ("cpu_ms_per_connect",), "{:.3f}"),
	("RSS KiB/connection", ("rss_kb_per_connection",), "{:.1f}"),
	("deliveries lost", ("deliveries", "lost"), "{:.0f}"),
	("deliveries/s", ("deliveries", "deliveries_per_s"), "{:.0f}"),
	("server CPU µs/delivery", ("cpu_us_per_delivery",), "{:.2f}"),
	("of which system µs/delivery", ("sys_us_per_delivery",), "{:.2f}"),
	("latency p50 ms", ("deliveries", "latency_ms_p50"), "{:.1f}"),
	("latency p90 ms", ("deliveries", "latency_ms_p90"), "{:.1f}"),
	("latency p99 ms", ("deliveries", "latency_ms_p99"), "{:.1f}"),
	("latency max ms", ("deliveries", "latency_ms_max"), "{:.1f}"),
]

SHOWN = {
	"S1": {"connected", "deliveries lost", "deliveries/s", "server CPU µs/delivery", "of which system µs/delivery", "latency p50 ms", "latency p99 ms", "server CPU ms/connect", "RSS KiB/connection"},
	"S1b": {"connected", "deliveries lost", "deliveries/s", "server CPU µs/delivery", "of which system µs/delivery", "latency p50 ms", "latency p99 ms"},
	"S1z": {"connected", "deliveries lost", "deliveries/s", "server CPU µs/delivery", "latency p50 ms", "latency p99 ms"},
	"S1r": {"connected", "deliveries lost", "deliveries/s", "server CPU µs/delivery", "of which system µs/delivery", "latency p50 ms", "latency p99 ms"},
	"S2": {"connected", "deliveries lost", "deliveries/s", "server CPU µs/delivery", "of which system µs/delivery", "latency p50 ms", "latency p99 ms"},
	"S3f": {"connected", "failed connects", "connects/s", "connect phase s", "server CPU ms/connect"},
	"S3j": {"connected", "failed connects", "connects/s", "connect phase s", "server CPU ms/connect"},
	"S4": {"connected", "deliveries lost", "latency p50 ms", "latency p90 ms", "latency p99 ms", "latency max ms", "server CPU µs/delivery", "of which system µs/delivery"},
	"S4r": {"connected", "deliveries lost", "latency p50 ms", "latency p90 ms", "latency p99 ms", "latency max ms", "server CPU µs/delivery", "of which system µs/delivery"},
	"S5": {"connected", "deliveries lost", "latency p50 ms", "latency p90 ms", "latency p99 ms", "latency max ms", "server CPU µs/delivery", "of which system µs/delivery"},
	"S5k": {"connected", "deliveries lost", "latency p50 ms", "latency p90 ms", "latency p99 ms", "latency max ms", "server CPU µs/delivery", "of which system µs/delivery"},
	"S6": {"connected", "failed connects", "connects/s", "RSS KiB/connection", "server CPU ms/connect"},
	"S7": {"connected", "deliveries lost", "deliveries/s", "server CPU µs/delivery", "of which system µs/delivery", "latency p50 ms", "latency p99 ms"},
	"S7x2": {"connected", "deliveries lost", "deliveries/s", "server CPU µs/delivery", "of which system µs/delivery", "latency p50 ms", "latency p99 ms"},
	"S8": {"connected", "deliveries lost", "server CPU µs/delivery", "latency p50 ms", "latency p99 ms", "latency max ms"},
}


def dig(data: dict, path: tuple[str, ...]) -> Any:
	for key in path:
		if not isinstance(data, dict) or key not in data:
			return None
		data = data[key]
	return data


def median_of(cases: list[dict], path: tuple[str, ...]) -> float | None:
	values = [dig(case, path) for case in cases]
	values = [v for v in values if isinstance(v, (int, float))]
	return statistics.median(values) if values else None


def table(results: dict[str, dict[str, list[dict]]]) -> str:
	"""Medians per scenario and metric: the product on eventlet, the reference and their
	ratio, then, when they ran, the product on gevent with its ratio and the baseline."""
	ran = {kind for by_server in results.values() for kind, cases in by_server.items() if cases}
	extra = [kind for kind in ("gevent", "baseline") if kind in ran]
	heads = {"gevent": " product on gevent | ratio (gevent/reference) |", "baseline": " python-socketio baseline |"}
	rows = ["| scenario | metric | product | reference | ratio (product/reference) |" + "".join(heads[kind] for kind in extra),
		"|---|---|---:|---:|---:|" + "".join("---:|---:|" if kind == "gevent" else "---:|" for kind in extra)]

	def cell(value: float | None, fmt: str) -> str:
		return fmt.format(value) if value is not None else "—"

	def ratio(a: float | None, b: float | None) -> str:
		return f"{a / b:.2f}" if a is not None and b not in (None, 0) else "—"

	for name in ORDER_OF_SCENARIOS:
		if name not in results:
			continue
		for label, path, fmt in METRICS:
			if label not in SHOWN.get(name, set()):
				continue
			p, r = (median_of(results[name].get(kind, []), path) for kind in ("product", "reference"))
			row = f"| {name} | {label} | {cell(p, fmt)} | {cell(r, fmt)} | {ratio(p, r)} |"
			for kind in extra:
				value = median_of(results[name].get(kind, []), path)
				row += f" {cell(value, fmt)} |" + (f" {ratio(value, r)} |" if kind == "gevent" else "")
			rows.append(row)
	for base, variant, feature in VARIANTS:
		if base not in results or variant not in results:
			continue
		rows += ["", f"Product, {feature} off ({base}) vs on ({variant}):", "", "| metric | off | on | on/off |", "|---|---:|---:|---:|"]
		for label, path, fmt in METRICS:
			if label not in SHOWN[variant]:
				continue
			off = median_of(results[base].get("product", []), path)
			on = median_of(results[variant].get("product", []), path)
			rows.append(f"| {label} | {cell(off, fmt)} | {cell(on, fmt)} | {ratio(on, off)} |")
	return "\n".join(rows)


# -- main --------------------------------------------------------------------------------


def check_node_modules() -> None:
	for folder in (HERE / "loadgen", HERE / "reference"):
		if not (folder / "node_modules").is_dir():
			print(f"installing {folder.relative_to(REPO)} (npm ci)", file=sys.stderr)
			subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(folder)], check=True, timeout=300)


def main(argv: list[str] | None = None) -> int:
	parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
	parser.add_argument("--quick", action="store_true", help="one run with a tenth of the clients and events: a smoke check")
	parser.add_argument("--scenarios", default=",".join(ORDER_OF_SCENARIOS), help="comma-separated, e.g. S1,S2 (S3 means S3f,S3j)")
	parser.add_argument("--repeat", type=int, default=3, help="runs per scenario and server; the table shows medians")
	parser.add_argument("--servers", default=",".join(SERVERS), help=f"any of {','.join(KNOWN_SERVERS)}")
	args = parser.parse_args(argv)
	repeat = 1 if args.quick else max(1, args.repeat)
	wanted: list[str] = []
	for name in (s.strip() for s in args.scenarios.split(",") if s.strip()):
		wanted += ["S3f", "S3j"] if name == "S3" else [name]
	catalogue = scenarios(args.quick)
	unknown = [name for name in wanted if name not in catalogue]
	if unknown:
		parser.error(f"unknown scenario(s): {', '.join(unknown)}")
	servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
	if not servers or set(servers) - set(KNOWN_SERVERS):
		parser.error(f"--servers takes any of {', '.join(KNOWN_SERVERS)}")
	if not shutil.which("redis-server") and not Path("/usr/bin/redis-server").exists():
		parser.error("redis-server is not installed")
	check_node_modules()

	stamp = time.strftime("%Y%m%dT%H%M%S")
	results_dir = HERE / "results"
	work = results_dir / f"{stamp}-logs"
	work.mkdir(parents=True, exist_ok=True)
	results: dict[str, dict[str, list[dict]]] = {}
	token_cache: dict[int, list[str]] = {}
	started = time.time()
	for run in range(repeat):
		for name in [n for n in ORDER_OF_SCENARIOS if n in wanted]:
			scenario = catalogue[name]
			tokens = token_cache.setdefault(scenario.clients, tokens_for(scenario.clients))
			for kind in [kind for kind in servers if kind in PRODUCTS or name not in PRODUCT_ONLY]:
				print(f"[{time.time() - started:6.0f} s] run {run + 1}/{repeat} {name} ({scenario.title}) {kind} ...", file=sys.stderr, flush=True)
				case = run_case(kind, scenario, tokens, work)
				case["run"] = run + 1
				results.setdefault(name, {}).setdefault(kind, []).append(case)
				summary = {key: dig(case, path) for key, path in (
					("connected", ("connect", "connected")), ("received", ("deliveries", "received")),
					("expected", ("deliveries", "expected")), ("us/delivery", ("cpu_us_per_delivery",)),
					("ms/connect", ("cpu_ms_per_connect",)), ("p99", ("deliveries", "latency_ms_p99")))}
				print(f"          {json.dumps(summary)}" + (f" ERROR {case['error']}" if "error" in case else ""), file=sys.stderr, flush=True)

	out = {
		"started": stamp,
		"quick": args.quick,
		"repeat": repeat,
		"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()},
		"scenarios": {name: dataclasses.asdict(catalogue[name]) | {"expected_deliveries": catalogue[name].expected} for name in wanted},
		"results": results,
		"logs": str(work.relative_to(REPO)),
	}
	path = results_dir / f"{stamp}.json"
	path.write_text(json.dumps(out, indent=1))
	print(table(results))
	print(f"\nfull results: {path.relative_to(REPO)}")
	return 0


if __name__ == "__main__":
	sys.exit(main())
