"""``excel-pos``: commands for operators and developers, in a bench and in a shell.

One click group serves two entry points:

- ``bench --site SITE excel-pos …``: Frappe finds the group through its app ``commands``
  convention (the list ``commands`` of ``<app>.commands``) and passes the site it was given;
- ``python -m excel_restaurant_pos.realtime …``: the same commands, with ``--site``.

Both read the configuration the way the server does (:func:`load_config`: the bench's files
and the site's ``site_config.json`` inside a bench, environment variables outside), so a
token made here is one the server accepts. ``token``, ``check`` and ``publish`` need no
running server; ``listen`` and ``status`` talk to one. Every failure is one line on stderr
and a non-zero exit status: 1 when the answer is no (a refused token, an unhealthy server,
Redis down), 2 when the question was wrong (a bad argument, an unknown site, bad JSON).

Frappe imports this module for every ``bench`` command, so it imports only click and the
standard library at the top; each command imports what it needs.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import sys
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import click

#: The longest ``listen`` waits between two attempts to connect.
RETRY_MAX_S = 30.0
#: How long ``status`` waits for one server's answer.
HEALTH_TIMEOUT_S = 3.0
#: Who ``listen``'s own token is for, when none is given.
LISTEN_USER = "Administrator"


class Failure(click.ClickException):
	"""A command that cannot do what was asked: one line, and an exit status."""

	def __init__(self, message: str, exit_code: int = 1):
		super().__init__(message)
		self.exit_code = exit_code

	def show(self, file: Any = None) -> None:
		click.echo(f"excel-pos: {self.format_message()}", err=True)


def _load_config() -> Any:
	from excel_restaurant_pos.realtime.config import ConfigError, load_config

	try:
		return load_config()
	except ConfigError as exc:
		raise Failure(f"configuration error: {exc}", 2) from None


def _bench_sites(ctx: click.Context) -> list[str]:
	"""The sites ``bench --site`` passed down: a dict on Frappe v14/v15, an object since."""
	obj = ctx.obj  # set by Frappe's group, above ours, and handed down to every subcommand
	sites = obj.get("sites") if isinstance(obj, dict) else getattr(obj, "sites", None)
	return list(sites or [])


def _site(ctx: click.Context, config: Any, given: str | None) -> str:
	"""The site a command is about: ``--site``, else bench's site, else the default one."""
	if given is None:
		from_bench = _bench_sites(ctx)
		if len(from_bench) > 1:
			raise Failure(f"one site at a time, not {', '.join(from_bench)}", 2)
		given = from_bench[0] if from_bench else config.default_site
	if given is None:
		raise Failure(f"which site? pass --site (sites: {', '.join(config.sites) or 'none'})", 2)
	if given not in config.sites:
		raise Failure(f"unknown site {given!r} (sites: {', '.join(config.sites) or 'none'})", 2)
	return given


def _secret(config: Any, site: str) -> str:
	secret = config.jwt_secret(site)
	if not secret:
		raise Failure(
			f"no JWT secret for site {site!r}: set jwt_secret_key in its site_config.json "
			"(or common_site_config.json), or EXCEL_RESTAURANT_POS_JWT_SECRET outside a bench",
			2,
		)
	return secret


def _when(epoch: float | None) -> str:
	if epoch is None:
		return "no expiry known"
	left = epoch - time.time()
	stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
	return f"expires {stamp} (in {_duration(left)})" if left > 0 else f"expired {stamp}"


def _duration(seconds: float) -> str:
	seconds = int(seconds)
	if seconds < 120:
		return f"{seconds} s"
	if seconds < 7200:
		return f"{seconds // 60} min"
	return f"{seconds // 3600} h {seconds % 3600 // 60} min"


site_option = click.option("--site", help="the site (default: bench's --site, else the default site)")


@click.group("excel-pos", context_settings={"help_option_names": ["-h", "--help"]})
def excel_pos() -> None:
	"""Excel Restaurant POS realtime: tokens, test events, a listening client and health."""


