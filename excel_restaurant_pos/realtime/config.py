"""The one configuration object of the realtime server and the publish helpers.

Configuration is read once, by :func:`load_config`, into an immutable :class:`Config`;
everything else takes that object. The sources, lowest precedence first:

1. built-in defaults (the *standalone* defaults when no bench is found),
2. the bench's ``config.json``, then ``sites/common_site_config.json``,
3. environment variables,
4. command-line flags (passed in as ``overrides``).

A site's own ``sites/<site>/site_config.json`` overrides the per-site keys
(``jwt_secret_key``) for that site only, as Frappe does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

APP_NAME = "excel_restaurant_pos"
AUTH_MODES = ("frappe", "jwt")
#: The green-thread libraries the server runs on (see :mod:`~excel_restaurant_pos.realtime.backend`).
ASYNC_MODES = ("eventlet", "gevent")


class ConfigError(Exception):
	"""A configuration value or file that the server cannot start with.

	The message is one line that names the file or key, fit to print as it is.
	"""


def _as_int(value: Any) -> int:
	if isinstance(value, bool):
		raise ValueError("expected a whole number")
	return int(value)


def _as_float(value: Any) -> float:
	if isinstance(value, bool):
		raise ValueError("expected a number")
	return float(value)


def _as_list(value: Any) -> tuple[str, ...]:
	"""Accept a JSON list or a comma-separated string (the form env variables take)."""
	if isinstance(value, str):
		items = value.split(",")
	elif isinstance(value, (list, tuple)):
		items = value
	else:
		raise ValueError("expected a list or a comma-separated string")
	return tuple(str(item).strip() for item in items if str(item).strip())


def _as_origins(value: Any) -> tuple[str, ...] | None:
	"""``None`` (or ``*``) allows every origin; anything else is the allow-list."""
	if value is None:
		return None
	items = _as_list(value)
	return None if not items or "*" in items else items


def _as_redis_url(value: Any) -> str:
	url = str(value).strip()
	parsed = urlparse(url)
	if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
		raise ValueError("expected a URL such as redis://127.0.0.1:6379")
	try:
		parsed.port  # noqa: B018 -- raises ValueError on a malformed port
	except ValueError as exc:
		raise ValueError(f"bad port ({exc})") from None
	return url


def _as_optional_redis_url(value: Any) -> str | None:
	return None if value in (None, "") else _as_redis_url(value)


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
	def parse(value: Any) -> str:
		choice = str(value).strip().lower()
		if choice not in choices:
			raise ValueError(f"expected one of {', '.join(choices)}")
		return choice

	return parse


def _as_bool(value: Any) -> bool:
	if isinstance(value, bool):
		return value
	text = str(value).strip().lower()
	if text in ("1", "true", "yes", "on"):
		return True
	if text in ("0", "false", "no", "off", ""):
		return False
	raise ValueError("expected true or false")


def _as_optional_str(value: Any) -> str | None:
	return None if value in (None, "") else str(value)


@dataclasses.dataclass(frozen=True)
class Setting:
	"""One configuration key: where it is read from and how it is parsed."""

	field: str
	key: str | None
	env: str | None
	parse: Callable[[Any], Any]
	help: str


def _limit(name: str, parse: Callable[[Any], Any], help: str) -> Setting:
	"""The SPEC §12 rule: ``excel_restaurant_pos_socketio_<name>`` / ``EXCEL_…_<NAME>``."""
	key = f"{APP_NAME}_socketio_{name}"
	return Setting(name, key, key.upper(), parse, help)


SETTINGS: tuple[Setting, ...] = (
	Setting("port", f"{APP_NAME}_socketio_port", "EXCEL_RESTAURANT_POS_SOCKETIO_PORT", _as_int, "listen port"),
	Setting("host", f"{APP_NAME}_socketio_host", "EXCEL_RESTAURANT_POS_SOCKETIO_HOST", str, "listen address"),
	Setting("uds", f"{APP_NAME}_socketio_uds", None, _as_optional_str, "listen on this unix socket instead"),
	Setting("redis_queue", "redis_queue", "FRAPPE_REDIS_QUEUE", _as_redis_url, "Redis of the app channel and Frappe v15+ events"),
	Setting("redis_socketio", "redis_socketio", None, _as_optional_redis_url, "Redis of Frappe v14 events"),
	Setting("webserver_port", "webserver_port", None, _as_int, "Frappe web server port"),
	Setting("frappe_url", f"{APP_NAME}_frappe_url", None, _as_optional_str, "base URL for calls to Frappe"),
	Setting("default_site", "default_site", "FRAPPE_SITE", _as_optional_str, "the site behind /excel_restaurant_pos/default"),
	Setting("jwt_secret_key", "jwt_secret_key", "EXCEL_RESTAURANT_POS_JWT_SECRET", _as_optional_str, "HS256 secret"),
	Setting("auth_mode", f"{APP_NAME}_socketio_auth", None, _one_of(AUTH_MODES), "token verification: frappe or jwt"),
	_limit("async_mode", _one_of(ASYNC_MODES), "green threads: eventlet (default) or gevent"),
	Setting("allowed_origins", f"{APP_NAME}_socketio_allowed_origins", "EXCEL_RESTAURANT_POS_ALLOWED_ORIGINS", _as_origins, "origins allowed when a browser sends one"),
	Setting("public_rooms", f"{APP_NAME}_socketio_public_rooms", "EXCEL_RESTAURANT_POS_PUBLIC_ROOMS", _as_list, "glob patterns Website Users may join"),
	Setting("sites", None, "EXCEL_RESTAURANT_POS_SITES", _as_list, "standalone sites"),
	_limit("max_payload", _as_int, "largest client message in bytes"),
	_limit("max_unsent_bytes", _as_int, "unsent bytes the process may hold, each broadcast counted once, before clients are cut"),
	_limit("slow_client_seconds", _as_float, "how long a client with data waiting may take nothing before it is cut"),
	_limit("rooms_per_socket", _as_int, "rooms a client may join itself"),
	_limit("events_per_second", _as_float, "client events per second per socket"),
	_limit("connections_per_user", _as_int, "connections per user and site"),
	_limit("expiry_warning", _as_float, "seconds before exp that auth:expired is sent"),
	_limit("expiry_grace", _as_float, "seconds after exp before the socket is cut off"),
	_limit("auth_cache_seconds", _as_float, "how long a verified token is remembered"),
	_limit("frappe_timeout", _as_float, "seconds a call to Frappe may take"),
	_limit("shutdown_grace", _as_float, "seconds a shutdown may take"),
	_limit("ping_interval", _as_float, "seconds between Engine.IO pings"),
	_limit("ping_timeout", _as_float, "seconds to wait for a pong before closing"),
	_limit("websocket_compression", _as_bool, "accept permessage-deflate"),
	_limit("max_connections", _as_int, "concurrent HTTP/websocket connections"),
	_limit("http_timeout", _as_float, "seconds an HTTP connection may stay silent before a request is complete"),
	_limit("recovery_window", _as_float, "seconds a disconnected client may take to recover its session (0: recovery off)"),
	_limit("recovery_max_events", _as_int, "events kept in each site's log"),
	_limit("log_level", str, "logging level"),
)

#: Defaults shared by both modes; the mode-specific ones are filled in by the loader.
DEFAULTS: dict[str, Any] = {
	"port": 9001,
	"host": "0.0.0.0",
	"uds": None,
	"redis_queue": "redis://127.0.0.1:6379",
	"redis_socketio": None,
	"webserver_port": 8000,
	"frappe_url": None,
	"default_site": None,
	"jwt_secret_key": None,
	"allowed_origins": None,
	"public_rooms": (),
	"sites": ("default",),
	"max_payload": 1_000_000,
	"max_unsent_bytes": 128 << 20,
	"slow_client_seconds": 3.0,
	"rooms_per_socket": 100,
	"events_per_second": 50.0,
	"connections_per_user": 20,
	"expiry_warning": 30.0,
	"expiry_grace": 10.0,
	"auth_cache_seconds": 30.0,
	"frappe_timeout": 5.0,
	"shutdown_grace": 10.0,
	"ping_interval": 25.0,
	"ping_timeout": 20.0,
	"websocket_compression": False,
	"max_connections": 20_000,
	"http_timeout": 20.0,
	"recovery_window": 120.0,
	"recovery_max_events": 100_000,
	"log_level": "INFO",
	"async_mode": "eventlet",
}


#: Fields whose "not set" value is ``None`` rather than a parsed default.
_NULLABLE = {"uds", "redis_socketio", "frappe_url", "default_site", "jwt_secret_key", "allowed_origins"}


@dataclasses.dataclass(frozen=True)
class Config:
	"""Everything the server and the publish helpers need, read once."""

	bench_path: Path | None
	port: int
	host: str
	uds: str | None
	redis_queue: str
	redis_socketio: str | None
	webserver_port: int
	frappe_url: str
	default_site: str | None
	#: Known sites and their own HS256 secret (``None`` when the site has none).
	site_secrets: Mapping[str, str | None]
	auth_mode: str
	allowed_origins: tuple[str, ...] | None
	public_rooms: tuple[str, ...]
	max_payload: int
	max_unsent_bytes: int
	slow_client_seconds: float
	rooms_per_socket: int
	events_per_second: float
	connections_per_user: int
	expiry_warning: float
	expiry_grace: float
	auth_cache_seconds: float
	frappe_timeout: float
	shutdown_grace: float
	ping_interval: float
	ping_timeout: float
	websocket_compression: bool
	max_connections: int
	http_timeout: float
	recovery_window: float
	recovery_max_events: int
	log_level: str
	async_mode: str

	@property
	def sites(self) -> tuple[str, ...]:
		return tuple(self.site_secrets)

	@property
	def event_redis_urls(self) -> tuple[str, ...]:
		"""Where Frappe publishes ``events``: the queue Redis, and v14's socketio Redis."""
		urls = [self.redis_queue]
		if self.redis_socketio and self.redis_socketio != self.redis_queue:
			urls.append(self.redis_socketio)
		return tuple(urls)

	def jwt_secret(self, site: str) -> str | None:
		return self.site_secrets.get(site)

	@property
	def local_url(self) -> str:
		"""Where a client on this machine reaches the server: ``http://host:port``, with a
		wildcard address as loopback, or ``unix:<path>`` for a unix socket."""
		if self.uds:
			return f"unix:{self.uds}"
		host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "::1" if self.host == "::" else self.host
		return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

	def describe(self) -> str:
		"""One line for the start-up log: nothing secret in it."""
		where = f"unix:{self.uds}" if self.uds else f"{self.host}:{self.port}"
		mode = f"bench {self.bench_path}" if self.bench_path else "standalone"
		return (
			f"listening on {where} ({mode}); redis {', '.join(self.event_redis_urls)}; "
			f"sites {', '.join(self.sites) or '(none)'} (default {self.default_site or '(none)'}); "
			f"auth {self.auth_mode}" + (f" via {self.frappe_url}" if self.auth_mode == "frappe" else "") + f"; {self.async_mode}"
		)


