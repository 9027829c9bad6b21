"""Real processes for the tests: Redis, the realtime server, a Frappe API stand-in and the
official JavaScript client. Every wait is for a condition with a deadline."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import redis
import websocket

from excel_restaurant_pos.auth import TokenError, bearer_token, verify_token

REPO = Path(__file__).resolve().parent.parent
#: The one server setting a test run may choose for every server it starts (``pytest
#: --async-mode gevent``): everything else a test sets itself.
ASYNC_MODE_ENV = "EXCEL_RESTAURANT_POS_SOCKETIO_ASYNC_MODE"


def free_port() -> int:
	with socket.socket() as sock:
		sock.bind(("127.0.0.1", 0))
		return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, message: str = "condition") -> Any:
	"""Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
	deadline = time.monotonic() + timeout
	while True:
		value = condition()
		if value:
			return value
		if time.monotonic() > deadline:
			raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
		time.sleep(interval)


#: A traceback as Python prints it: its header is a line of its own. A client's string inside
#: a log line (a namespace, a room) is not one, even when it reads "Traceback".
TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$", re.MULTILINE)


def assert_no_traceback(text: str) -> None:
	"""Fail with the text from the first traceback Python printed into ``text`` (a log, stderr)."""
	found = TRACEBACK.search(text)
	assert found is None, text[found.start() :] if found else ""


def raw_connect(port: int, namespace: str, auth: Any, **options: Any) -> tuple[websocket.WebSocket, dict]:
	"""A hand-made Socket.IO connect over a websocket (``options`` go to
	``websocket.create_connection``): the socket, and the CONNECT reply's data as sent."""
	ws = websocket.create_connection(f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", timeout=10, **options)
	assert ws.recv().startswith("0{")  # Engine.IO open
	ws.send(f"40{namespace}," + json.dumps(auth))
	reply = ws.recv()
	assert reply.startswith(f"40{namespace},"), reply
	return ws, json.loads(reply[len(f"40{namespace},") :])


def make_bench(
	root: Path,
	common: dict[str, Any] | None = None,
	sites: dict[str, dict[str, Any]] | None = None,
	bench_config: dict[str, Any] | None = None,
) -> Path:
	"""A folder Frappe would call a bench: ``sites/common_site_config.json`` and site folders."""
	(root / "sites").mkdir(parents=True, exist_ok=True)
	(root / "sites" / "common_site_config.json").write_text(json.dumps(common or {}))
	for site, site_config in (sites or {}).items():
		(root / "sites" / site).mkdir()
		(root / "sites" / site / "site_config.json").write_text(json.dumps(site_config))
	if bench_config is not None:
		(root / "config.json").write_text(json.dumps(bench_config))
	return root


class RedisServer:
	"""``redis-server`` on a free loopback port, in memory only."""

	def __init__(self, folder: Path, port: int | None = None):
		self.folder = Path(folder)
		self.port = port or free_port()
		self.process: subprocess.Popen | None = None

	@property
	def url(self) -> str:
		return f"redis://127.0.0.1:{self.port}"

	def client(self) -> redis.Redis:
		return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=5)

	def start(self) -> None:
		self.folder.mkdir(parents=True, exist_ok=True)
		binary = shutil.which("redis-server") or "/usr/bin/redis-server"
		self.process = subprocess.Popen(
			[binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(self.folder)],
			stdout=subprocess.DEVNULL,
			stderr=subprocess.DEVNULL,
		)
		wait_for(self._answers, 10, message=f"redis on port {self.port}")

	def _answers(self) -> bool:
		try:
			return bool(self.client().ping())
		except redis.RedisError:
			return False

	def stop(self) -> None:
		if self.process and self.process.poll() is None:
			self.process.kill()
			self.process.wait(10)
		self.process = None


