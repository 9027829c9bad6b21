"""``--dev``: a server a developer can use at once, with nothing set up beforehand.

It listens on loopback unless a host is given, fills in a development JWT secret when
none is configured, starts a local ``redis-server`` when nothing answers on the configured
Redis URL, and prints a ready token with a line of JavaScript that connects with it. Never
for production: the secret is public.
"""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import subprocess
import time
from urllib.parse import urlparse

from excel_restaurant_pos.auth import make_token
from excel_restaurant_pos.realtime.config import DEFAULTS, Config, ConfigError

DEV_SECRET = "excel-restaurant-pos-development-secret-not-for-production"
#: Where ``--dev`` listens unless a host is given: anyone who can reach it can mint tokens.
DEV_HOST = "127.0.0.1"
DEV_USER = "Administrator"


def ensure_redis(url: str) -> subprocess.Popen | None:
	"""Start ``redis-server`` for a loopback URL nobody answers on; stop it at exit."""
	import redis

	def answers() -> bool:
		try:
			return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
		except redis.RedisError:
			return False

	if answers():
		return None
	parsed = urlparse(url)
	if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
		return None  # a remote Redis is not ours to start; the bridge retries until it answers
	binary = shutil.which("redis-server")
	if binary is None:
		raise ConfigError(f"nothing answers on {url} and redis-server is not installed (apt-get install redis-server)")
	process = subprocess.Popen(
		[binary, "--port", str(parsed.port or 6379), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
		stdout=subprocess.DEVNULL,
	)
	atexit.register(process.terminate)
	deadline = time.monotonic() + 10
	while not answers():
		if time.monotonic() > deadline or process.poll() is not None:
			raise ConfigError(f"could not start redis-server on {url}")
		time.sleep(0.05)
	return process


def local_only(config: Config) -> Config:
	"""``config`` listening on :data:`DEV_HOST` unless a configuration file chose a host
	(the caller checks the flag and the environment)."""
	return dataclasses.replace(config, host=DEV_HOST) if config.host == DEFAULTS["host"] else config


def banner(config: Config) -> str:
	"""What a developer needs to try it: a token, a listening client and a publish, each a
	line to paste (with a line of JavaScript for a page or Node)."""
	site = config.default_site or config.sites[0]
	token = make_token(DEV_USER, config.jwt_secret(site) or DEV_SECRET, ttl=24 * 3600, user_type="System User")
	url = f"{config.local_url}/excel_restaurant_pos/{site}"
	command = "python -m excel_restaurant_pos.realtime"
	return (
		f"development token for {DEV_USER} on site {site!r}, valid 24 h:\n\n  {token}\n\n"
		"listen to the kitchen from another shell:\n\n"
		f"  {command} listen --room kitchen --url {url} --token {token}\n\n"
		"publish to it from a third:\n\n"
		f"  {command} publish order:new '{{\"order_id\": \"ORD-001\"}}' --room kitchen\n\n"
		"or connect from Node or a page with socket.io-client v4:\n\n"
		f'  const s = io("{url}", {{ auth: {{ token: "{token}" }} }}); '
		's.on("connect", () => s.emit("room:join", "kitchen")); s.onAny(console.log);\n'
	)
