"""The ``excel-pos`` commands, run as operators run them: ``python -m
excel_restaurant_pos.realtime COMMAND`` in a shell, and ``bench --site SITE excel-pos COMMAND``
through Frappe's command discovery (``frappe_bench_cli.py``), against real servers, real
Redis and the official JavaScript client."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import click
import jwt
import pytest
from conftest import OTHER_SECRET, SECRET
from harness import free_port, make_bench, wait_for

from excel_restaurant_pos.auth import make_token, verify_token
from excel_restaurant_pos.realtime import log
from excel_restaurant_pos.realtime.utils import APP_CHANNEL

APP_NS = "/excel_restaurant_pos/default"
BENCH_CLI = Path(__file__).parent / "frappe_bench_cli.py"


def excel_pos(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
	"""``python -m excel_restaurant_pos.realtime ARGS`` in a shell with ``env`` exported."""
	return subprocess.run(
		[sys.executable, "-m", "excel_restaurant_pos.realtime", *args],
		capture_output=True,
		text=True,
		timeout=timeout,
		env={**os.environ, **(env or {})},
	)


def bench(bench_root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
	"""``bench ARGS`` as bench runs it: Frappe's CLI from the bench's ``sites`` folder."""
	return subprocess.run(
		[sys.executable, str(BENCH_CLI), "frappe", *args],
		capture_output=True,
		text=True,
		timeout=timeout,
		cwd=bench_root / "sites",
		env={**os.environ, **(env or {})},
	)


def shell_env(redis_url: str, server=None) -> dict[str, str]:
	env = {"EXCEL_RESTAURANT_POS_JWT_SECRET": SECRET, "FRAPPE_REDIS_QUEUE": redis_url}
	if server is not None:
		env["EXCEL_RESTAURANT_POS_SOCKETIO_PORT"] = str(server.port)
	return env


class Running:
	"""A long-running command whose output lines are read as they come."""

	def __init__(self, *args: str, env: dict[str, str]):
		self.process = subprocess.Popen(
			[sys.executable, "-m", "excel_restaurant_pos.realtime", *args],
			stdout=subprocess.PIPE,
			stderr=subprocess.PIPE,
			text=True,
			env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
		)
		self.out: list[str] = []
		self.err: list[str] = []
		self.lines: queue.Queue = queue.Queue()
		for stream, sink in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
			threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

	def _read(self, stream, sink: list[str]) -> None:
		for line in stream:
			sink.append(line.rstrip("\n"))

	def wait_err(self, text: str, count: int = 1, timeout: float = 30) -> None:
		wait_for(lambda: sum(text in line for line in self.err) >= count, timeout, message=f"{text!r} x{count} on stderr; stderr: {self.err}")

	def events(self) -> list[dict]:
		return [json.loads(line) for line in self.out]

	def stop(self, signum: int = signal.SIGINT) -> int:
		if self.process.poll() is None:
			self.process.send_signal(signum)
		try:
			return self.process.wait(15)
		finally:
			if self.process.poll() is None:
				self.process.kill()


@pytest.fixture
def site_bench(tmp_path, redis_url):
	"""A bench with two sites, each with its own secret, and this app installed."""
	root = make_bench(
		tmp_path / "frappe-bench",
		common={"redis_queue": redis_url, "webserver_port": free_port()},
		sites={"site1.local": {"jwt_secret_key": SECRET}, "site2.local": {"jwt_secret_key": OTHER_SECRET}, "nosecret.local": {}},
	)
	(root / "sites" / "apps.txt").write_text("frappe\nexcel_restaurant_pos\n")
	return root


# -- token and check ----------------------------------------------------------------------


def test_a_token_from_the_command_connects_the_javascript_client(realtime, js, redis_url):
	server = realtime()
	made = excel_pos("token", "waiter@example.com", "--type", "System User", "--ttl", "600", env=shell_env(redis_url))
	assert made.returncode == 0, made.stderr
	token = made.stdout.strip()
	claims = verify_token(token, SECRET)
	assert (claims["user"], claims["user_type"], claims["exp"] - claims["iat"]) == ("waiter@example.com", "System User", 600)
	assert "token for waiter@example.com on site default, expires" in made.stderr
	assert js.connect("tablet", server.url + APP_NS, token=token)["type"] == "connect"
	assert js.emit("tablet", "room:join", "kitchen") == [{"ok": True, "room": "kitchen"}]


def test_check_gives_the_servers_own_answer(realtime, js, redis_url):
	server = realtime()
	env = shell_env(redis_url)
	good = make_token("cook@example.com", SECRET, ttl=3600, user_type="System User")
	answer = excel_pos("check", good, env=env)
	assert answer.returncode == 0, answer.stderr
	assert answer.stdout.startswith("valid: cook@example.com (System User) on site default, expires ")
	assert excel_pos("check", f"Bearer {good}", env=env).returncode == 0

	for n, bad in enumerate((make_token("cook@example.com", SECRET, ttl=-60), make_token("cook@example.com", OTHER_SECRET), "not-a-jwt")):
		refused = excel_pos("check", bad, env=env)
		told_to_a_client = js.connect(f"c{n}", server.url + APP_NS, token=bad, expect="connect_error")["message"]
		assert told_to_a_client.startswith("Unauthorized: ")
		assert (refused.returncode, refused.stdout, refused.stderr.strip()) == (1, "", f"excel-pos: refused: {told_to_a_client}")


def test_errors_are_one_line_and_an_exit_status(redis_url):
	no_secret = excel_pos("token", "bob", env={"FRAPPE_REDIS_QUEUE": redis_url})
	assert no_secret.returncode == 2
	assert no_secret.stderr.strip().startswith("excel-pos: no JWT secret for site 'default'")
	unknown = excel_pos("token", "bob", "--site", "elsewhere", env=shell_env(redis_url))
	assert (unknown.returncode, unknown.stderr.strip()) == (2, "excel-pos: unknown site 'elsewhere' (sites: default)")
	bad_config = excel_pos("token", "bob", env={**shell_env(redis_url), "EXCEL_RESTAURANT_POS_SOCKETIO_PORT": "many"})
	assert bad_config.returncode == 2
	assert bad_config.stderr.strip().startswith("excel-pos: configuration error: environment variable EXCEL_RESTAURANT_POS_SOCKETIO_PORT")
	for result in (no_secret, unknown, bad_config):
		assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- publish --------------------------------------------------------------------------------


def test_publish_reaches_the_javascript_client(realtime, js, own_redis):
	# The count printed is of every server on the Redis: this one has this test's alone.
	server = realtime(redis_queue=own_redis.url)
	env = shell_env(own_redis.url)
	js.connect("kds", server.url + APP_NS, token=make_token("cook@example.com", SECRET, user_type="System User"))
	js.emit("kds", "room:join", "kitchen")
	listening = own_redis.client()
	try:
		wait_for(lambda: listening.pubsub_numsub(APP_CHANNEL)[0][1] == 1, 10, message="the server listening")
	except AssertionError as exc:
		raise AssertionError(f"{exc}: {listening.pubsub_numsub(APP_CHANNEL)}; log:\n{server.log()}") from None

	sent = excel_pos("publish", "order:new", '{"order_id": "ORD-7", "items": [1, 2]}', "--room", "kitchen", env=env)
	assert (sent.returncode, sent.stdout.strip()) == (0, "published order:new to room kitchen on site default; 1 server listening"), sent.stderr
	assert js.wait_event("kds", "order:new")[0] == {"order_id": "ORD-7", "items": [1, 2]}

	to_user = excel_pos("publish", "note", '"for you"', "--user", "cook@example.com", env=env)
	assert to_user.returncode == 0, to_user.stderr
	assert js.wait_event("kds", "note")[0] == "for you"


def test_publish_refuses_bad_json_and_a_dead_redis_and_sends_nothing(redis_url, redis_server):
	env = shell_env(redis_url)
	bad = excel_pos("publish", "order:new", "{'order_id': 1}", env=env)
	assert bad.returncode == 2
	assert bad.stderr.strip().startswith("excel-pos: bad JSON message: ")
	both = excel_pos("publish", "order:new", "{}", "--room", "kitchen", "--user", "bob", env=env)
	assert (both.returncode, both.stderr.strip()) == (2, "excel-pos: --room or --user, not both")
	dead_url = f"redis://127.0.0.1:{free_port()}"
	dead = excel_pos("publish", "order:new", "{}", env={**env, "FRAPPE_REDIS_QUEUE": dead_url})
	assert dead.returncode == 1
	assert dead.stderr.strip().startswith(f"excel-pos: Redis at {dead_url} does not answer: ")
	assert redis_server.client().xlen(log.log_key("default")) == 0


# -- listen ---------------------------------------------------------------------------------


def test_listen_prints_what_the_helpers_publish_and_comes_back_after_a_crash(realtime, publish, redis_url):
	server = realtime()
	listener = Running("listen", "--room", "kitchen", "--room", "table:4", env=shell_env(redis_url, server))
	try:
		listener.wait_err("joined table:4")
		assert any("joined kitchen" in line for line in listener.err)
		publish.publish_to_room("kitchen", "order:new", {"order_id": "ORD-1"})
		publish.publish_to_room("table:4", "order:updated", {"order_id": "ORD-1", "status": "cooking"})
		publish.publish_to_room("bar", "order:new", {"order_id": "ORD-2"})  # a room it did not join
		publish.publish_event("menu:changed", {"item": "soup"})
		wait_for(lambda: len(listener.out) >= 3, 15, message=f"three events; stderr {listener.err}")

		server.signal(signal.SIGKILL)
		server.wait(10)
		listener.wait_err("connection lost; reconnecting")
		realtime(port=server.port)
		listener.wait_err("joined kitchen", count=2)
		publish.publish_to_room("kitchen", "order:new", {"order_id": "ORD-3"})
		wait_for(lambda: len(listener.out) >= 4, 15, message=f"the event after the restart; stderr {listener.err}")
	finally:
		status = listener.stop()
	assert listener.events() == [
		{"event": "order:new", "args": [{"order_id": "ORD-1"}]},
		{"event": "order:updated", "args": [{"order_id": "ORD-1", "status": "cooking"}]},
		{"event": "menu:changed", "args": [{"item": "soup"}]},
		{"event": "order:new", "args": [{"order_id": "ORD-3"}]},
	]
	assert status == 0


def test_listen_prints_a_burst_in_the_order_it_was_published(realtime, publish, redis_url):
	server = realtime()
	listener = Running("listen", "--room", "kitchen", env=shell_env(redis_url, server))
	try:
		listener.wait_err("joined kitchen")
		for n in range(100):
			publish.publish_to_room("kitchen", "order:new", {"n": n})
		wait_for(lambda: len(listener.out) >= 100, 15, message=f"a hundred events; stderr {listener.err}")
	finally:
		assert listener.stop() == 0
	assert [event["args"][0]["n"] for event in listener.events()] == list(range(100))


def test_listen_says_why_it_is_refused(realtime, redis_url):
	server = realtime()
	expired = make_token("cook@example.com", SECRET, ttl=-60)
	refused = excel_pos("listen", "--token", expired, env=shell_env(redis_url, server), timeout=30)
	assert (refused.returncode, refused.stdout) == (1, "")
	assert refused.stderr.strip().splitlines()[-1] == "excel-pos: refused: Unauthorized: token expired"


def test_listen_waits_for_a_server_that_is_not_there_yet(realtime, publish, redis_url):
	port = free_port()
	env = {**shell_env(redis_url), "EXCEL_RESTAURANT_POS_SOCKETIO_PORT": str(port)}
	listener = Running("listen", "--transport", "polling", "--room", "kitchen", env=env)
	try:
		listener.wait_err("cannot connect to http://127.0.0.1:")
		realtime(port=port)
		listener.wait_err("joined kitchen")
		assert any("over polling" in line for line in listener.err)
		publish.publish_to_room("kitchen", "order:new", {"order_id": "ORD-9"})
		wait_for(lambda: listener.out, 15, message="the event")
	finally:
		assert listener.stop(signal.SIGTERM) == 0
	assert listener.events() == [{"event": "order:new", "args": [{"order_id": "ORD-9"}]}]


# -- status ---------------------------------------------------------------------------------


def test_status_lists_every_server_and_fails_while_redis_is_down(realtime, own_redis, js):
	servers = [realtime(redis_queue=own_redis.url), realtime(redis_queue=own_redis.url)]
	js.connect("tablet", servers[1].url + APP_NS, token=make_token("cook@example.com", SECRET))
	env = {"EXCEL_RESTAURANT_POS_JWT_SECRET": SECRET, "FRAPPE_REDIS_QUEUE": own_redis.url}

	healthy = excel_pos("status", env=env)
	assert healthy.returncode == 0, healthy.stdout + healthy.stderr
	assert sorted(healthy.stdout.splitlines()) == sorted(
		f"{server.url}: ok, redis up, {clients} clients, process {server.health()[1]['process']}" for server, clients in zip(servers, (0, 1))
	)

	own_redis.stop()
	wait_for(lambda: all(server.health()[0] == 503 for server in servers), 20, message="both servers to see Redis down")
	down = excel_pos("status", env=env)
	assert down.returncode == 1
	assert down.stdout.startswith(f"redis {own_redis.url}: down")

	asked = excel_pos("status", "--url", servers[0].url, "--url", servers[1].url, env=env)
	assert asked.returncode == 1
	reports = [line for line in asked.stdout.splitlines() if not line.startswith("  ")]
	assert reports == [f"{server.url}: degraded, redis down, {clients} clients, process {server.health()[1]['process']}" for server, clients in zip(servers, (0, 1))]
	recent = [line for line in asked.stdout.splitlines() if line.startswith("  ")]
	assert any(f"ERROR redis {own_redis.url} unavailable" in line for line in recent), asked.stdout

	own_redis.start()
	wait_for(lambda: excel_pos("status", env=env).returncode == 0, 30, message="status healthy again once Redis is back")


def test_status_fails_when_no_server_answers(redis_url):
	port = free_port()
	answer = excel_pos("status", env={**shell_env(redis_url), "EXCEL_RESTAURANT_POS_SOCKETIO_PORT": str(port)})
	assert answer.returncode == 1
	assert answer.stdout.startswith(f"http://127.0.0.1:{port}: unreachable (")


# -- inside a bench ---------------------------------------------------------------------------


def test_the_app_gives_frappe_one_click_group():
	import importlib

	module = importlib.import_module("excel_restaurant_pos.commands")
	(group,) = module.commands
	assert isinstance(group, click.Group)
	assert group.name == "excel-pos"
	assert set(group.commands) == {"token", "check", "publish", "listen", "status"}


@pytest.mark.parametrize("ctx_obj", ["dict", "object"])
def test_bench_commands_use_the_sites_own_secret(site_bench, ctx_obj):
	env = {"FRAPPE_CTX": ctx_obj}
	made = bench(site_bench, "--site", "site2.local", "excel-pos", "token", "bob@example.com", env=env)
	assert made.returncode == 0, made.stderr
	assert verify_token(made.stdout.strip(), OTHER_SECRET)["user"] == "bob@example.com"
	with pytest.raises(jwt.InvalidSignatureError):
		jwt.decode(made.stdout.strip(), SECRET, algorithms=["HS256"])

	unknown = bench(site_bench, "--site", "site9.local", "excel-pos", "token", "bob", env=env)
	assert (unknown.returncode, unknown.stderr.strip()) == (2, "excel-pos: unknown site 'site9.local' (sites: nosecret.local, site1.local, site2.local)")
	no_secret = bench(site_bench, "--site", "nosecret.local", "excel-pos", "token", "bob", env=env)
	assert no_secret.returncode == 2
	assert no_secret.stderr.strip().startswith("excel-pos: no JWT secret for site 'nosecret.local'")
	every = bench(site_bench, "--site", "all", "excel-pos", "token", "bob", env=env)
	assert (every.returncode, every.stderr.strip()) == (2, "excel-pos: one site at a time, not nosecret.local, site1.local, site2.local")


def test_bench_check_asks_frappe_and_publish_needs_no_server(site_bench, frappe_standin, redis_server):
	config = site_bench / "sites" / "common_site_config.json"
	config.write_text(json.dumps({**json.loads(config.read_text()), "excel_restaurant_pos_frappe_url": frappe_standin.url}))

	token = make_token("waiter@example.com", SECRET)
	valid = bench(site_bench, "--site", "site1.local", "excel-pos", "check", token)
	assert valid.returncode == 0, valid.stderr
	assert valid.stdout.startswith("valid: waiter@example.com (System User) on site site1.local, expires ")
	assert valid.stdout.strip().endswith(f"checked by Frappe at {frappe_standin.url}")
	(call,) = frappe_standin.calls("frappe.realtime.get_user_info")
	assert call["headers"]["x-frappe-site-name"] == "site1.local"

	disabled = bench(site_bench, "--site", "site1.local", "excel-pos", "check", make_token("gone@example.com", SECRET))
	assert disabled.returncode == 1
	assert disabled.stderr.strip().startswith("excel-pos: refused: Unauthorized: ")

	sent = bench(site_bench, "--site", "site1.local", "excel-pos", "publish", "order:new", '{"order_id": "ORD-5"}', "--room", "kitchen")
	assert (sent.returncode, sent.stdout.strip()) == (0, "published order:new to room kitchen on site site1.local; 0 servers listening"), sent.stderr
	(entry,) = redis_server.client().xrange(log.log_key("site1.local"))
	assert json.loads(entry[1][b"message"]) == {"order_id": "ORD-5"}


# -- --dev ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "where"), [((), "127.0.0.1"), (("--host", "0.0.0.0"), "0.0.0.0")])
def test_dev_listens_on_loopback_unless_a_host_is_given(tmp_path, redis_url, flags, where):
	port = free_port()
	log_path = tmp_path / "dev.log"
	with open(log_path, "wb") as out:
		process = subprocess.Popen(
			[sys.executable, "-m", "excel_restaurant_pos.realtime", "--dev", "--port", str(port), "--redis-queue", redis_url, *flags],
			stdout=out,
			stderr=subprocess.STDOUT,
		)
	try:
		wait_for(lambda: "listening on " in log_path.read_text(), 20, message="the start-up line")
		assert f"listening on {where}:{port} " in log_path.read_text()
	finally:
		process.terminate()
		assert process.wait(15) == 0