class RealtimeProcess:
	"""``python -m excel_restaurant_pos.realtime`` as a subprocess on a free port."""

	def __init__(self, folder: Path, flags: dict[str, Any], env: dict[str, str], setup: str = ""):
		self.folder = Path(folder)
		#: Python the server's process runs before the server (a test shortening a constant).
		self.setup = setup
		self.port = int(flags.pop("port", 0)) or free_port()
		self.flags = flags
		self.env = env
		self.process: subprocess.Popen | None = None
		self.log_path = self.folder / f"realtime-{self.port}.log"

	@property
	def url(self) -> str:
		return f"http://127.0.0.1:{self.port}"

	def command(self) -> list[str]:
		run = ["-m", "excel_restaurant_pos.realtime"]
		if self.setup:
			run = ["-c", f"{self.setup}\nimport runpy\nrunpy.run_module('excel_restaurant_pos.realtime', run_name='__main__', alter_sys=True)"]
		args = [sys.executable, *run, "--port", str(self.port), "--host", "127.0.0.1"]
		for name, value in self.flags.items():
			args += ["--" + name.replace("_", "-"), str(value)]
		return args

	def start(self, wait_healthy: bool = True) -> None:
		env = {key: value for key, value in os.environ.items() if not key.startswith("EXCEL_RESTAURANT_POS_") or key == ASYNC_MODE_ENV}
		env.update(self.env)
		env["PYTHONUNBUFFERED"] = "1"
		self.folder.mkdir(parents=True, exist_ok=True)
		self._log = open(self.log_path, "ab")
		self.process = subprocess.Popen(self.command(), cwd=self.folder, env=env, stdout=self._log, stderr=subprocess.STDOUT)
		try:
			if wait_healthy:
				wait_for(lambda: self.health()[0] == 200 or self.process.poll() is not None, 15, message="a healthy server")
			else:
				wait_for(lambda: self.health()[0] is not None or self.process.poll() is not None, 15, message="a listening server")
		except AssertionError as exc:
			raise AssertionError(f"{exc}; server log:\n{self.log()}") from None
		if self.process.poll() is not None:
			raise AssertionError(f"server exited with {self.process.returncode}; log:\n{self.log()}")

	def health(self) -> tuple[int | None, dict | None]:
		try:
			with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
				return response.status, json.loads(response.read())
		except urllib.error.HTTPError as exc:
			return exc.code, json.loads(exc.read() or b"null")
		except OSError:
			return None, None

	def metrics(self) -> str:
		with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
			return response.read().decode()

	def metric(self, name: str, **labels: str) -> float:
		"""The value of one sample on ``/metrics`` (0 when absent)."""
		wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
		for line in self.metrics().splitlines():
			if line.startswith("#"):
				continue
			key, _, value = line.rpartition(" ")
			metric, _, label_text = key.partition("{")
			found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
			if metric == name and found == wanted:
				return float(value)
		return 0.0

	def rss_bytes(self) -> int:
		"""The server's resident memory, from /proc."""
		assert self.process is not None
		for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
			if line.startswith("VmRSS:"):
				return int(line.split()[1]) * 1024
		raise AssertionError("no VmRSS")

	def log(self) -> str:
		return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

	def signal(self, signum: int = signal.SIGTERM) -> None:
		assert self.process is not None
		self.process.send_signal(signum)

	def wait(self, timeout: float) -> int:
		assert self.process is not None
		return self.process.wait(timeout)

	def kill(self) -> None:
		if self.process and self.process.poll() is None:
			self.process.kill()
			self.process.wait(10)
		if self.process:
			self._log.close()


class TcpProxy:
	"""A loopback TCP proxy in front of a server, whose connections a test can kill with a
	reset, as a Wi-Fi drop or a NAT timeout does: neither end says goodbye."""

	def __init__(self, target_port: int):
		self.target_port = target_port
		self.listener = socket.create_server(("127.0.0.1", 0))
		self.port = self.listener.getsockname()[1]
		self.connections: set[socket.socket] = set()
		self.refusing = False
		self._lock = threading.Lock()
		threading.Thread(target=self._accept, daemon=True).start()

	@property
	def url(self) -> str:
		return f"http://127.0.0.1:{self.port}"

	def _accept(self) -> None:
		while True:
			try:
				client, _ = self.listener.accept()
			except OSError:
				return
			try:
				upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
			except OSError:
				_reset(client)
				continue
			upstream.settimeout(None)  # the 5 s bound the connect only: a long-poll is quiet for longer
			with self._lock:  # a kill() from here on sees this pair
				if self.refusing:
					_reset(client)
					upstream.close()
					continue
				self.connections.update((client, upstream))
			for source, sink in ((client, upstream), (upstream, client)):
				threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

	def _pump(self, source: socket.socket, sink: socket.socket) -> None:
		try:
			while data := source.recv(65536):
				sink.sendall(data)
			with self._lock:
				if source in self.connections:  # an orderly end, not a kill: pass it on
					sink.shutdown(socket.SHUT_WR)
		except OSError:
			pass

	def kill(self) -> int:
		"""Reset every open connection; returns how many there were."""
		with self._lock:
			connections, self.connections = self.connections, set()
		for connection in connections:
			try:  # wakes the pump blocked on it, which a bare close would not
				connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
				connection.shutdown(socket.SHUT_RD)
			except OSError:
				pass
		for connection in connections:
			_reset(connection)
		return len(connections) // 2

	def close(self) -> None:
		self.listener.close()
		self.kill()