@excel_pos.command("token")
@click.argument("user")
@click.option("--ttl", type=click.IntRange(min=1), default=3600, show_default=True, help="seconds the token is valid")
@click.option("--type", "user_type", help="the user_type claim, e.g. 'System User' (jwt mode; Frappe reads the real type)")
@site_option
@click.pass_context
def token(ctx: click.Context, user: str, ttl: int, user_type: str | None, site: str | None) -> None:
	"""Make an access token for USER with the site's secret; prints the token alone."""
	from excel_restaurant_pos.auth import make_token

	config = _load_config()
	site = _site(ctx, config, site)
	click.echo(make_token(user, _secret(config, site), ttl=ttl, user_type=user_type))
	click.echo(f"token for {user} on site {site}, {_when(time.time() + ttl)}", err=True)


@excel_pos.command("check")
@click.argument("token")
@site_option
@click.pass_context
def check(ctx: click.Context, token: str, site: str | None) -> None:
	"""Verify TOKEN exactly as the server would, and say who it is or why it is refused."""
	from excel_restaurant_pos.realtime.connect import Authenticator, Refused, token_from
	from excel_restaurant_pos.realtime.frappe_api import FrappeAPI

	config = _load_config()
	site = _site(ctx, config, site)
	authenticator = Authenticator(config, FrappeAPI(config) if config.auth_mode == "frappe" else None)
	try:
		identity = authenticator.verify(site, token_from({}, {"token": token}))
	except Refused as exc:
		raise Failure(f"refused: {exc}", 1) from None
	how = f"by Frappe at {config.frappe_url}" if config.auth_mode == "frappe" else "with the site's secret"
	click.echo(f"valid: {identity.user} ({identity.user_type}) on site {site}, {_when(identity.exp)}; checked {how}")


@excel_pos.command("publish")
@click.argument("event")
@click.argument("message", metavar="JSON")
@click.option("--room", help="send to this room only")
@click.option("--user", help="send to this user's connections only (room user:<user>)")
@site_option
@click.pass_context
def publish(ctx: click.Context, event: str, message: str, room: str | None, user: str | None, site: str | None) -> None:
	"""Publish EVENT with the JSON message through the helpers (to every client of the
	site unless --room or --user narrows it)."""
	from excel_restaurant_pos.realtime import rooms, utils

	if room and user:
		raise Failure("--room or --user, not both", 2)
	try:
		value = json.loads(message)
	except ValueError as exc:
		raise Failure(f"bad JSON message: {exc}", 2) from None
	config = _load_config()
	site = _site(ctx, config, site)
	_ping_redis(config.redis_queue)
	utils.configure(config)
	target = rooms.user_room(user) if user else room
	listening = utils.publish_event(event, value, target, site=site)
	where = f"room {target}" if target else "every client"
	click.echo(f"published {event} to {where} on site {site}; {listening} server{'s' * (listening != 1)} listening")


def _ping_redis(url: str) -> None:
	import redis

	from excel_restaurant_pos.realtime.utils import _redis_client

	try:
		_redis_client(url).ping()
	except redis.RedisError as exc:
		raise Failure(f"Redis at {url} does not answer: {exc}", 1) from None


@excel_pos.command("listen")
@click.option("--room", "rooms_", multiple=True, metavar="ROOM", help="join this room (repeatable)")
@click.option("--url", help="the namespace URL (default: this machine's server and the site's namespace)")
@click.option("--token", help="a Bearer token (default: one made for --user with the site's secret)")
@click.option("--user", default=LISTEN_USER, show_default=True, help="who the made token is for")
@click.option("--transport", type=click.Choice(["websocket", "polling"]), default="websocket", show_default=True)
@click.option("--path", default="socket.io", show_default=True, help="the Socket.IO path behind a proxy")
@site_option
@click.pass_context
def listen(ctx: click.Context, rooms_: tuple[str, ...], url: str | None, token: str | None, user: str, transport: str, path: str, site: str | None) -> None:
	"""Connect as a client and print each event as one JSON line until interrupted.

	Reconnects when the connection drops; stops with the reason when the token is refused."""
	config = _load_config()
	site = _site(ctx, config, site)
	if url is None:
		if config.uds:
			raise Failure(f"the server listens on unix:{config.uds}; pass --url", 2)
		url = f"{config.local_url}/excel_restaurant_pos/{site}"
	if token is None:
		from excel_restaurant_pos.auth import make_token

		token = make_token(user, _secret(config, site), ttl=24 * 3600, user_type="System User")
	Listener(url, token, rooms_, transport, path).run()