def find_bench(explicit: str | os.PathLike | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path | None:
	"""The bench root: ``--bench``, else ``FRAPPE_BENCH_PATH``, else the first folder at or
	above the working directory, then above this package, that holds
	``sites/common_site_config.json``."""
	env = os.environ if env is None else env
	given = explicit or env.get("FRAPPE_BENCH_PATH")
	if given:
		path = Path(given).expanduser().resolve()
		if not (path / "sites" / "common_site_config.json").is_file():
			raise ConfigError(f"{path}: not a bench (no sites/common_site_config.json)")
		return path
	for start in (Path(cwd or os.getcwd()).resolve(), Path(__file__).resolve().parent):
		for folder in (start, *start.parents):
			if (folder / "sites" / "common_site_config.json").is_file():
				return folder
	return None


def read_json(path: Path) -> dict[str, Any]:
	"""A JSON object from a file; a missing file is empty, a broken one a ConfigError."""
	try:
		text = path.read_text(encoding="utf-8")
	except FileNotFoundError:
		return {}
	except OSError as exc:
		raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
	try:
		data = json.loads(text) if text.strip() else {}
	except json.JSONDecodeError as exc:
		raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
	if not isinstance(data, dict):
		raise ConfigError(f"{path}: expected a JSON object")
	return data


def _bench_sites(bench: Path) -> dict[str, dict[str, Any]]:
	"""Each site folder with its parsed ``site_config.json``."""
	sites: dict[str, dict[str, Any]] = {}
	for config_file in sorted((bench / "sites").glob("*/site_config.json")):
		sites[config_file.parent.name] = read_json(config_file)
	return sites


def load_config(
	overrides: Mapping[str, Any] | None = None,
	*,
	bench: str | os.PathLike | None = None,
	env: Mapping[str, str] | None = None,
	cwd: Path | None = None,
) -> Config:
	"""Read every source once and return the one :class:`Config`.

	``overrides`` are command-line values by field name (``None`` means "not given").
	Raises :class:`ConfigError` with one line naming the file or key at fault.
	"""
	env = os.environ if env is None else env
	overrides = {name: value for name, value in (overrides or {}).items() if value is not None}
	bench_path = find_bench(bench, env, cwd)

	values: dict[str, Any] = dict(DEFAULTS)
	origin: dict[str, str] = {name: "default" for name in values}
	site_files: dict[str, dict[str, Any]] = {}
	if bench_path:
		values["auth_mode"] = "frappe"
		values["sites"] = ()
		for path in (bench_path / "config.json", bench_path / "sites" / "common_site_config.json"):
			data = read_json(path)
			for setting in SETTINGS:
				if setting.key and setting.key in data:
					values[setting.field] = data[setting.key]
					origin[setting.field] = f"{path}: key {setting.key}"
		site_files = _bench_sites(bench_path)
	else:
		values["auth_mode"] = "jwt"
	for setting in SETTINGS:
		if setting.env and env.get(setting.env, "") != "":
			values[setting.field] = env[setting.env]
			origin[setting.field] = f"environment variable {setting.env}"
	for name, value in overrides.items():
		values[name] = value
		origin[name] = f"option --{name.replace('_', '-')}"

	parsed: dict[str, Any] = {}
	for setting in SETTINGS:
		raw = values[setting.field]
		try:
			parsed[setting.field] = raw if raw is None and setting.field in _NULLABLE else setting.parse(raw)
		except (TypeError, ValueError) as exc:
			raise ConfigError(f"{origin[setting.field]}: invalid value {raw!r} ({exc})") from None

	if bench_path:
		if "sites" in overrides or env.get("EXCEL_RESTAURANT_POS_SITES", "") != "":
			wanted = parsed["sites"]
			missing = [site for site in wanted if site not in site_files]
			if missing:
				raise ConfigError(f"{origin['sites']}: no site folder for {', '.join(missing)} in {bench_path / 'sites'}")
			site_files = {site: site_files[site] for site in wanted}
		site_secrets = {
			site: _as_optional_str(data.get("jwt_secret_key")) or parsed["jwt_secret_key"]
			for site, data in site_files.items()
		}
	else:
		site_secrets = {site: parsed["jwt_secret_key"] for site in parsed["sites"]}

	default_site = parsed["default_site"]
	if default_site is None and not bench_path and site_secrets:
		default_site = next(iter(site_secrets))
	if default_site is None and len(site_secrets) == 1:
		default_site = next(iter(site_secrets))
	if default_site is not None and default_site not in site_secrets:
		raise ConfigError(f"{origin['default_site']}: {default_site!r} is not a known site ({', '.join(site_secrets) or 'none'})")

	frappe_url = (parsed["frappe_url"] or f"http://127.0.0.1:{parsed['webserver_port']}").rstrip("/")
	for field in ("port", "webserver_port"):
		if not 0 <= parsed[field] <= 65535:
			raise ConfigError(f"{origin[field]}: port {parsed[field]} out of range")
	del parsed["sites"], parsed["jwt_secret_key"], parsed["frappe_url"], parsed["default_site"]
	return Config(
		bench_path=bench_path,
		site_secrets=site_secrets,
		frappe_url=frappe_url,
		default_site=default_site,
		**parsed,
	)