def _reset(connection: socket.socket) -> None:
	"""Close with a TCP reset instead of a FIN."""
	try:
		connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
		connection.close()
	except OSError:
		pass


class Nginx:
	"""Debian's nginx on a loopback port, in front of the given server ports with the
	README's own ``upstream`` and ``location`` block (only the ports changed)."""

	def __init__(self, folder: Path, upstream_ports: list[int]):
		self.folder = Path(folder)
		self.port = free_port()
		self.upstream_ports = upstream_ports
		self.process: subprocess.Popen | None = None

	@property
	def url(self) -> str:
		return f"http://127.0.0.1:{self.port}"

	def readme_block(self) -> str:
		"""The README's nginx block that has the ``upstream``, with this test's ports."""
		text = (REPO / "README.md").read_text()
		block = next(part.split("```", 1)[0] for part in text.split("```nginx\n")[1:] if "upstream " in part.split("```", 1)[0])
		servers = [line for line in block.splitlines() if line.strip().startswith("server 127.0.0.1:")]
		options = servers[0].strip().removesuffix(";").split(" ", 2)[2:]  # what follows the address
		lines = [line for line in block.splitlines() if line not in servers]
		at = next(index for index, line in enumerate(lines) if line.strip() == "ip_hash;") + 1
		lines[at:at] = [" ".join([f"\tserver 127.0.0.1:{port}", *options]) + ";" for port in self.upstream_ports]
		return "\n".join(lines).replace("# … the site's own server block …", f"listen 127.0.0.1:{self.port};")

	def start(self) -> None:
		self.folder.mkdir(parents=True, exist_ok=True)
		folder = self.folder
		(folder / "nginx.conf").write_text(
			f"user root;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log warn;\n"
			"events { worker_connections 4096; }\n"
			f"http {{\naccess_log off;\nclient_body_temp_path {folder}/body;\nproxy_temp_path {folder}/proxy;\n"
			f"fastcgi_temp_path {folder}/fastcgi;\nuwsgi_temp_path {folder}/uwsgi;\nscgi_temp_path {folder}/scgi;\n"
			f"{self.readme_block()}\n}}\n"
		)
		binary = shutil.which("nginx") or "/usr/sbin/nginx"
		with open(folder / "stderr.log", "ab") as stderr:
			self.process = subprocess.Popen([binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr)
		wait_for(self._answers, 10, message=f"nginx on port {self.port}")

	def _answers(self) -> bool:
		if self.process is not None and self.process.poll() is not None:
			raise AssertionError(f"nginx exited: {(self.folder / 'stderr.log').read_text(errors='replace')}")
		try:
			with socket.create_connection(("127.0.0.1", self.port), timeout=1):
				return True
		except OSError:
			return False

	def stop(self) -> None:
		if self.process and self.process.poll() is None:
			self.process.terminate()
			self.process.wait(10)


class FrappeStandIn:
	"""A small HTTP server speaking the part of Frappe's API the realtime server uses.

	It authenticates exactly as Frappe does with our ``auth_hooks`` installed: the Bearer
	token is checked by :func:`excel_restaurant_pos.auth.verify_token` with the secret of the
	site named by ``Host``; the user must exist and be enabled. Permission methods answer
	from ``permissions``; ``has_permission`` exists only when ``newest`` is set (v14/v15
	answer 417 "Failed to get method" for it, as they do).
	"""

	def __init__(self, secrets: dict[str, str]):
		self.secrets = secrets
		self.users: dict[str, dict[str, Any]] = {
			"Administrator": {"enabled": 1, "user_type": "System User"},
			"waiter@example.com": {"enabled": 1, "user_type": "System User"},
			"cook@example.com": {"enabled": 1, "user_type": "System User"},
			"guest@example.com": {"enabled": 1, "user_type": "Website User"},
			"gone@example.com": {"enabled": 0, "user_type": "System User"},
		}
		#: (user, doctype, docname or None) the stand-in grants read on.
		self.permissions: set[tuple[str, str, str | None]] = set()
		self.newest = False
		self.socket_secret: str | None = None
		self.delay = 0.0
		self.garbage = False
		self.requests: list[dict[str, Any]] = []
		self.port = free_port()
		self.httpd: ThreadingHTTPServer | None = None

	@property
	def url(self) -> str:
		return f"http://127.0.0.1:{self.port}"

	def start(self) -> None:
		standin = self

		class Handler(BaseHTTPRequestHandler):
			def do_GET(self):  # noqa: N802 -- http.server's naming
				standin._handle(self)

			def log_message(self, *args):
				pass

		self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
		self.httpd.daemon_threads = True
		threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

	def stop(self) -> None:
		if self.httpd:
			self.httpd.shutdown()
			self.httpd.server_close()
			self.httpd = None

	def calls(self, method: str) -> list[dict[str, Any]]:
		return [request for request in self.requests if request["method"] == method]

	def _handle(self, handler: BaseHTTPRequestHandler) -> None:
		url = urlparse(handler.path)
		method = url.path.removeprefix("/api/method/")
		params = {key: values[0] for key, values in parse_qs(url.query).items()}
		headers = {key.lower(): value for key, value in handler.headers.items()}
		self.requests.append({"method": method, "params": params, "headers": headers})
		if self.delay:
			time.sleep(self.delay)
		if self.garbage:
			return self._send(handler, 200, b"<html>502 Bad Gateway</html>", "text/html")
		site = headers.get("x-frappe-site-name") or headers.get("host", "").split(":")[0]
		user, error = self._authenticate(site, headers.get("authorization"))
		if error:
			return self._json(handler, 401, {"exc_type": "AuthenticationError", "exception": f"frappe.exceptions.AuthenticationError: {error}"})
		if method == "frappe.realtime.get_user_info":
			if self.socket_secret and headers.get("x-frappe-socket-secret") != self.socket_secret:
				return self._json(handler, 200, {"message": {}})
			info = {"user": user, "user_type": self.users[user]["user_type"] if user != "Guest" else "Website User"}
			if self.newest:
				info["installed_apps"] = ["frappe", "excel_restaurant_pos"]
			return self._json(handler, 200, {"message": info})
		if method == "frappe.realtime.has_permission" and self.newest:
			return self._permission(handler, user, params.get("doctype"), params.get("name") or None)
		if method == "frappe.realtime.can_subscribe_doc" and not self.newest:
			return self._permission(handler, user, params.get("doctype"), params.get("docname"))
		if method == "frappe.realtime.can_subscribe_doctype" and not self.newest:
			return self._permission(handler, user, params.get("doctype"), None)
		return self._json(handler, 417, {"exc_type": "ValidationError", "exception": f"frappe.exceptions.ValidationError: Failed to get method for command {method} with No module named {method}"})

	def _authenticate(self, site: str, header: str | None) -> tuple[str, str | None]:
		token = bearer_token(header)
		if not token:
			return "Guest", None
		try:
			claims = verify_token(token, self.secrets.get(site))
		except TokenError as exc:
			return "Guest", str(exc)
		user = self.users.get(claims["user"])
		if not user or not user["enabled"]:
			return "Guest", f"user {claims['user']!r} is unknown or disabled"
		return claims["user"], None

	def _permission(self, handler, user: str, doctype: str | None, docname: str | None) -> None:
		if (user, doctype, docname) in self.permissions or (user, doctype, None) in self.permissions:
			return self._json(handler, 200, {"message": True})
		return self._json(handler, 403, {"exc_type": "PermissionError", "exception": "frappe.exceptions.PermissionError"})

	def _json(self, handler, code: int, body: dict) -> None:
		self._send(handler, code, json.dumps(body).encode(), "application/json")

	def _send(self, handler, code: int, body: bytes, content_type: str) -> None:
		try:
			handler.send_response(code)
			handler.send_header("Content-Type", content_type)
			handler.send_header("Content-Length", str(len(body)))
			handler.end_headers()
			handler.wfile.write(body)
		except OSError:
			pass


class JSClients:
	"""One Node process running ``tests/js/client.mjs``; many sockets inside it.

	Commands go in as JSON lines; every socket event comes back as a JSON line and is kept
	in ``events`` for the test to wait on.
	"""

	def __init__(self, folder: Path):
		if not (folder / "node_modules" / "socket.io-client").is_dir():
			raise RuntimeError(f"run 'npm ci --prefix {folder}' first (the test command does)")
		self.process = subprocess.Popen(
			["node", str(folder / "client.mjs")],
			stdin=subprocess.PIPE,
			stdout=subprocess.PIPE,
			stderr=subprocess.PIPE,
			text=True,
			bufsize=1,
		)
		self.events: list[dict[str, Any]] = []
		self._seq = 0
		self._lock = threading.Condition()
		self._reader = threading.Thread(target=self._read, daemon=True)
		self._reader.start()

	def _read(self) -> None:
		assert self.process.stdout is not None
		for line in self.process.stdout:
			try:
				item = json.loads(line)
			except ValueError:
				continue
			with self._lock:
				self.events.append(item)
				self._lock.notify_all()

	def send(self, **command: Any) -> int:
		self._seq += 1
		command["seq"] = self._seq
		assert self.process.stdin is not None
		self.process.stdin.write(json.dumps(command) + "\n")
		self.process.stdin.flush()
		return self._seq

	def wait(self, predicate: Callable[[dict], bool], timeout: float = 10.0, what: str = "event") -> dict:
		deadline = time.monotonic() + timeout
		index = 0
		with self._lock:
			while True:
				while index < len(self.events):  # each event is looked at once per wait
					if predicate(self.events[index]):
						return self.events[index]
					index += 1
				remaining = deadline - time.monotonic()
				if remaining <= 0:
					tail = self.events[-10:]
					raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last events: {tail}")
				self._lock.wait(remaining)

	def received(self, client: str, event: str) -> list[list[Any]]:
		with self._lock:
			return [item["args"] for item in self.events if item.get("id") == client and item.get("type") == "event" and item.get("event") == event]

	def connect(
		self,
		client: str,
		url: str,
		*,
		token: str | None = None,
		via: str = "header",
		transport: str = "websocket",
		headers: dict[str, str] | None = None,
		auth: dict | None = None,
		expect: str = "connect",
		timeout: float = 10.0,
		**options: Any,
	) -> dict:
		"""Open a socket; wait for ``connect`` (or ``connect_error`` when ``expect`` says so)."""
		headers = dict(headers or {})
		if token is not None and via == "header":
			headers["Authorization"] = f"Bearer {token}"
		if token is not None and via == "auth":
			auth = {"token": token}
		opts = {"transports": [transport], "extraHeaders": headers, "reconnection": False, "forceNew": True, **options}
		if auth is not None:
			opts["auth"] = auth
		self.send(cmd="connect", id=client, url=url, opts=opts)
		return self.wait(lambda item: item.get("id") == client and item.get("type") in ("connect", "connect_error"), timeout, f"{client} to connect")

	def emit(self, client: str, event: str, *args: Any, timeout: float = 10.0) -> list[Any]:
		"""Emit with an acknowledgement callback and return the ack's arguments."""
		seq = self.send(cmd="emit", id=client, event=event, args=list(args), ack=True)
		return self.wait(lambda item: item.get("type") == "ack" and item.get("seq") == seq, timeout, f"ack of {event}")["args"]

	def emit_no_ack(self, client: str, event: str, *args: Any) -> None:
		self.send(cmd="emit", id=client, event=event, args=list(args), ack=False)

	def wait_event(self, client: str, event: str, timeout: float = 10.0, where: Callable[[list], bool] | None = None) -> list[Any]:
		item = self.wait(
			lambda item: item.get("id") == client and item.get("type") == "event" and item.get("event") == event and (where is None or where(item["args"])),
			timeout,
			f"{event} at {client}",
		)
		return item["args"]

	def disconnect(self, client: str) -> None:
		self.send(cmd="disconnect", id=client)

	def close(self) -> None:
		if self.process.poll() is None:
			try:
				self.send(cmd="exit")
				self.process.wait(5)
			except (OSError, subprocess.TimeoutExpired, ValueError):
				self.process.kill()
				self.process.wait(5)
		self._reader.join(5)  # it stops at the end of the output; then its pipe can close
		for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
			try:
				pipe.close()
			except OSError:
				pass