def in_order(client: Any) -> Any:
	"""python-socketio's client with its events handled in the order they arrive. Its
	Engine.IO client hands every message to a new thread, so two events that arrive close
	together can be printed the other way round. (Without that private method, as in another
	release, the client keeps its own way.)"""
	trigger = getattr(client.eio, "_trigger_event", None)
	if trigger is not None:

		def trigger_in_order(event: str, *args: Any, **kwargs: Any) -> Any:
			if event == "message":
				kwargs["run_async"] = False
			return trigger(event, *args, **kwargs)

		client.eio._trigger_event = trigger_in_order
	return client


class Listener:
	"""A python-socketio client that prints events, joins its rooms at every connect, and
	reconnects with backoff; its own loop, so that a refusal ends it with the reason."""

	def __init__(self, url: str, token: str, rooms: tuple[str, ...], transport: str, path: str):
		parts = urlsplit(url)
		if parts.scheme not in ("http", "https") or not parts.netloc:
			raise Failure(f"bad --url {url!r}: expected http(s)://host:port/namespace", 2)
		self.base = f"{parts.scheme}://{parts.netloc}"
		self.namespace = parts.path.rstrip("/") or "/"
		self.url, self.token, self.rooms, self.transport, self.path = url, token, rooms, transport, path
		self.stop = threading.Event()
		self.client: Any = None

	def run(self) -> None:
		signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
		try:
			self._loop()
		except KeyboardInterrupt:
			pass
		finally:
			if self.client is not None:
				self.client.disconnect()

	def _loop(self) -> None:
		import socketio

		delay = 1.0
		while not self.stop.is_set():
			client, refusals = self._client(socketio)
			self.client = client
			try:
				client.connect(
					self.base,
					namespaces=[self.namespace],
					headers={"Authorization": f"Bearer {self.token}"},
					transports=[self.transport],
					socketio_path=self.path,
					wait_timeout=10,
				)
			except socketio.exceptions.ConnectionError as exc:
				if refusals:
					raise Failure(f"refused: {refusals[0]}", 1) from None
				click.echo(f"cannot connect to {self.url}: {exc}; retrying in {delay:.0f} s", err=True)
				self.stop.wait(delay)
				delay = min(delay * 2, RETRY_MAX_S)
				continue
			delay = 1.0
			while client.connected and not self.stop.wait(0.2):
				pass
			client.disconnect()
			if not self.stop.is_set():
				click.echo("connection lost; reconnecting", err=True)

	def _client(self, socketio: Any) -> tuple[Any, list[str]]:
		client = in_order(socketio.Client(reconnection=False))
		refusals: list[str] = []
		namespace = self.namespace

		def connected() -> None:
			click.echo(f"connected to {self.url} over {self.transport}", err=True)
			for room in self.rooms:
				client.emit("room:join", room, namespace=namespace)

		def refused(data: Any = None) -> None:
			# The server's refusal is a CONNECT_ERROR packet: {"message": …}. A transport that
			# could not connect is reported here too, as a bare string: that one is retried.
			if isinstance(data, dict):
				refusals.append(str(data.get("message", data)))

		def room_answer(answer: Any = None) -> None:
			room = answer.get("room") if isinstance(answer, dict) else answer
			error = answer.get("message") if isinstance(answer, dict) else None
			click.echo(f"room {room}: {error}" if error else f"joined {room}", err=True)

		def event(name: str, *args: Any) -> None:
			click.echo(json.dumps({"event": name, "args": list(args)}, separators=(",", ":")))

		client.on("connect", connected, namespace=namespace)
		client.on("connect_error", refused, namespace=namespace)
		client.on("room:joined", room_answer, namespace=namespace)
		client.on("room:error", room_answer, namespace=namespace)
		client.on("*", event, namespace=namespace)
		return client, refusals


