"""``--dev``: a server a developer can use at once, with nothing set up beforehand.

It fills in a development JWT secret when none is configured, starts a local
``redis-server`` when nothing answers on the configured Redis URL, and prints a ready
token with a line of JavaScript that connects with it. Never for production: the secret
is public.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import time
from urllib.parse import urlparse

from excel_restaurant_pos.auth import make_token
from excel_restaurant_pos.realtime.config import Config, ConfigError

DEV_SECRET = "excel-restaurant-pos-development-secret-not-for-production"
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


def banner(config: Config) -> str:
	"""What a developer needs to connect: a token and a line of JavaScript."""
	site = config.default_site or config.sites[0]
	token = make_token(DEV_USER, config.jwt_secret(site) or DEV_SECRET, ttl=24 * 3600, user_type="System User")
	host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
	url = f"http://{host}:{config.port}/excel_restaurant_pos/{site}"
	return (
		f"development token for {DEV_USER} on site {site!r}, valid 24 h:\n\n  {token}\n\n"
		"connect from Node or a page with socket.io-client v4:\n\n"
		f'  const s = io("{url}", {{ auth: {{ token: "{token}" }} }}); '
		's.on("connect", () => s.emit("room:join", "kitchen")); s.onAny(console.log);\n\n'
		"publish from Python:\n\n"
		"  python -c \"from excel_restaurant_pos.realtime.utils import publish_to_room; "
		"print(publish_to_room('kitchen', 'order:new', {'order_id': 'ORD-001'}))\"\n"
	)