@excel_pos.command("status")
@click.option("--url", "urls", multiple=True, metavar="URL", help="ask this server (repeatable; default: every server on the configured Redis)")
def status(urls: tuple[str, ...]) -> None:
	"""Each running server's health, clients and recent errors; exits 1 when one is unhealthy."""
	config = None if urls else _load_config()
	problems = 0
	targets = list(urls)
	if config is not None:
		import redis

		from excel_restaurant_pos.realtime.presence import running_servers
		from excel_restaurant_pos.realtime.utils import _redis_client

		try:
			targets = [_reachable(record) for record in running_servers(_redis_client(config.redis_queue))]
		except redis.RedisError as exc:
			click.echo(f"redis {config.redis_queue}: down ({exc})")
			problems += 1
		targets = [url for url in targets if url] or [config.local_url]
	for url in targets:
		problems += not _report(url)
	if problems:
		sys.exit(1)


def _reachable(record: dict[str, Any]) -> str | None:
	"""Where to ask a server from here: its own loopback URL is another host's name when it
	runs elsewhere."""
	url = record.get("url")
	if not isinstance(url, str):
		return None
	host = record.get("host")
	parts = urlsplit(url)
	if host and host != socket.gethostname() and parts.hostname in ("127.0.0.1", "::1"):
		return f"{parts.scheme}://{host}:{parts.port}"
	return url


def _report(url: str) -> bool:
	"""Print one server's health; ``True`` when it is healthy."""
	try:
		code, body = _get_health(url)
	except (OSError, ValueError) as exc:
		click.echo(f"{url}: unreachable ({exc})")
		return False
	line = f"{url}: {body.get('status', code)}, redis {body.get('redis', '?')}, {body.get('clients', '?')} clients"
	click.echo(line + (f", process {body['process']}" if body.get("process") else ""))
	for error in body.get("errors") or []:
		click.echo(f"  {error.get('time')} {error.get('level')} {error.get('message')}")
	return code == 200


def _get_health(url: str) -> tuple[int, dict[str, Any]]:
	"""``GET /health`` of a server at ``http(s)://…`` or ``unix:<path>``."""
	if url.startswith("unix:"):
		connection: http.client.HTTPConnection = _UnixConnection(url[len("unix:") :])
		prefix = ""
	else:
		parts = urlsplit(url)
		kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
		connection = kind(parts.hostname, parts.port, timeout=HEALTH_TIMEOUT_S)
		prefix = parts.path.rstrip("/")
	try:
		connection.request("GET", prefix + "/health")
		response = connection.getresponse()
		body = json.loads(response.read() or b"{}")
	finally:
		connection.close()
	return response.status, body if isinstance(body, dict) else {}


class _UnixConnection(http.client.HTTPConnection):
	"""An HTTP connection to a server that listens on a unix socket."""

	def __init__(self, path: str):
		super().__init__("localhost", timeout=HEALTH_TIMEOUT_S)
		self.path = path

	def connect(self) -> None:
		self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
		self.sock.settimeout(self.timeout)
		self.sock.connect(self.path)


def run_standalone(argv: list[str]) -> int:
	"""``python -m excel_restaurant_pos.realtime COMMAND …``."""
	try:
		excel_pos.main(argv, prog_name="python -m excel_restaurant_pos.realtime", standalone_mode=True)
	except SystemExit as exc:
		return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
	return 0


#: Frappe's app commands convention: ``bench excel-pos …``.
commands = [excel_pos]
